"""Reward components for the RL stage (step 2 of RetriKT): confidence, diversity, length, parse.

confidence is the reward model's probability of the conditioning label given the parsed sample,
p_RM(label | sample) (not an accuracy: it is a probability, averaged over samples).

Pure Python + numpy (+ NLTK's BLEU). The stage builds ``parse_fn`` / ``prob_fn`` closures (sample parser, teacher
reward model) and hands :func:`compute_rewards` to the RL trainer as ``reward_fn(texts)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np


def self_bleu(texts: list[str], max_n: int = 4) -> list[float]:
    """Per-text BLEU-``max_n`` against all other texts of the batch: the self-BLEU of Texygen (Zhu et
    al. 2018) that synthetic-data papers report, i.e. NLTK's ``sentence_bleu`` with uniform weights and
    ``SmoothingFunction().method1`` (a zero n-gram count becomes 0.1 / #hyp n-grams). NLTK returns 0
    for a text that shares no unigram with any other. Tokens: lower-cased whitespace words (Texygen's
    ``word_tokenize`` needs NLTK data that is not on PyPI).

    A batch with fewer than two texts has no references and scores 0.0 everywhere.
    """
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    toks = [t.lower().split() for t in texts]
    if len(toks) < 2:
        return [0.0] * len(toks)
    weights, smooth = (1.0 / max_n,) * max_n, SmoothingFunction().method1
    with warnings.catch_warnings():  # NLTK warns about every hypothesis shorter than max_n
        warnings.simplefilter("ignore", UserWarning)
        return [float(sentence_bleu(toks[:i] + toks[i + 1 :], h, weights, smoothing_function=smooth))
                for i, h in enumerate(toks)]


def corpus_self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean :func:`self_bleu` of a batch (0.0 for an empty batch)."""
    scores = self_bleu(texts, max_n)
    return float(np.mean(scores)) if scores else 0.0


def length_bounds(lengths: Sequence[float], low_pct: float = 5, high_pct: float = 95) -> tuple[float, float]:
    """(L_min, L_max): the ``low_pct`` / ``high_pct`` percentiles of the train split's lengths."""
    lo, hi = np.percentile(np.asarray(lengths, dtype=float), [low_pct, high_pct])
    return float(lo), float(hi)


def length_penalty(n: float, l_min: float, l_max: float, scale: float = 1.0) -> float:
    """0 inside [l_min, l_max]; ``scale * (l_min - n) / l_min`` below, ``scale * (n - l_max) / l_max`` above."""
    if n < l_min:
        return scale * (l_min - n) / max(l_min, 1e-8)
    if n > l_max:
        return scale * (n - l_max) / max(l_max, 1e-8)
    return 0.0


@dataclass
class RewardWeights:
    """total = confidence * p_RM(label | sample) + diversity * (1 - self-BLEU) - length * length_penalty
    - parse_penalty * unparsable (each field weights the term it is named after)."""

    confidence: float = 1.0
    diversity: float = 0.5
    length: float = 0.1
    parse_penalty: float = 1.0


def compute_rewards(
    texts: list[str],
    labels: Sequence[int],
    parse_fn: Callable[[str], dict | None],
    prob_fn: Callable[[list[dict]], np.ndarray],
    weights: RewardWeights,
    len_bounds: tuple[float, float],
    length_fn: Callable[[str], int] = lambda t: len(t.split()),
    complete: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Per-sample rewards and their components for generated ``texts`` conditioned on ``labels``.

    confidence_i = prob_fn(parsed)[j, labels_i] for the j-th parsed sample, 0 when ``parse_fn``
    returns None (which also costs ``weights.parse_penalty``); diversity_i = 1 - self-BLEU_i over
    the whole batch; length penalty from :func:`length_penalty` (scale 1, weighted by
    ``weights.length``) on ``length_fn(text)`` (default: whitespace words). A text marked incomplete in
    ``complete`` (cut by the token budget before EOS) counts as unparsable, whatever it contains.
    Returns lists ``reward, confidence, diversity, length_penalty, parse_fail`` and their means
    under ``mean_<name>``.
    """
    n = len(texts)
    complete = [True] * n if complete is None else list(complete)
    parsed = [parse_fn(t) if done else None for t, done in zip(texts, complete)]
    ok = [i for i, p in enumerate(parsed) if p is not None]
    conf = np.zeros(n)
    if ok:
        probs = np.asarray(prob_fn([parsed[i] for i in ok]), dtype=float)
        conf[ok] = probs[np.arange(len(ok)), [int(labels[i]) for i in ok]]
    fail = np.array([p is None for p in parsed], dtype=float)
    div = 1.0 - np.asarray(self_bleu(texts), dtype=float) if n else np.zeros(0)
    lpen = np.array([length_penalty(length_fn(t), *len_bounds) for t in texts], dtype=float)
    total = weights.confidence * conf + weights.diversity * div - weights.length * lpen - weights.parse_penalty * fail
    out: dict[str, Any] = {
        "reward": total.tolist(),
        "confidence": conf.tolist(),
        "diversity": div.tolist(),
        "length_penalty": lpen.tolist(),
        "parse_fail": fail.tolist(),
    }
    out.update({f"mean_{k}": float(np.mean(v)) if n else 0.0 for k, v in list(out.items())})
    return out
