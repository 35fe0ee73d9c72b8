"""Distillation losses for RetriKT and its baselines, as pure torch functions on tensors.

* Vanilla KD (Hinton et al.) in the form the AD-KD code uses: soft-target cross-entropy, no T².
* RetriKT: the student's similarity distribution over retrieved store entries is matched to the
  reward model's (KL), and at inference the soft labels of the top-k entries are aggregated.
* MGSKD (Liu et al., ACL 2022): token-level pair-wise / triplet-angle relations on the lower
  matched layers, sample-level triplet angles on the upper ones.
* AD-KD (Wu et al., ACL 2023): token attributions ``‖∂(−log p_c)/∂E ⊙ E‖`` of the embedding
  output, L2-normalised over tokens and matched with a summed squared error.
* Prompt tuning's generator NLL with the end-of-example token weighted (:func:`end_weighted_nll`).

Nothing here imports ``transformers``; hidden states, embedding outputs and logits come in as
tensors. Conventions: ``mask`` is ``[B, T]`` (1 = real token, 0 = padding); losses that combine
several terms return a :class:`LossOutput`. ``docs/baselines.md`` lists the defaults taken from the
official code and every deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from retrikt.classifier import mean_pool

__all__ = [
    "LossOutput", "kd_loss", "kd_ce_loss",
    "similarity_distribution", "retrieval_kl_loss", "retrieval_aggregate", "retrieval_predict",
    "mgskd_layer_map", "mgskd_token_loss", "mgskd_sample_loss", "mgskd_loss",
    "attribution", "adkd_attr_loss", "adkd_loss",
]


class LossOutput(NamedTuple):
    """A combined loss: ``total`` (what to back-propagate) and its named, unweighted ``parts``."""

    total: Tensor
    parts: dict[str, Tensor]


# ---------------------------------------------------------------------- prompt tuning NLL --- #

def end_weighted_nll(token_nll: Tensor, labels: Tensor, end_id: int, weight: float) -> Tensor:
    """``Σ_t w_t · nll_t`` with ``w_t = weight`` where ``labels[t] == end_id`` (the EOS that ends an
    example), else 1: the stop decision is one token of ~80 in a CB example, and a prompt that learns it
    ends its samples. ``token_nll`` and ``labels`` are flat and aligned (``nll`` 0 on ignored labels)."""
    if weight == 1.0:
        return token_nll.sum()
    return torch.where(labels == end_id, token_nll * weight, token_nll).sum()


# ------------------------------------------------------------------------------ vanilla KD --- #

def kd_loss(student_logits: Tensor, teacher_logits_or_probs: Tensor, temperature: float, *,
            targets_are_probs: bool = False) -> Tensor:
    """Soft-target cross-entropy ``−Σ_c p_T(c) · log softmax(z_S / T)_c``, mean over the batch.

    ``p_T = softmax(z_T / T)``, or the given probability vectors as they are when
    ``targets_are_probs`` (store entries carrying soft labels). The teacher side is detached. As in
    AD-KD's ``DistillKL`` there is no ``T²`` factor. Inputs are ``[..., C]``; the mean runs over all
    leading dimensions.
    """
    target = teacher_logits_or_probs.detach()
    p_t = target if targets_are_probs else F.softmax(target / temperature, dim=-1)
    return -(p_t * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


def kd_ce_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float,
               temperature: float, *, targets_are_probs: bool = False) -> LossOutput:
    """``α · KD + (1 − α) · CE(student, labels)``; parts ``kd`` and ``ce``."""
    kd = kd_loss(student_logits, teacher_logits, temperature, targets_are_probs=targets_are_probs)
    ce = F.cross_entropy(student_logits, labels)
    return LossOutput(alpha * kd + (1.0 - alpha) * ce, {"kd": kd, "ce": ce})


# ------------------------------------------------------------------------------- RetriKT --- #

def _cosine(query: Tensor, cands: Tensor) -> Tensor:
    """Cosine similarities ``[B, K]`` of ``query [B, H]`` with ``cands [B, K, H]`` or ``[K, H]``."""
    q, c = F.normalize(query, dim=-1), F.normalize(cands, dim=-1)
    return q @ c.T if c.dim() == 2 else torch.einsum("bh,bkh->bk", q, c)


def similarity_distribution(query_emb: Tensor, cand_emb: Tensor, tau: float, *,
                            log: bool = False, mask: Tensor | None = None) -> Tensor:
    """``q(i|x) = softmax_i(cos(query, cand_i) / τ)`` as ``[B, K]`` (log-probabilities if ``log``).

    ``cand_emb`` is ``[B, K, H]`` (one candidate set per query) or ``[K, H]`` (shared). ``mask``
    ``[B, K]`` (True = a candidate) leaves the others out: probability 0 (log-probability -inf).
    """
    logits = _cosine(query_emb, cand_emb) / tau
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return F.log_softmax(logits, dim=-1) if log else F.softmax(logits, dim=-1)


def retrieval_kl_loss(teacher_query: Tensor, teacher_cands: Tensor, student_query: Tensor,
                      student_cands: Tensor, tau: float, *, tau_teacher: float | None = None,
                      tau_student: float | None = None, mask: Tensor | None = None) -> Tensor:
    """``KL(q_T ‖ q_S)`` summed over candidates, averaged over the batch ("batchmean").

    ``q_T`` comes from the teacher / reward-model embeddings (no gradient), ``q_S`` from the
    student's; each temperature defaults to ``tau``. ``mask`` ``[B, K]`` (True = a candidate): both
    distributions are over the kept candidates only (a row's set may differ from the next row's).
    """
    with torch.no_grad():
        log_qt = similarity_distribution(teacher_query, teacher_cands,
                                         tau if tau_teacher is None else tau_teacher, log=True, mask=mask)
    log_qs = similarity_distribution(student_query, student_cands,
                                     tau if tau_student is None else tau_student, log=True, mask=mask)
    if mask is None:
        return F.kl_div(log_qs, log_qt, reduction="batchmean", log_target=True)
    log_qt, log_qs = log_qt.masked_fill(~mask, 0.0), log_qs.masked_fill(~mask, 0.0)  # no -inf - -inf = nan
    return (log_qt.exp() * mask * (log_qt - log_qs)).sum() / len(log_qt)


def retrieval_aggregate(sims: Tensor, soft_labels: Tensor, tau: float) -> Tensor:
    """Class distribution ``[B, C] = Σ_i softmax(s / τ)_i · soft_label_i`` of the top-k entries.

    ``sims`` ``[B, k]`` are the similarities of the retrieved entries, ``soft_labels`` ``[B, k, C]``
    their stored label distributions.
    """
    weights = F.softmax(sims / tau, dim=-1)
    return torch.einsum("bk,bkc->bc", weights, soft_labels.to(weights))


def retrieval_predict(sims: Tensor, soft_labels: Tensor, tau: float) -> Tensor:
    """Predicted class ``[B]``: the argmax of :func:`retrieval_aggregate`."""
    return retrieval_aggregate(sims, soft_labels, tau).argmax(-1)


# --------------------------------------------------------------------------------- MGSKD --- #

def mgskd_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """``emb+uniform`` mapping as ``(student_index, teacher_index)`` into HF ``hidden_states``.

    The embeddings are matched, then ``g = gcd(n_student, n_teacher)`` layers at uniform strides:
    student ``i·n_s/g`` ↔ teacher ``i·n_t/g`` (AD-KD ``utils.matching_alignment``). E.g. 2→6:
    ``[(0,0), (1,3), (2,6)]``; 4→6: ``[(0,0), (2,3), (4,6)]``; 4→12: ``[(0,0), (1,3), …, (4,12)]``.
    """
    g = math.gcd(n_student, n_teacher)
    step_s, step_t = n_student // g, n_teacher // g
    return [(i * step_s, i * step_t) for i in range(g + 1)]


def _split_heads(hidden: Tensor, n_heads: int) -> Tensor:
    """``[B, T, H] -> [B, n_heads, T, H / n_heads]``."""
    b, t, h = hidden.shape
    if h % n_heads:
        raise ValueError(f"hidden size {h} is not divisible by n_heads={n_heads}")
    return hidden.reshape(b, t, n_heads, h // n_heads).transpose(1, 2)


def _pair_interactions(hidden: Tensor, pair_mask: Tensor, n_heads: int) -> Tensor:
    """Scaled dot products ``⟨h_i, h_j⟩ / √d`` per head, ``[B, n_heads, T, T]``, padding 0."""
    x = _split_heads(hidden, n_heads)
    return x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]) * pair_mask[:, None]


def _select_triplets(t_pairs: Tensor, pair_mask: Tensor, k1: int, k2: int) -> tuple[Tensor, Tensor]:
    """Teacher-chosen anchors ``[B, k1]`` and, per anchor, neighbours ``[B, k1, k2]``.

    The teacher's pair scores are turned into attention rows (softmax over valid keys). Anchors are
    the ``k1`` tokens receiving most attention (summed over heads and rows); an anchor's neighbours
    are the ``k2`` tokens it attends to most (summed over heads, itself excluded).
    """
    keep = pair_mask[:, None]
    attn = t_pairs.masked_fill(~keep, torch.finfo(t_pairs.dtype).min).softmax(-1) * keep
    anchors = attn.sum((1, 2)).topk(k1, dim=1).indices
    local = attn.sum(1) * (1 - torch.eye(attn.shape[-1], device=attn.device, dtype=attn.dtype))
    neigh = local.topk(k2, dim=2).indices
    return anchors, neigh.gather(1, anchors[..., None].expand(-1, -1, k2))


def _triplet_angles(hidden: Tensor, anchors: Tensor, neigh: Tensor) -> Tensor:
    """``cos∠(h_j, h_a, h_k)``, vertex at anchor ``a``, neighbours ``j, k``: ``[B, k1, k2, k2]``."""
    b, _, h = hidden.shape
    k1, k2 = neigh.shape[1:]
    a = hidden.gather(1, anchors[..., None].expand(-1, -1, h))
    n = hidden.gather(1, neigh.reshape(b, -1, 1).expand(-1, -1, h)).view(b, k1, k2, h)
    d = F.normalize(a[:, :, None] - n, dim=-1)
    return d @ d.transpose(-1, -2)


def mgskd_token_loss(s_hidden: Tensor, t_hidden: Tensor, mask: Tensor, *, n_heads: int = 64,
                     k1: int = 20, k2: int = 20) -> Tensor:
    """Token-level MGSKD on one matched layer: pair-wise MSE + triplet-angle smooth-L1.

    Pair term: ``Σ (P_S − P_T)² / (n_heads · Σ_b n_b²)`` over valid token pairs, with
    ``P = ⟨h_i, h_j⟩/√d`` per relation head. Triplet term: smooth-L1 between student and teacher
    angles at the teacher-selected anchors/neighbours (:func:`_select_triplets`), on the full
    hidden vector (one head, as in the code), summed and divided by the number of valid triplets
    (anchor and both neighbours real tokens, all three distinct). The teacher side is detached.
    """
    valid = mask.bool()
    pair_mask = valid[:, :, None] & valid[:, None, :]
    t_hidden = t_hidden.detach()
    t_pairs = _pair_interactions(t_hidden, pair_mask, n_heads)
    s_pairs = _pair_interactions(s_hidden, pair_mask, n_heads)
    pair = F.mse_loss(s_pairs, t_pairs, reduction="sum") / (pair_mask.sum() * n_heads).clamp_min(1)

    seq_len = mask.shape[1]
    anchors, neigh = _select_triplets(t_pairs, pair_mask, min(k1, seq_len), min(k2, seq_len))
    ok_n = valid.gather(1, neigh.flatten(1)).view_as(neigh) & (neigh != anchors[..., None])
    ok_a = valid.gather(1, anchors)[:, :, None, None]
    distinct = ~torch.eye(neigh.shape[-1], dtype=torch.bool, device=neigh.device)
    tri_mask = (ok_a & ok_n[..., :, None] & ok_n[..., None, :] & distinct).to(s_hidden.dtype)
    s_ang = _triplet_angles(s_hidden, anchors, neigh) * tri_mask
    t_ang = _triplet_angles(t_hidden, anchors, neigh) * tri_mask
    triplet = F.smooth_l1_loss(s_ang, t_ang, reduction="sum") / tri_mask.sum().clamp_min(1)
    return pair + triplet


def _sample_angles(pooled: Tensor, n_heads: int) -> Tensor:
    """``cos∠(x_j, x_i, x_k)`` over all sample triplets per head: ``[n_heads, B, B, B]``."""
    x = _split_heads(pooled[None], n_heads)[0]  # [n_heads, B, d]
    d = F.normalize(x[:, None, :, :] - x[:, :, None, :], dim=-1)  # [h, i, j] = x_j - x_i
    return d @ d.transpose(-1, -2)


def mgskd_sample_loss(s_hidden: Tensor, t_hidden: Tensor, mask: Tensor, *,
                      n_heads: int = 64) -> Tensor:
    """Sample-level MGSKD on one matched layer.

    Mean-pool the real tokens of each sequence, split into relation heads, form the triplet angles
    over the batch (``B³`` per head, degenerate ones are 0 on both sides) and take the mean
    smooth-L1 between student and teacher angles. The teacher side is detached.
    """
    t_ang = _sample_angles(mean_pool(t_hidden.detach(), mask), n_heads)
    s_ang = _sample_angles(mean_pool(s_hidden, mask), n_heads)
    return F.smooth_l1_loss(s_ang, t_ang, reduction="mean")


def mgskd_loss(student_hidden_states: list[Tensor] | tuple[Tensor, ...],
               teacher_hidden_states: list[Tensor] | tuple[Tensor, ...], mask: Tensor, *,
               n_heads: int = 64, k1: int = 20, k2: int = 20, n_token_layers: int = 2,
               w_sample: float = 4.0, w_token: float = 1.0) -> LossOutput:
    """MGSKD over the :func:`mgskd_layer_map` pairs: ``w_sample · sample + w_token · token``.

    Hidden-state lists are as HF returns them with ``output_hidden_states=True`` (embeddings
    first). The first ``n_token_layers`` matched pairs (embeddings included) get the token loss,
    the rest the sample loss. Student and teacher widths may differ as long as both are divisible
    by ``n_heads``: the relations compared are ``T×T`` / ``B×B×B`` matrices and angles.
    """
    pairs = mgskd_layer_map(len(student_hidden_states) - 1, len(teacher_hidden_states) - 1)
    token = sample = student_hidden_states[0].new_zeros(())
    for idx, (si, ti) in enumerate(pairs):
        s, t = student_hidden_states[si], teacher_hidden_states[ti]
        if idx < n_token_layers:
            token = token + mgskd_token_loss(s, t, mask, n_heads=n_heads, k1=k1, k2=k2)
        else:
            sample = sample + mgskd_sample_loss(s, t, mask, n_heads=n_heads)
    return LossOutput(w_sample * sample + w_token * token, {"sample": sample, "token": token})


# --------------------------------------------------------------------------------- AD-KD --- #

def attribution(logits: Tensor | Callable[[Tensor], Tensor], embeddings: Tensor,
                mask: Tensor | None = None, *, labels: Tensor | None = None,
                create_graph: bool = False, top_k: int | float | None = None,
                norm: float = 2.0) -> Tensor:
    """AD-KD token attributions of the embedding output, ``[B, V, T]``, normalised over tokens.

    Args:
        logits: ``[B, C]`` logits computed from ``embeddings`` (which must require grad), or a
            callable mapping ``embeddings`` to them.
        embeddings: the embedding-layer output ``E`` ``[B, T, H]`` (HF ``hidden_states[0]``).
        mask: ``[B, T]``; padding tokens get attribution 0 and do not enter the normalisation.
        labels: ``[B]`` gold labels -> one view (``V = 1``) for ``−log p_y``; ``None`` -> one view
            per class (``V = C``) for ``−log p_c`` (the code's "multi-view", used when C > 2).
        create_graph: True for the student, so the loss can be back-propagated through ``∂/∂E``;
            False for the teacher, whose attributions are then detached.
        top_k: keep only the ``top_k`` largest ``|g ⊙ E|`` dims per token before the norm (the
            teacher in AD-KD); an int is a count, a float in ``(0, 1]`` a fraction of ``H``.
        norm: the p of the normalisation over tokens (AD-KD default 2).

    For view c, ``g = ∂ mean_b(−log softmax(z)_c) / ∂E`` and ``a_t = ‖(g ⊙ E)_t‖₂`` (over the kept
    dims). If a frozen teacher's ``E`` does not require grad, make it a leaf first (e.g. a forward
    hook on the embeddings returning ``out.detach().requires_grad_()``).
    """
    z = logits(embeddings) if callable(logits) else logits
    logp = F.log_softmax(z, dim=-1)
    if labels is not None:
        objectives = [-logp.gather(1, labels[:, None]).mean()]
    else:
        objectives = [-logp[:, c].mean() for c in range(logp.shape[-1])]
    emb = embeddings if create_graph else embeddings.detach()
    hidden = emb.shape[-1]
    k = top_k if top_k is None or isinstance(top_k, int) else max(1, round(top_k * hidden))
    views = []
    for obj in objectives:
        (grad,) = torch.autograd.grad(obj, embeddings, retain_graph=True, create_graph=create_graph)
        sal = grad * emb
        if k is not None and k < hidden:
            sal = sal.abs().topk(k, dim=-1).values
        a = torch.linalg.vector_norm(sal, dim=-1)
        if mask is not None:
            a = a * mask.to(a)
        views.append(F.normalize(a, p=norm, dim=1))
    out = torch.stack(views, dim=1)
    return out if create_graph else out.detach()


def adkd_attr_loss(attr_s: Tensor, attr_t: Tensor, mask: Tensor | None = None, *,
                   loss_func: Literal["L2", "L1", "smoothL1"] = "L2") -> Tensor:
    """``Σ_views Σ_{b,t} ℓ(â_T − â_S) / #nonzero(â_T of the view)`` with ℓ squared error by default.

    ``attr_*`` are ``[B, V, T]`` (or ``[B, T]`` for one view) from :func:`attribution`; padding
    positions (``mask == 0``) are zeroed on both sides. The teacher side is detached.
    """
    if attr_s.dim() == 2:
        attr_s, attr_t = attr_s[:, None], attr_t[:, None]
    attr_t = attr_t.detach()
    if mask is not None:
        m = mask[:, None].to(attr_s)
        attr_s, attr_t = attr_s * m, attr_t * m
    fn = {"L2": F.mse_loss, "L1": F.l1_loss, "smoothL1": F.smooth_l1_loss}[loss_func]
    per_view = fn(attr_s, attr_t, reduction="none").sum((0, 2))
    return (per_view / (attr_t != 0).sum((0, 2)).clamp_min(1)).sum()


def adkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, attr_s: Tensor,
              attr_t: Tensor, mask: Tensor | None = None, *, alpha: float = 0.8,
              temperature: float = 2.0, beta: float = 1.0,
              loss_func: Literal["L2", "L1", "smoothL1"] = "L2") -> LossOutput:
    """``α · KD + (1 − α) · CE + β · L_attr``; parts ``kd``, ``ce`` and ``attr``.

    ``attr_s`` must come from :func:`attribution` with ``create_graph=True`` and ``attr_t`` from
    the teacher (``create_graph=False``, optionally ``top_k``), e.g. with
    ``labels=None if C > 2 else gold`` for both, as the AD-KD code does.
    """
    base = kd_ce_loss(student_logits, teacher_logits, labels, alpha, temperature)
    attr = adkd_attr_loss(attr_s, attr_t, mask, loss_func=loss_func)
    return LossOutput(base.total + beta * attr, {**base.parts, "attr": attr})
