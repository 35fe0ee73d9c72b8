"""Statistics of the report. Every metric value comes from the task registry (:meth:`Task.compute_metrics`
and, for resamples, :meth:`Task.metric_on_rows`, the same arithmetic).

* ``std`` is the sample standard deviation over seeds (ddof=1); with one seed it is ``None``.
* The best baseline has the highest mean primary metric among the configured
  :data:`retrikt.methods.BASELINES` (trained on the task data only); a tie goes to the one listed first.
* Paired bootstrap: the validation examples are resampled with replacement ``samples`` times; the same
  resampled rows serve both methods. On each resample a method's score is the mean over seeds of the
  metric of that seed's predictions, and the statistic is A's score minus B's. The CI is the percentile
  interval at ``confidence``; the two-sided p-value is
  ``min(1, 2 * min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1))``.
* Across tasks (``pooled_bootstrap``): the same, resampling each task's rows within the task and
  averaging the per-task differences with equal weight; ``sign_test`` counts the tasks A wins.
* Majority class: the most frequent label of the train split (ties: the lowest class id), predicted for
  every validation example.
* Gap closed: ``(student - finetune) / (teacher - finetune)`` on the primary metric: 0 = no better than
  fine-tuning the student on the task data, 1 = as good as the teacher. ``None`` when the teacher is
  not better than fine-tuning (no gap to close: the ratio would say nothing) or either is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from retrikt.tasks import Task

GAP_EPS = 1e-9  # teacher - finetune below this: no gap to close


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of ``values``; std has ddof=1 and is None for a single value.

    The mean stays an int when every value is an int and the mean is whole (parameter counts, bytes).
    """
    if not values:
        raise ValueError("mean_std: no values")
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    whole = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values) and mean.is_integer()
    std = float(arr.std(ddof=1)) if len(arr) >= 2 else None
    return {"mean": int(mean) if whole else mean, "std": std, "n": len(arr)}


@dataclass(frozen=True)
class Bootstrap:
    """Paired bootstrap of ``score(a) - score(b)`` over examples (see the module docstring)."""

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    samples: int
    confidence: float
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "ci": [self.ci_low, self.ci_high], "p_value": self.p_value,
                "samples": self.samples, "confidence": self.confidence, "examples": self.examples}


def _deltas(task: Task, labels: np.ndarray, preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray],
            metric: str, samples: int, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """(score(a) - score(b) on all rows, the same on ``samples`` paired resamples of the rows)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0 or not preds_a or not preds_b:
        raise ValueError("paired_bootstrap: need examples and predictions for both methods")
    rows = rng.integers(0, n, size=(samples, n))

    def mean_score(preds: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
        return np.mean([task.metric_on_rows(labels, np.asarray(p, dtype=np.int64), idx, metric) for p in preds],
                       axis=0)

    full = np.arange(n)[None]
    estimate = float((mean_score(preds_a, full) - mean_score(preds_b, full))[0])
    return estimate, mean_score(preds_a, rows) - mean_score(preds_b, rows)


def _summarise(estimate: float, deltas: np.ndarray, samples: int, confidence: float, examples: int) -> Bootstrap:
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(deltas, [tail, 100.0 - tail])
    extreme = min(int((deltas <= 0).sum()), int((deltas >= 0).sum())) + 1
    p_value = min(1.0, 2.0 * extreme / (samples + 1))
    return Bootstrap(estimate, float(low), float(high), p_value, samples, confidence, examples)


def paired_bootstrap(task: Task, labels: np.ndarray, preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray],
                     metric: str, *, samples: int, confidence: float, rng: np.random.Generator) -> Bootstrap:
    """Bootstrap CI and two-sided p-value of (mean over seeds of metric(a)) - (same for b).

    ``preds_a``/``preds_b`` hold one prediction array per seed, aligned with ``labels``; every
    resample draws ``len(labels)`` example indices with replacement and scores both methods on them.
    """
    estimate, deltas = _deltas(task, labels, preds_a, preds_b, metric, samples, rng)
    return _summarise(estimate, deltas, samples, confidence, len(labels))


@dataclass(frozen=True)
class Comparison:
    """One task's side of a pooled comparison: A's and B's predictions per seed on its validation rows."""

    task: Task
    labels: np.ndarray
    preds_a: Sequence[np.ndarray]
    preds_b: Sequence[np.ndarray]
    metric: str


def pooled_bootstrap(parts: Sequence[Comparison], *, samples: int, confidence: float,
                     rng: np.random.Generator) -> Bootstrap:
    """Paired bootstrap of the mean over tasks of (score(a) - score(b)), stratified by task.

    Each resample draws every task's validation rows with replacement *within that task* (in the order
    of ``parts``, from the one ``rng``) and averages the per-task differences with equal weight, the
    way a table's "average" column weighs tasks. One part gives exactly :func:`paired_bootstrap`.
    """
    if not parts:
        raise ValueError("pooled_bootstrap: no tasks")
    per_task = [_deltas(c.task, c.labels, c.preds_a, c.preds_b, c.metric, samples, rng) for c in parts]
    estimate = float(np.mean([e for e, _ in per_task]))
    deltas = np.mean([d for _, d in per_task], axis=0)
    return _summarise(estimate, deltas, samples, confidence, sum(len(c.labels) for c in parts))


def sign_test(deltas: Sequence[float]) -> dict[str, Any]:
    """Exact two-sided sign test over per-task differences (ties dropped): under H0 each non-zero
    difference is positive with probability 1/2; ``p = min(1, 2 * P(X <= min(pos, neg)))``, X ~ Bin(n, 1/2)."""
    from math import comb

    pos = sum(1 for d in deltas if d > 0)
    neg = sum(1 for d in deltas if d < 0)
    n = pos + neg
    p_value = 1.0 if n == 0 else min(1.0, 2.0 * sum(comb(n, k) for k in range(min(pos, neg) + 1)) / 2 ** n)
    return {"positive": pos, "negative": neg, "ties": len(deltas) - n, "p_value": p_value}


def best_baseline(rows: Mapping[str, Mapping[str, Any]], primary: str, baselines: Sequence[str]) -> str | None:
    """The method of ``baselines`` present in ``rows`` with the highest mean ``primary`` (ties: listed first)."""
    candidates = [m for m in baselines if m in rows]
    if not candidates:
        return None
    return max(candidates, key=lambda m: (rows[m]["metrics"][primary]["mean"], -candidates.index(m)))


def majority_class(train_labels: Sequence[int], num_labels: int) -> int:
    """The most frequent train label (ties: the lowest class id)."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_labels)
    return int(counts.argmax())


def gap_closed(student: float | None, teacher: float | None, finetune: float | None) -> float | None:
    """``(student - finetune) / (teacher - finetune)``; None without a gap (see the module docstring)."""
    if student is None or teacher is None or finetune is None or teacher - finetune < GAP_EPS:
        return None
    return (student - finetune) / (teacher - finetune) + 0.0  # + 0.0: no -0.0


def rl_before_after(rl: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Pair up the rl stage's metrics written as ``before_x``/``x_before``/``before.x`` (and the same for after)."""
    from retrikt.tracking import flatten

    out: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    for key, value in flatten(rl).items():
        if not is_number(value):
            continue
        for when in out:
            for sep in ("_", "."):
                if key.startswith(when + sep):
                    out[when][key[len(when) + 1:]] = value
                elif key.endswith(sep + when):
                    out[when][key[:-len(when) - 1]] = value
    return out
