"""Token alignment between a teacher and a student that tokenize differently.

MGSKD and AD-KD compare teacher and student token by token. When the teacher reads other token ids
(e.g. all-mpnet-base-v2 teaching all-MiniLM-L6-v2 students: `<s> A </s></s> B </s>` against
`[CLS] A [SEP] B [SEP]`, and other word pieces here and there), the teacher's per-token outputs are
carried onto the student's tokens through the characters they cover:

* ``A[i, j] = 1`` when student token i and teacher token j belong to the same input text (premise,
  hypothesis, ...) and their character spans (the fast tokenizers' offset mappings) overlap;
* special tokens have no characters: they match by the gap they sit in, i.e. how many input texts
  precede them (`[CLS]`/`<s>`: 0; the separator(s) after the first text: 1; the last one: 2).

Hidden states (MGSKD) are *averaged* over the teacher tokens a student token overlaps
(:func:`pool_onto`: rows of A normalised); attributions (AD-KD) are *split*: each teacher token's
attribution is shared equally among the student tokens it overlaps (columns of A normalised), so no
mass is created or lost, and the result is renormalised over tokens as the attributions themselves are.
A student token that overlaps no teacher token (e.g. beyond the teacher's truncation) gets zeros;
:func:`token_maps` counts them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _tokens(clf, row: dict) -> list[tuple[int | None, int, int, int]]:
    """(text index or None for a special token, gap, start, end) of each token of ``row`` as ``clf``
    tokenizes it (truncated to its ``max_length``, unpadded: exactly the real tokens of
    :meth:`retrikt.classifier.Classifier.encode`)."""
    tok = clf.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{type(tok).__name__}: token alignment needs a fast tokenizer (offset mappings)")
    texts = clf.texts(row)
    enc = tok(*texts, truncation=True, max_length=clf.max_length, return_offsets_mapping=True)
    seq = enc.sequence_ids()
    shift = len(clf.pair_prefix)  # offsets into the rendered second text, as every tokenizer sees it
    out, seen = [], set()
    for sid, (start, end) in zip(seq, enc["offset_mapping"]):
        if sid is not None:
            seen.add(sid)
        if sid == 1:
            start, end = start - shift, end - shift  # the separator itself ends at 0: it overlaps nothing
        out.append((sid, len(seen) if sid is None else sid, start, end))
    return out


def alignment(student, teacher, row: dict) -> torch.Tensor:
    """``A [T_s, T_t]`` (0/1, float32) over the real tokens of ``row`` as the student and the teacher
    (:class:`retrikt.classifier.Classifier`) tokenize it: see the module docstring."""
    s, t = _tokens(student, row), _tokens(teacher, row)
    a = torch.zeros(len(s), len(t))
    for i, (si, sg, ss, se) in enumerate(s):
        for j, (ti, tg, ts, te) in enumerate(t):
            if si is None or ti is None:
                a[i, j] = float(si is None and ti is None and sg == tg)
            else:
                a[i, j] = float(si == ti and ss < te and ts < se)
    return a


def token_maps(student, teacher, rows: Sequence[dict]) -> tuple[list[torch.Tensor], int, int]:
    """The alignment of each row, the number of student tokens that matched no teacher token, and the
    number of student tokens."""
    maps = [alignment(student, teacher, r) for r in rows]
    unmatched = sum(int((m.sum(1) == 0).sum()) for m in maps)
    return maps, unmatched, sum(m.shape[0] for m in maps)


def pool_onto(a: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """``[T_t, H]`` teacher features -> ``[T_s, H]``: each student token's mean over the teacher tokens
    it overlaps (zeros where none)."""
    a = a.to(teacher_tokens)
    return (a / a.sum(1, keepdim=True).clamp_min(1.0)) @ teacher_tokens


def split_onto(a: torch.Tensor, teacher_attr: torch.Tensor, norm: float = 2.0) -> torch.Tensor:
    """``[T_t, V]`` teacher attributions -> ``[T_s, V]``: each teacher token's attribution shared
    equally among the student tokens it overlaps, then normalised over tokens (p = ``norm``) per view,
    as :func:`retrikt.distill.losses.attribution` normalises."""
    a = a.to(teacher_attr)
    return F.normalize((a / a.sum(0, keepdim=True).clamp_min(1.0)) @ teacher_attr, p=norm, dim=0)
