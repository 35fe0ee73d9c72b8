"""Fast, seeded sampling from a (soft-prompted) generator: our own decode loop with slot refill.

Why our own loop: on a 2-core CPU, ``transformers.generate`` on SmolLM2-135M spends as much time in
Python/kernel overhead and in the full-vocabulary top-p sort as in the model itself, and a padded
batch keeps computing for rows that have already ended. Here:

* **Weights in the compute dtype** (``bfloat16`` by default: AVX-512 bf16 / AMX run it natively;
  autocast would re-cast the frozen weights every step), Q/K/V and gate/up fused into one matmul each.
* **Grouped-query attention without repeating K/V**: the cache holds the KV heads only.
* **A preallocated KV cache with slot refill**: a fixed number of slots each decode one sample;
  a slot whose sample ended (EOS, ``max_new_tokens`` or, if asked, its ``stop_lines``-th line) takes
  the next pending sample at once. The
  pending sample's prefix (``[soft prompt; source]``) is computed once per distinct source text
  and copied in, so a refill costs no forward pass.
* **Nucleus sampling without a full sort**: the nucleus is looked for among the ``topk`` most likely
  tokens (then a wider ``topk``); when it fits inside them (almost always) this is exactly top-p;
  rows where it does not fall back to a full sort.
* **Per-sample random streams**: sample ``i`` draws its token at step ``t`` by inverse CDF from
  the uniform ``u(seed, i, t)`` of a counter-based hash (splitmix64). What a sample writes depends
  on the seed, its index and its source only — not on the slot it lands in or the samples around
  it, up to the float rounding of differently-shaped kernels: measured on SmolLM2-135M, bfloat16 logits
  were bit-identical from 1 to 64 slots, float32 ones differed by up to 4e-5 (so a float32 store can
  change with ``batch_size``; a bfloat16 one did not in our checks).

Positions: the virtual tokens are numbered ``0..V-1`` and the source text follows from ``V`` on
(as in training, :mod:`retrikt.llm`). The fast path covers Llama-family causal LMs
(``model_type`` in :data:`FAST_MODEL_TYPES`); any other causal or seq2seq generator uses
:func:`_generic_loop`, the same sampling rule over the model's own forward with its KV cache, in
the model's own dtype (``dtype`` applies to the fast path only).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
FAST_MODEL_TYPES = ("llama",)
PREFILTER = 256  # top-k candidates searched for the nucleus before a wider search
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------ randomness
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(_MASK64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(_MASK64)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, sample_ids: Sequence[int], step: Sequence[int] | int) -> np.ndarray:
    """``u(seed, i, t)`` in [0, 1) for each sample id (and step): a pure function of its arguments."""
    with np.errstate(over="ignore"):
        ids = np.asarray(sample_ids, dtype=np.uint64)
        steps = np.broadcast_to(np.asarray(step, dtype=np.uint64), ids.shape)
        x = _splitmix64(np.uint64(seed & _MASK64) ^ _splitmix64(ids * np.uint64(0x100000001B3) + steps))
        x = _splitmix64(x ^ steps)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def nucleus_draw(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float,
                 prefilter: int = 256) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: softmax(logits / temperature), top-p, inverse CDF at ``u [B]``.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (the token that
    crosses it included, as ``transformers``' TopPLogitsWarper keeps it). It is looked for among the top
    ``prefilter`` probabilities, then the top ``16 × prefilter`` for rows where it is wider, and only then
    by a full sort: exact top-p at a fraction of the sort's cost. ``top_p >= 1`` samples the whole
    distribution (in token-id order, no sort at all).
    """
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:  # the whole distribution, in token-id order; never a zero-probability token
        c = probs.double().cumsum(-1)
        j = torch.searchsorted(c, (u.double() * c[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        return j.clamp(max=(probs > 0).cumsum(-1).argmax(-1))
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    for k in (prefilter, 16 * prefilter, probs.shape[-1]):
        k = min(k, probs.shape[-1])
        if k == probs.shape[-1]:
            p, idx = probs[rows].sort(dim=-1, descending=True, stable=True)
        else:
            p, idx = probs[rows].topk(k, dim=-1)
        cum = p.cumsum(-1)
        fits = cum[:, -1] >= top_p if k < probs.shape[-1] else torch.ones_like(cum[:, -1], dtype=torch.bool)
        if bool(fits.any()):
            out[rows[fits]] = _inverse_cdf(p[fits], cum[fits], idx[fits], u[rows[fits]], top_p)
        rows = rows[~fits]
        if not len(rows):
            break
    return out


def _inverse_cdf(p: torch.Tensor, cum: torch.Tensor, idx: torch.Tensor, u: torch.Tensor,
                 top_p: float) -> torch.Tensor:
    """Rows of probabilities ``p`` sorted in descending order (token ids ``idx``): keep the nucleus (the
    crossing token included; never a zero-probability token, always the most likely one) and pick the
    token at ``u`` of its float64 cumulative mass."""
    keep = ((cum - p) < top_p) & (p > 0)
    keep[:, 0] = True
    c = (p * keep).double().cumsum(-1)
    target = (u.double() * c[:, -1]).unsqueeze(-1)
    j = torch.searchsorted(c, target, right=True).squeeze(-1).clamp(max=keep.sum(-1) - 1)
    return idx.gather(1, j.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------ results
@dataclass
class Drawn:
    """One sample: generated token ids (EOS excluded) and how it ended: ``"eos"`` (the model stopped),
    ``"lines"`` (the line break after its ``stop_lines``-th line: a complete example, whatever would
    follow is cut) or ``"budget"`` (``max_new_tokens`` ran out first)."""

    ids: list[int] = field(default_factory=list)
    ended: str = ""
    breaks: int = 0  # line-break tokens so far
    forced: list[int] = field(default_factory=list)  # field-name tokens still to write (see _Rules)
    forced_at: list[int] = field(default_factory=list)  # positions in ids the rules wrote, not the model

    @property
    def finished(self) -> bool:
        return self.ended in ("eos", "lines")


def decode(tok, d: Drawn) -> str:
    """A sample's text, special tokens and surrounding whitespace stripped; for a sample that ended at
    its last line, cut at the last newline (the line-break token's own text before it is kept)."""
    text = tok.decode(d.ids, skip_special_tokens=True)
    return (text[:text.rfind("\n")] if d.ended == "lines" and "\n" in text else text).strip()


_BREAKS: dict[tuple[str, int], np.ndarray] = {}


def line_breaks(tok) -> np.ndarray:
    """Whether each token's text contains a newline (cached per tokenizer): one line break per token,
    however many newlines it holds (a blank line is not a field line)."""
    key = (str(getattr(tok, "name_or_path", "")), len(tok))
    if key not in _BREAKS:
        _BREAKS[key] = np.array(["\n" in tok.decode([i]) for i in range(len(tok))], dtype=bool)
    return _BREAKS[key]


def field_name_tokens(tok, names: Sequence[str]) -> list[list[int]] | None:
    """Token ids of ``"<name>:"`` for each serialisation line, as they appear at a line start in context,
    or None when the tokenizer merges a line break with the text after it (then names cannot be forced)."""
    ids = [tok(f"{n}:", add_special_tokens=False)["input_ids"] for n in names]
    text = "\n".join(f"{n}: x" for n in names)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    at = 0
    for k, want in enumerate(ids):
        if whole[at:at + len(want)] != want:
            return None
        at += len(want) + len(tok(" x", add_special_tokens=False)["input_ids"]) + (k + 1 < len(ids))
    return ids


class _Rules:
    """How samples are written and when they end: at EOS, at the line break after line ``stop_lines``
    (if set), or at ``max_new_tokens``; with ``forced`` (:func:`field_name_tokens`) each line starts
    with its field name written for the model and EOS is ruled out before the last line has begun
    (structured decoding: the values are sampled)."""

    def __init__(self, tok, eos: int, max_new_tokens: int, stop_lines: int | None,
                 forced: list[list[int]] | None = None):
        self.eos, self.budget, self.stop_lines, self.forced = eos, max_new_tokens, stop_lines, forced
        self.breaks = line_breaks(tok) if stop_lines or forced else None

    def start(self) -> Drawn:
        return Drawn(forced=list(self.forced[0]) if self.forced else [])

    def blocks_eos(self, d: Drawn) -> bool:
        """With forced field names, a sample may not end before its last line has begun."""
        return bool(self.forced) and d.breaks < len(self.forced) - 1

    def block(self, logits: torch.Tensor, drawn: Sequence[Drawn]) -> torch.Tensor:
        """``logits`` (one row per sample in ``drawn``) with EOS ruled out, in place, where :meth:`blocks_eos`
        (the loops own these rows: they are recomputed, or copied from the prefix stash, every step)."""
        if self.forced:
            rows = [r for r, d in enumerate(drawn) if self.blocks_eos(d)]
            if rows:
                logits[rows, self.eos] = float("-inf")
        return logits

    def choose(self, d: Drawn, sampled: int) -> int:
        """The token sample ``d`` writes next: a forced field-name token (its position recorded in
        ``d.forced_at``), else the sampled one."""
        if not d.forced:
            return sampled
        d.forced_at.append(len(d.ids))
        return d.forced.pop(0)

    def add(self, d: Drawn, t: int) -> bool:
        """Append token ``t`` to ``d``; True if the sample has ended."""
        if t == self.eos:
            d.ended = "eos"
            return True
        d.ids.append(t)
        if self.breaks is not None and t < len(self.breaks) and self.breaks[t]:
            d.breaks += 1
            if self.stop_lines and d.breaks >= self.stop_lines:
                d.ended = "lines"
                return True
            if self.forced and d.breaks < len(self.forced):
                d.forced = list(self.forced[d.breaks])
        if len(d.ids) >= self.budget:
            d.ended = "budget"
            return True
        return False


# ------------------------------------------------------------------------------------ fast path
class LlamaDecoder:
    """Our own forward of a Llama-family causal LM over a preallocated, per-slot KV cache."""

    def __init__(self, model, dtype: torch.dtype, slots: int, max_len: int):
        cfg = model.config
        core = model.model
        self.dtype, self.slots, self.max_len = dtype, slots, max_len
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        dev = model.device
        self.device = dev

        def w(lin) -> tuple[torch.Tensor, torch.Tensor | None]:
            return lin.weight.detach().to(dtype), (None if lin.bias is None else lin.bias.detach().to(dtype))

        def cat(*lins) -> tuple[torch.Tensor, torch.Tensor | None]:
            ws = [w(lin) for lin in lins]
            bias = None if any(b is None for _, b in ws) else torch.cat([b for _, b in ws])
            return torch.cat([x for x, _ in ws]).contiguous(), bias

        self.layers = []
        for layer in core.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": layer.input_layernorm.weight.detach().to(dtype),
                "ln2": layer.post_attention_layernorm.weight.detach().to(dtype),
                "qkv": cat(a.q_proj, a.k_proj, a.v_proj), "o": w(a.o_proj),
                "gu": cat(m.gate_proj, m.up_proj), "down": w(m.down_proj),
            })
        self.norm = core.norm.weight.detach().to(dtype)
        self.lm_head = w(model.get_output_embeddings())
        self.embed_w = model.get_input_embeddings().weight.detach()
        pos = torch.arange(max_len, device=dev)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=dev)
        cos, sin = core.rotary_emb(probe, pos)                     # [1, L, D] in float32
        half = cos.shape[-1] // 2
        self.cos, self.sin = cos[0].to(dtype), torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1).to(dtype)
        shape = (len(self.layers), slots, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=dev)
        self.v = torch.zeros(shape, dtype=dtype, device=dev)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.inter = self.layers[0]["gu"][0].shape[0] // 2

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x [..., D]``: ``x·cos + rotate_half(x)·sin`` (sin's first half negated
        once in __init__, so rotate_half is a plain swap of the halves)."""
        half = x.shape[-1] // 2
        return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)

    def prefill(self, x: torch.Tensor, slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run ``x [T, H]`` (a prefix) into slot ``slot`` at positions ``0..T-1``; float logits of its last
        position ``[V]`` (of every position ``[T, V]`` with ``all_logits``: teacher-forced scoring)."""
        t = x.shape[0]
        h = x.to(self.dtype)[None]
        cos, sin = self.cos[:t], self.sin[:t]
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        for li, lw in enumerate(self.layers):
            qkv = F.linear(self._rms(h, lw["ln1"]), *lw["qkv"]).view(1, t, nq + 2 * nk, d).transpose(1, 2)
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.k[li][slot, :, :t], self.v[li][slot, :, :t] = k[0], v[0]
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=nq != nk)
            h = h + F.linear(att.transpose(1, 2).reshape(1, t, nq * d), *lw["o"])
            g, u = F.linear(self._rms(h, lw["ln2"]), *lw["gu"]).split(self.inter, dim=-1)
            h = h + F.linear(F.silu(g) * u, *lw["down"])
        return F.linear(self._rms(h[0] if all_logits else h[0, -1], self.norm), *self.lm_head).float()

    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step for slots ``0..m-1``: token ``tokens[b]`` at position ``pos[b]``; float logits ``[m, V]``.

        Attention reads each slot's cache rows ``0..pos[b]`` (grouped-query, K/V heads not repeated)."""
        m = tokens.shape[0]
        span = int(pos.max()) + 1
        if span * 5 >= self.max_len * 2:  # a slice of the cache makes matmul copy it: past 40 % of the cache,
            span = self.max_len           # reading all of it (masked) is faster than that copy (measured)
        h = self.embed(tokens).to(self.dtype)                                  # [m, H]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]             # [m, 1, D]
        keys = torch.arange(span, device=self.device)
        bias = torch.zeros(m, 1, 1, span, device=self.device).masked_fill(keys > pos[:, None, None, None],
                                                                          float("-inf"))
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        # where each slot's new K/V rows go in a layer's cache viewed as [slots * kv_heads * max_len, D]
        rows = ((torch.arange(m, device=self.device)[:, None] * nk + torch.arange(nk, device=self.device))
                * self.max_len + pos[:, None]).reshape(-1)
        for li, lw in enumerate(self.layers):
            qkv = F.linear(self._rms(h, lw["ln1"]), *lw["qkv"]).view(m, nq + 2 * nk, d)
            qk = self._rope(qkv[:, :nq + nk], cos, sin)
            kc, vc = self.k[li], self.v[li]
            kc.view(-1, d).index_copy_(0, rows, qk[:, nq:].reshape(-1, d))
            vc.view(-1, d).index_copy_(0, rows, qkv[:, nq + nk:].reshape(-1, d))
            scores = torch.matmul(qk[:, :nq].reshape(m, nk, nq // nk, d), kc[:m, :, :span].transpose(-1, -2))
            weights = scores.float().mul_(self.scale).add_(bias).softmax(-1).to(self.dtype)
            att = torch.matmul(weights, vc[:m, :, :span]).reshape(m, nq * d)
            h = h + F.linear(att, *lw["o"])
            g, u = F.linear(self._rms(h, lw["ln2"]), *lw["gu"]).split(self.inter, dim=-1)
            h = h + F.linear(F.silu(g).mul_(u), *lw["down"])
        return F.linear(self._rms(h, self.norm), *self.lm_head).float()

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy slot ``src``'s first ``n`` cache rows to slot ``dst``."""
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :n], vc[dst, :, :n] = kc[src, :, :n], vc[src, :, :n]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_w)


def _prefix_embeds(model, tok, source: str) -> torch.Tensor:
    """``[soft prompt; embedded source]`` as ``[P, H]`` float (the soft prompt only for PEFT models)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    ids = torch.tensor(tok(source)["input_ids"], dtype=torch.long, device=base.device)
    emb = base.get_input_embeddings()(ids)
    if isinstance(model, PeftModel):
        n_virtual = int(model.active_peft_config.num_virtual_tokens)
        prompt = model.get_prompt(batch_size=1)[0, :n_virtual].to(emb.dtype)
        emb = torch.cat([prompt, emb], dim=0)
    return emb.detach()


def _fast_loop(model, tok, sources: Sequence[str], *, temperature: float, top_p: float, seed: int, slots: int,
               dtype: torch.dtype, ending: _Rules, prefilter: int,
               on_done: Callable[[int], None] | None) -> list[Drawn]:
    """Slot refill over :class:`LlamaDecoder`: the active samples always sit in slots ``0..m-1``."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    prefixes = {s: _prefix_embeds(model, tok, s) for s in dict.fromkeys(sources)}
    p_max = max(e.shape[0] for e in prefixes.values())
    slots = max(1, min(slots, len(sources)))
    dec = LlamaDecoder(base, dtype, slots, p_max + ending.budget)
    dev = dec.device
    n_layers = len(dec.layers)

    # each distinct prefix once: its K/V, kept aside, and the logits of the first new token
    stash: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}
    for s, emb in prefixes.items():
        first = dec.prefill(emb, 0)
        n = emb.shape[0]
        stash[s] = ([dec.k[li][0, :, :n].clone() for li in range(n_layers)],
                    [dec.v[li][0, :, :n].clone() for li in range(n_layers)], first)

    out = [ending.start() for _ in sources]
    pending = iter(range(len(sources)))
    sample: list[int] = []   # the sample in slot b; slots 0..m-1 are the active ones
    length: list[int] = []   # cache rows filled in slot b = the position of its next input token
    steps: list[int] = []    # tokens drawn so far by slot b's sample
    logits = torch.zeros(slots, dec.lm_head[0].shape[0], device=dev)

    def draw(rows: slice, ids: list[int], at: list[int]) -> list[int]:
        u = torch.from_numpy(uniforms(seed, ids, at)).to(dev)
        return nucleus_draw(ending.block(logits[rows], [out[i] for i in ids]), u, temperature, top_p,
                            prefilter).tolist()

    def load(b: int) -> bool:
        """The next pending sample into slot b: prefix K/V and first-token logits from the stash."""
        i = next(pending, -1)
        if i < 0:
            return False
        ks, vs, first = stash[sources[i]]
        n = ks[0].shape[1]
        for li in range(n_layers):
            dec.k[li][b, :, :n], dec.v[li][b, :, :n] = ks[li], vs[li]
        if b == len(sample):
            sample.append(i), length.append(n), steps.append(0)
        else:
            sample[b], length[b], steps[b] = i, n, 0
        logits[b] = first
        return True

    while len(sample) < slots and load(len(sample)):
        pass
    while sample:
        tokens = draw(slice(0, len(sample)), sample, steps)
        b = 0
        while b < len(sample):          # settle every slot: each ends with a token to feed, or is removed
            i = sample[b]
            t = tokens[b] = ending.choose(out[i], tokens[b])
            steps[b] += 1
            if not ending.add(out[i], t):
                b += 1
                continue
            if on_done:
                on_done(i)
            if load(b):                 # refilled: its first token comes from the stash logits
                tokens[b] = draw(slice(b, b + 1), [sample[b]], [0])[0]
                continue
            last = len(sample) - 1      # nothing pending: the last slot (not settled yet) moves here
            if last != b:
                dec.move(last, b, length[last])
                sample[b], length[b], steps[b], tokens[b] = sample[last], length[last], steps[last], tokens[last]
            sample.pop(), length.pop(), steps.pop(), tokens.pop()
        if not sample:
            break
        m = len(sample)
        logits[:m] = dec.step(torch.tensor(tokens, dtype=torch.long, device=dev),
                              torch.tensor(length, dtype=torch.long, device=dev))
        length = [n + 1 for n in length]
    return out


# ------------------------------------------------------------------------------------ generic path
def _generic_loop(model, tok, sources: Sequence[str], *, temperature: float, top_p: float, seed: int, slots: int,
                  ending: _Rules, pad: int, on_done: Callable[[int], None] | None) -> list[Drawn]:
    """Batches of ``slots`` samples through the model's own forward and KV cache (no refill)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    seq2seq = bool(getattr(base.config, "is_encoder_decoder", False))
    dev = base.device
    out = [ending.start() for _ in sources]
    for start in range(0, len(sources), slots):
        chunk = list(range(start, min(start + slots, len(sources))))
        embs = [_prefix_embeds(model, tok, sources[i]) for i in chunk]
        width = max(e.shape[0] for e in embs)
        b, hdim = len(chunk), embs[0].shape[1]
        x = torch.zeros(b, width, hdim, dtype=embs[0].dtype, device=dev)
        mask = torch.zeros(b, width, dtype=torch.long, device=dev)
        for r, e in enumerate(embs):  # causal: left-pad; seq2seq encoder: right-pad
            sl = slice(0, e.shape[0]) if seq2seq else slice(width - e.shape[0], width)
            x[r, sl], mask[r, sl] = e, 1
        if seq2seq:
            enc = base.get_encoder()(inputs_embeds=x, attention_mask=mask)
            start_id = base.config.decoder_start_token_id
            start_id = pad if start_id is None else start_id
            kw = {"encoder_outputs": enc, "attention_mask": mask,
                  "decoder_input_ids": torch.full((b, 1), start_id, dtype=torch.long, device=dev)}
        else:
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            kw = {"inputs_embeds": x, "attention_mask": mask, "position_ids": pos}
        cache, done = None, [False] * b
        for step in range(ending.budget):
            res = base(**kw, past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            u = torch.from_numpy(uniforms(seed, chunk, step)).to(dev)
            toks = nucleus_draw(ending.block(res.logits[:, -1], [out[i] for i in chunk]), u, temperature, top_p,
                                PREFILTER).tolist()
            toks = [t if done[r] else ending.choose(out[chunk[r]], t) for r, t in enumerate(toks)]
            for r, t in enumerate(toks):
                if not done[r] and ending.add(out[chunk[r]], t):
                    done[r] = True
                    if on_done:
                        on_done(chunk[r])
            if all(done):
                break
            nxt = torch.tensor([[pad if d else t] for t, d in zip(toks, done)], dtype=torch.long, device=dev)
            if seq2seq:
                kw = {"encoder_outputs": enc, "attention_mask": mask, "decoder_input_ids": nxt}
            else:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                kw = {"input_ids": nxt, "attention_mask": mask, "position_ids": kw["position_ids"][:, -1:] + 1}
    return out


# ------------------------------------------------------------------------------------ entry point
def uses_fast_path(model) -> bool:
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    cfg = base.config
    return (getattr(cfg, "model_type", None) in FAST_MODEL_TYPES and not cfg.is_encoder_decoder
            and getattr(cfg, "hidden_act", None) == "silu")


@torch.no_grad()
def draw_samples(model, tok, sources: Sequence[str], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, slots: int = 64, dtype: str = "bfloat16", stop_lines: int | None = None,
                 field_names: Sequence[str] | None = None,
                 on_done: Callable[[int], None] | None = None) -> list[Drawn]:
    """One sampled continuation per source (see the module doc); ``on_done(i)`` as each sample ends.

    ``stop_lines``: end a sample at the line break after its ``stop_lines``-th line (a serialisation
    with that many lines is complete there; :class:`Drawn` says which samples ended so rather than
    with EOS). ``field_names``: write ``"<name>:"`` at the start of line k for the model (the k-th
    name), so that a sample's lines carry the serialisation's field names in order; ignored (None
    returned by :func:`field_name_tokens`) for a tokenizer that merges line breaks with text."""
    if dtype == "auto":  # params' `auto`: bfloat16 where the model's device computes it natively
        from retrikt.device import resolve_dtype

        dtype = resolve_dtype(dtype, next(model.parameters()).device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    if tok.eos_token_id is None:
        raise ValueError("the generator's tokenizer has no EOS token; the generator cannot learn to stop")
    eos = int(tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if not sources:
        return []
    forced = field_name_tokens(tok, field_names) if field_names else None
    ending = _Rules(tok, eos, max_new_tokens, stop_lines, forced)
    if uses_fast_path(model):
        return _fast_loop(model, tok, sources, temperature=temperature, top_p=top_p, seed=seed, slots=slots,
                          dtype=DTYPES[dtype], ending=ending, prefilter=PREFILTER, on_done=on_done)
    return _generic_loop(model, tok, sources, temperature=temperature, top_p=top_p, seed=seed, slots=slots,
                         ending=ending, pad=pad, on_done=on_done)
