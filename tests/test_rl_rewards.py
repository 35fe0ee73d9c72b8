"""Golden tests for the RL reward components (values computed by hand in the comments)."""

import math

import numpy as np
import pytest

from retrikt.rl.rewards import (
    RewardWeights,
    compute_rewards,
    corpus_self_bleu,
    length_bounds,
    length_penalty,
    self_bleu,
)


def test_self_bleu_identical_texts_is_one():
    assert self_bleu(["A b c d", "a B c d"]) == pytest.approx([1.0, 1.0])


def test_self_bleu_single_or_empty_batch():
    assert self_bleu(["a b c d"]) == [0.0]
    assert self_bleu([]) == []
    assert corpus_self_bleu(["x"]) == 0.0


def test_self_bleu_disjoint_is_zero():
    # no unigram of either text occurs in the other: NLTK (and Texygen's self-BLEU) return 0 outright,
    # before any smoothing. (The hand-written BLEU this replaced smoothed it to 0.1 / 24^(1/4) = 0.0452.)
    assert self_bleu(["a b c d", "e f g h"]) == [0.0, 0.0]


def test_self_bleu_partial_overlap_step_by_step():
    texts = ["the cat sat on the mat", "the cat is on the mat", "a dog"]
    scores = self_bleu(texts)
    # hyp 0 vs refs {1, 2}: unigrams the:2 cat sat on mat -> clipped 2+1+0+1+1 = 5/6;
    # bigrams {the cat, on the, the mat} match -> 3/5; trigram {on the mat} -> 1/4;
    # 4-grams none -> 0.1/3 (smoothing); closest ref length 6 = c -> BP 1.
    h0 = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    # hyp 1 is symmetric to hyp 0 ("is" instead of "sat").
    # hyp 2 "a dog" shares no unigram with either reference -> 0 (NLTK, before smoothing).
    assert scores == pytest.approx([h0, h0, 0.0], rel=1e-9)
    assert h0 == pytest.approx(0.254066, abs=1e-6)
    assert corpus_self_bleu(texts) == pytest.approx(2 * h0 / 3)


def test_self_bleu_short_hypothesis_is_smoothed_not_zero():
    # hyp "x y" vs ref "x z w v q": unigram x -> 1/2; bigram none -> 0.1/1; 3-/4-grams: no hypothesis
    # n-grams at all -> 0.1/max(1, 0) each; c=2 < r=5 -> BP = e^(1-5/2). No warning reaches the caller.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = self_bleu(["x y", "x z w v q"])
    assert s[0] == pytest.approx(math.exp(1 - 5 / 2) * (1 / 2 * 0.1 * 0.1 * 0.1) ** 0.25, rel=1e-12)


def test_self_bleu_clipping_and_brevity():
    # hyp "a a a a" vs ref "a b": unigram clipped 1/4; bigram/trigram/4-gram: 0.1/3, 0.1/2, 0.1/1;
    # c=4 > r=2 -> BP 1. hyp "a b" vs ref "a a a a": unigram 1/2, bigram "a b" unmatched 0.1/1,
    # 3/4-grams 0.1/1 each; c=2 < r=4 -> BP = e^(1-2).
    s = self_bleu(["a a a a", "a b"])
    assert s[0] == pytest.approx((1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1) ** 0.25)
    assert s[1] == pytest.approx(math.exp(-1) * (1 / 2 * 0.1 * 0.1 * 0.1) ** 0.25)


def test_length_bounds_percentiles():
    # numpy linear interpolation over 1..100: 5th pct at index 4.95 -> 5.95; 95th at 94.05 -> 95.05
    assert length_bounds(list(range(1, 101))) == pytest.approx((5.95, 95.05))
    assert length_bounds([3, 3, 3]) == (3.0, 3.0)


@pytest.mark.parametrize(
    "n, expected",
    [(10, 0.0), (15, 0.0), (20, 0.0), (5, 2 * 0.5), (0, 2 * 1.0), (30, 2 * 0.5), (21, 2 * 0.05)],
)
def test_length_penalty(n, expected):
    assert length_penalty(n, 10, 20, scale=2.0) == pytest.approx(expected)


def test_compute_rewards_components():
    texts = ["good a b", "bad", "good c d"]
    parse_fn = lambda t: {"text": t} if t.startswith("good") else None  # noqa: E731
    seen = []

    def prob_fn(examples):
        seen.append([e["text"] for e in examples])
        return np.array([[0.2, 0.8], [0.6, 0.4]])

    w = RewardWeights(confidence=1.0, diversity=0.5, length=0.1, parse_penalty=1.0)
    out = compute_rewards(texts, [1, 0, 0], parse_fn, prob_fn, w, (2, 3))
    assert seen == [["good a b", "good c d"]]  # only parsed samples reach the reward model
    # row j of prob_fn belongs to the j-th parsed sample: [0.2, 0.8][1] and [0.6, 0.4][0]
    assert out["confidence"] == pytest.approx([0.8, 0.0, 0.6])
    assert out["parse_fail"] == [0.0, 1.0, 0.0]
    assert out["length_penalty"] == pytest.approx([0.0, 0.5, 0.0])  # "bad": (2 - 1) / 2
    div = [1 - s for s in self_bleu(texts)]
    assert out["diversity"] == pytest.approx(div)
    expected = [0.8 + 0.5 * div[0], 0.5 * div[1] - 0.1 * 0.5 - 1.0, 0.6 + 0.5 * div[2]]
    assert out["reward"] == pytest.approx(expected)
    assert out["mean_reward"] == pytest.approx(np.mean(expected))
    assert out["mean_confidence"] == pytest.approx(1.4 / 3)


def test_compute_rewards_nothing_parsed():
    out = compute_rewards(["x", "y"], [0, 1], lambda t: None, lambda e: 1 / 0, RewardWeights(), (1, 1))
    assert out["confidence"] == [0.0, 0.0] and out["parse_fail"] == [1.0, 1.0]
