"""The student methods' training objectives: one builder per method of :data:`retrikt.methods.REGISTRY`.

Every builder has the same signature, ``(student, teacher, train, entries, params) -> Objective``
(:class:`retrikt.classifier.Objective`, what the shared loop :func:`retrikt.classifier.fit` trains);
``teacher`` is None for a method that does not need one, ``entries`` (the knowledge store) None for a
method that does not read the store. Losses all come from :mod:`retrikt.distill.losses`; α =
``kd_alpha``, T = ``kd_temperature``:

* ``finetune``: CE on the gold train labels.
* ``vanilla_kd``: α·KD + (1−α)·CE on train.
* ``mgskd``: α·KD + (1−α)·CE + MGSKD(w_sample, w_token) added with weight 1, as AD-KD's
  ``glue_train.py`` (``loss + mgskd_w · mgskd``, ``mgskd_w = 1``) — one stage, not TinyBERT's two.
  Teacher and student read the same token ids, or the teacher's own, carried onto the student's tokens
  through character offsets (:mod:`retrikt.distill.align`); relation heads ``gcd(64, H_S, H_T)``
  (64 for MiniLM).
* ``adkd``: α·KD + (1−α)·CE + β·L_attr over the embedding-layer output; one view per class when
  C > 2 (the code's multi-class variant), else the gold-label view; teacher keeps its top
  ``adkd_top_k`` fraction of dims. A teacher that tokenizes otherwise has its attributions split onto
  the student's tokens (:func:`retrikt.distill.align.split_onto`).
* ``retrikt_kd``: KD on train ∪ store: L = α·mean_{batch} KD + (1−α)·mean_{train rows} CE. Store
  entries have no gold label, so they get the KD term only; their teacher distribution is rebuilt
  from the stored soft label p as ``softmax(log p / T)`` — exactly the reward model's
  ``softmax(z/T)``, so train and store rows see the same temperature.
* ``retrikt``: KL(q_RM ‖ q_S) over each train input's candidates = the reward model's exact top-K
  store entries (cosine of its embeddings, ``data/index/<task>/embeddings.npy``; an entry whose
  classifier input equals the query is excluded). Queries: the train rows (``retrieval_queries:
  train``, as in the paper), or the store entries too (``train+store``); the candidate side is
  re-embedded with gradient every step or once per epoch (``retrieval_candidate_grad``; see
  :class:`Retrieval`). Optional ``retrieval_ce_weight`` × NLL of the aggregated
  prediction over the student's top-k of those candidates. Inference: the student's own FAISS
  index over the store, top-k, ``Σ softmax(s/τ)·soft_label`` (:func:`retrikt.retrieval.retrieval_proba`).

The teacher is frozen and in eval mode, so its outputs are a function of the input alone: logits,
MGSKD's matched hidden states and AD-KD's attributions are computed once per training example and
re-padded per batch (``setup_seconds``), not recomputed every epoch.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from retrikt import paths, store
from retrikt.classifier import Classifier, Objective, ce_objective
from retrikt.device import to_device
from retrikt.distill import align, losses
from retrikt.io import DataError
from retrikt.models import sha256_file
from retrikt.params import Params
from retrikt.retrieval import retrieval_proba

log = logging.getLogger(__name__)

MGSKD_MAX_HEADS = 64  # n_relation_heads in both official repos
TEACHER_BATCH = 32  # batch size of the one-off teacher passes


def _labels(rows: Sequence[dict], device: torch.device) -> torch.Tensor:
    return torch.tensor([r["label"] for r in rows], device=device)


def _teacher_logits(teacher: Classifier, rows: Sequence[dict]) -> torch.Tensor:
    return torch.from_numpy(teacher.logits(rows))


# --------------------------------------------------------------------------------- methods --- #
def finetune(student: Classifier, teacher: None, train: list[dict], entries: None, params: Params) -> Objective:
    """CE on the gold train labels, exactly the teacher's objective."""
    return ce_objective(student, train)


def vanilla_kd(student: Classifier, teacher: Classifier, train: list[dict], entries: None,
               params: Params) -> Objective:
    sp = params.student
    t_logits = _teacher_logits(teacher, train).to(student.model.device)

    def loss(idx: list[int]) -> torch.Tensor:
        rows = [train[i] for i in idx]
        z = student.forward(rows)[0].logits
        return losses.kd_ce_loss(z, t_logits[idx], _labels(rows, z.device), sp.kd_alpha, sp.kd_temperature).total

    return Objective(len(train), loss, student.predict_proba)


def same_tokenization(a: Classifier, b: Classifier, rows: Sequence[dict]) -> bool:
    """Whether both classifiers turn ``rows`` into the same token ids (then MGSKD and AD-KD compare
    teacher and student token by token directly; else through :mod:`retrikt.distill.align`)."""
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        return False
    kw = dict(truncation=True, max_length=a.max_length)
    return all(a.tokenizer(*a.texts(r), **kw)["input_ids"] == b.tokenizer(*b.texts(r), **kw)["input_ids"]
               for r in rows)


def scatter_tokens(parts: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-example tensors over their real tokens (``[T_b, ...]``) -> a zero-padded ``[B, T, ...]`` batch."""
    out = parts[0].new_zeros((mask.shape[0], mask.shape[1], *parts[0].shape[1:]))
    for b, part in enumerate(parts):
        out[b, mask[b].bool()] = part
    return out


def _teacher_batches(student: Classifier, teacher: Classifier, rows: Sequence[dict], method: str):
    """``(rows, enc, maps)`` chunks of ``rows`` for the one-off teacher passes, ``enc`` on the teacher's
    device. A teacher that tokenizes like the student reads the student's ids (``maps`` None); any
    other reads its own, and ``maps`` holds each row's student x teacher token alignment
    (:func:`retrikt.distill.align.alignment`) to carry its per-token outputs onto the student's tokens."""
    same = same_tokenization(student, teacher, rows[:32])
    if not same:
        log.info("%s: the teacher tokenizes differently; its per-token outputs are carried onto the student's "
                 "tokens through character offsets (retrikt.distill.align)", method)
    unmatched = total = 0
    for i in range(0, len(rows), TEACHER_BATCH):
        chunk = rows[i:i + TEACHER_BATCH]
        maps = None
        if not same:
            maps, u, n = align.token_maps(student, teacher, chunk)
            unmatched, total = unmatched + u, total + n
        yield chunk, to_device((student if same else teacher).encode(chunk), teacher.model.device), maps
    if not same:
        log.info("%s: %d of %d student tokens matched no teacher token (zeros there)", method, unmatched, total)


def mgskd(student: Classifier, teacher: Classifier, train: list[dict], entries: None,
          params: Params) -> Objective:
    """Teacher logits and matched hidden states are computed once (eval mode: a function of the
    input only), kept on the student's device and re-padded per batch; the unmatched teacher layers
    are never read (None)."""
    sp = params.student
    heads = math.gcd(MGSKD_MAX_HEADS, student.model.config.hidden_size, teacher.model.config.hidden_size)
    n_teacher = teacher.model.config.num_hidden_layers
    layers = [t for _, t in losses.mgskd_layer_map(student.model.config.num_hidden_layers, n_teacher)]
    cache: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    dev = student.model.device
    with torch.no_grad():
        for _, enc, maps in _teacher_batches(student, teacher, train, "mgskd"):
            out, real = teacher.model(**enc, output_hidden_states=True), enc["attention_mask"].bool()
            for b in range(len(real)):
                hidden = [out.hidden_states[t][b, real[b]] for t in layers]
                if maps is not None:
                    hidden = [align.pool_onto(maps[b], h) for h in hidden]
                cache.append((out.logits[b].to(dev), [h.to(dev) for h in hidden]))

    def loss(idx: list[int]) -> torch.Tensor:
        rows = [train[i] for i in idx]
        s_out, enc = student.forward(rows, hidden=True)
        mask = enc["attention_mask"]
        t_hidden: list = [None] * (n_teacher + 1)
        for j, t in enumerate(layers):
            t_hidden[t] = scatter_tokens([cache[i][1][j] for i in idx], mask)
        t_logits = torch.stack([cache[i][0] for i in idx])
        base = losses.kd_ce_loss(s_out.logits, t_logits, _labels(rows, mask.device), sp.kd_alpha, sp.kd_temperature)
        rel = losses.mgskd_loss(s_out.hidden_states, t_hidden, mask, n_heads=heads,
                                w_sample=sp.mgskd_sample_weight, w_token=sp.mgskd_token_weight)
        return base.total + rel.total

    return Objective(len(train), loss, student.predict_proba)


def _embeddings_module(clf: Classifier) -> torch.nn.Module:
    """The module whose output is ``hidden_states[0]``, the ``E`` attributions are taken against: an
    encoder's ``embeddings`` (tokens + positions + LayerNorm); a decoder's token embedding (Llama:
    ``embed_tokens``; its positions are rotary, inside attention)."""
    base = getattr(clf.model, clf.model.base_model_prefix)
    module = getattr(base, "embeddings", None)
    return clf.model.get_input_embeddings() if module is None else module


def adkd(student: Classifier, teacher: Classifier, train: list[dict], entries: None,
         params: Params) -> Objective:
    """Teacher attributions are computed once per example (and kept on the student's device): each is
    normalised over its own tokens, so it does not depend on the batch it sits in (the 1/B of the
    batch mean cancels)."""
    sp = params.student
    seen: dict[str, torch.Tensor] = {}
    views = (lambda y: None) if student.task.num_labels > 2 else (lambda y: y)  # multi-view when C > 2

    def leaf(_m, _i, out: torch.Tensor) -> torch.Tensor:  # frozen teacher: make E a grad leaf
        seen["t"] = out.detach().requires_grad_()
        return seen["t"]

    hook = _embeddings_module(teacher).register_forward_hook(leaf)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    dev = student.model.device
    for rows, enc, maps in _teacher_batches(student, teacher, train, "adkd"):
        with torch.enable_grad():
            t_logits = teacher.model(**enc).logits
        a_t = losses.attribution(t_logits, seen["t"], enc["attention_mask"],
                                 labels=views(_labels(rows, t_logits.device)), top_k=sp.adkd_top_k)  # [B, V, T]
        real = enc["attention_mask"].bool()
        for b in range(len(rows)):
            a_b = a_t[b][:, real[b]].T  # [T, V] over the teacher's real tokens
            if maps is not None:
                a_b = align.split_onto(maps[b], a_b)
            cache.append((t_logits[b].detach().to(dev), a_b.to(dev)))
    hook.remove()
    student_hook = _embeddings_module(student).register_forward_hook(lambda _m, _i, out: seen.__setitem__("s", out))

    def loss(idx: list[int]) -> torch.Tensor:
        rows = [train[i] for i in idx]
        # the loss back-propagates through ∂/∂E, and the fused attention kernels (CPU flash, which torch
        # picks when attention dropout is off, e.g. in eval mode) have no double backward: use the math one
        with sdpa_kernel(SDPBackend.MATH):
            s_out, enc = student.forward(rows)
        mask = enc["attention_mask"]
        y = _labels(rows, mask.device)
        a_s = losses.attribution(s_out.logits, seen["s"], mask, labels=views(y), create_graph=True)
        a_t = scatter_tokens([cache[i][1] for i in idx], mask).transpose(1, 2)
        t_logits = torch.stack([cache[i][0] for i in idx])
        return losses.adkd_loss(s_out.logits, t_logits, y, a_s, a_t, mask, alpha=sp.kd_alpha,
                                temperature=sp.kd_temperature, beta=sp.adkd_beta).total

    return Objective(len(train), loss, student.predict_proba, release=student_hook.remove)


def retrikt_kd(student: Classifier, teacher: Classifier, train: list[dict], entries: list[dict],
               params: Params) -> Objective:
    sp = params.student
    rows_all = train + entries
    store_logits = torch.from_numpy(np.log(np.clip(store.soft_labels(entries), 1e-12, None)))
    targets = torch.cat([_teacher_logits(teacher, train), store_logits])  # softmax(·/T) = teacher's
    targets = targets.to(student.model.device)
    n_train = len(train)

    def loss(idx: list[int]) -> torch.Tensor:
        z = student.forward([rows_all[i] for i in idx])[0].logits
        kd = losses.kd_loss(z, targets[idx], sp.kd_temperature)
        gold = [j for j, i in enumerate(idx) if i < n_train]
        if not gold:
            return sp.kd_alpha * kd
        ce = F.cross_entropy(z[gold], _labels([rows_all[idx[j]] for j in gold], z.device))
        return sp.kd_alpha * kd + (1.0 - sp.kd_alpha) * ce

    return Objective(len(rows_all), loss, student.predict_proba)


def teacher_candidates(query_emb: np.ndarray, entry_emb: np.ndarray, k: int,
                       exclude: Sequence[set[int]] | None = None) -> np.ndarray:
    """``[Q, K]`` entry rows: each query's top-``k`` entries by cosine (exact), best first, minus the
    ``exclude`` rows (entries identical to the query). K = ``k``, or less when the store is smaller."""
    exclude = exclude or [set() for _ in range(len(query_emb))]
    extra = max((len(e) for e in exclude), default=0)
    index = store.build_index(entry_emb, "flat")
    _, hits = store.search(index, query_emb, k + extra)
    kept = [[int(h) for h in row if h >= 0 and h not in ex] for row, ex in zip(hits, exclude)]
    size = min(k, *(len(r) for r in kept))
    if size < 2:
        raise DataError(f"retrikt needs at least 2 candidate store entries per query, got {size}")
    return np.asarray([r[:size] for r in kept], dtype=np.int64)


def _identical_entries(task, train: Sequence[dict], entries: Sequence[dict]) -> list[set[int]]:
    by_input: dict[tuple, set[int]] = {}
    for i, e in enumerate(entries):
        by_input.setdefault(task.render(e), set()).add(i)
    return [by_input.get(task.render(r), set()) for r in train]


def _reward_model_entry_embeddings(task: str, n_entries: int) -> np.ndarray:
    """The index stage's reward-model embeddings of the store, checked against the teacher and store."""
    folder = paths.index(task)
    _, _, meta = store.load_index(folder)
    stale = {"model_sha256": store.model_identity(paths.teacher(task))["model_sha256"],
             "entries_sha256": sha256_file(paths.store_entries(task))}
    for key, want in stale.items():
        if meta.get(key) != want:
            raise DataError(f"{folder}: built from another {key.split('_')[0]}; re-run `retrikt index {task}`")
    emb = store.load_embeddings(folder)
    if len(emb) != n_entries:
        raise DataError(f"{folder}: {len(emb)} embeddings for {n_entries} store entries")
    return emb


class Retrieval:
    """The ``retrikt`` objective; also builds the student's store index for validation and saving.

    Queries: the train rows, and with ``retrieval_queries: train+store`` every store entry too (each
    entry never among its own candidates). Candidates: each query's top-K store entries under the
    reward model (exact cosine), plus ``retrieval_negatives`` store entries drawn uniformly at random
    at every step. The loss is ``KL(q_RM ‖ q_S)`` over them. The negatives are what teach the student
    the store's structure: in a reward model's embedding space the top-K of a query are nearly all of
    its class and nearly equally similar (SST-2 oracle store: 99 % of the top-64 share the query's
    teacher label, cosines 0.94-0.97, so q_RM over them is near uniform), while inference searches
    the whole store. Random entries carry the other classes, where q_RM puts almost no mass. With
    ``retrieval_candidate_grad`` the student embeds the batch's candidates afresh, with gradient (cost:
    the union of the batch's candidate lists, up to B·K entries, every step); without it the candidate
    side reads the student's embeddings of the whole store made once per epoch — the same pass that
    builds the index for that epoch's validation — and the gradient flows through the queries only.
    """

    def __init__(self, student: Classifier, teacher: Classifier, train: list[dict], entries: list[dict],
                 params: Params):
        self.student, self.train, self.entries, self.params = student, train, entries, params
        sp = params.student
        self.tau, self.top_k, self.ce_weight = sp.retrieval_tau, sp.retrieval_top_k, sp.retrieval_ce_weight
        self.candidate_grad = sp.retrieval_candidate_grad
        self.soft = store.soft_labels(entries)
        t_entries = _reward_model_entry_embeddings(student.task.name, len(entries))
        exclude = _identical_entries(student.task, train, entries)
        self.queries, t_queries = list(train), teacher.embed(train)
        self.gold = [r["label"] for r in train]  # the store entries have no gold label (CE term: train rows only)
        if sp.retrieval_queries == "train+store" and len(entries) < 3:
            # an entry is never its own candidate: with 2 entries each entry query would have 1 (a KL over
            # one candidate is 0), and teacher_candidates would refuse the whole store
            log.warning("retrieval_queries train+store: a store of %d entries leaves each entry query under 2 "
                        "candidates; the train rows are the only queries", len(entries))
        elif sp.retrieval_queries == "train+store":
            same = _identical_entries(student.task, entries, entries)
            exclude += [same[j] | {j} for j in range(len(entries))]
            self.queries += entries
            t_queries = np.concatenate([t_queries, t_entries])
        self.candidates = teacher_candidates(t_queries, t_entries, sp.retrieval_candidates, exclude)
        self.negatives = sp.retrieval_negatives
        if self.negatives:  # per query, the entries a random negative must not be: excluded ones (padded -1)
            width = max(1, max(len(e) for e in exclude))
            self.excluded = torch.tensor([sorted(e) + [-1] * (width - len(e)) for e in exclude])
            # own stream, seeded from the stage's seeded torch RNG: drawing negatives moves no other draw
            self.rng = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        # what the loss reads every step, moved once to the student's device
        dev = student.model.device
        self.t_entries, self.t_queries, self.t_soft = (torch.from_numpy(x).to(dev)
                                                       for x in (t_entries, t_queries, self.soft))
        self.index = None
        self.entry_emb = None if self.candidate_grad else self._embed_entries()

    def objective(self) -> Objective:
        """The loop's view of it; ``extra`` is this Retrieval (its index is saved with the student)."""
        return Objective(len(self.queries), self.loss, self.predict, extra=self)

    def _embed_entries(self) -> torch.Tensor:
        """The student's embeddings of every store entry (no gradient), on the student's device."""
        return torch.from_numpy(self.student.embed(self.entries)).to(self.student.model.device)

    def _draw_negatives(self, idx: list[int], cand: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None]:
        """``cand`` plus ``retrieval_negatives`` uniform random store entries per query, and the mask of
        the real candidates: a negative that is already a candidate or is excluded for its query (the
        query itself, an identical entry) is masked out. Without negatives: ``(cand, None)``."""
        if not self.negatives:
            return cand, None
        neg = torch.randint(len(self.entries), (len(idx), self.negatives), generator=self.rng)
        top = torch.from_numpy(cand)
        clash = (neg[:, :, None] == top[:, None, :]).any(-1) | \
                (neg[:, :, None] == self.excluded[idx][:, None, :]).any(-1)
        mask = torch.cat([torch.ones_like(top, dtype=torch.bool), ~clash], dim=1)
        return torch.cat([top, neg], dim=1).numpy(), mask.to(self.student.model.device)

    def loss(self, idx: list[int]) -> torch.Tensor:
        cand, mask = self._draw_negatives(idx, self.candidates[idx])  # [B, K (+ R)] entry rows
        c = torch.from_numpy(cand).to(self.student.model.device)
        s_q = self.student.embed_tensor([self.queries[i] for i in idx])
        if self.candidate_grad:
            union, pos = np.unique(cand, return_inverse=True)
            s_u = self.student.embed_tensor([self.entries[u] for u in union])
            s_c = s_u[torch.from_numpy(pos.reshape(cand.shape)).to(s_u.device)]  # [B, K, H]
        else:
            s_c = self.entry_emb[c]
        loss = losses.retrieval_kl_loss(self.t_queries[idx], self.t_entries[c], s_q, s_c, self.tau, mask=mask)
        gold = [j for j, i in enumerate(idx) if i < len(self.gold)]
        if self.ce_weight > 0 and gold:
            sims = torch.einsum("bh,bkh->bk", s_q[gold], s_c[gold])
            if mask is not None:
                sims = sims.masked_fill(~mask[gold], float("-inf"))
            top, at = sims.topk(min(self.top_k, sims.shape[1]), dim=1)
            p = losses.retrieval_aggregate(top, self.t_soft[c[gold].gather(1, at)], self.tau)
            y = torch.tensor([self.gold[idx[j]] for j in gold], device=s_q.device)
            loss = loss + self.ce_weight * -p.gather(1, y[:, None]).clamp_min(1e-12).log().mean()
        return loss

    def build_index(self):
        """The student's own index over the store (kind from params.index), rows = entry ids; its
        embeddings also serve the next epoch's candidate side (without ``retrieval_candidate_grad``)."""
        ip = self.params.index
        emb = self.student.embed(self.entries)
        self.index = store.build_index(emb, ip.type, ip.nlist, ip.hnsw_m, self.params.seed)
        if not self.candidate_grad:
            self.entry_emb = torch.from_numpy(emb).to(self.student.model.device)
        return self.index

    def predict(self, rows: Sequence[dict], index=None) -> np.ndarray:
        """Validation / test probabilities; without an ``index`` it is (re)built from the current student,
        once per call — i.e. once per epoch in training, then reused for saving."""
        index = self.build_index() if index is None else index
        ids = np.arange(len(self.entries))
        return retrieval_proba(self.student.embed(rows), index, ids, self.soft, self.top_k, self.tau)[0]


def retrikt(student: Classifier, teacher: Classifier, train: list[dict], entries: list[dict],
            params: Params) -> Objective:
    """The retrieval student (:class:`Retrieval`)."""
    return Retrieval(student, teacher, train, entries, params).objective()
