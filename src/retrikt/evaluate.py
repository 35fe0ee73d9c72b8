"""`evaluate` stage: one report over every task, student size, method and seed.

Reads what the other stages wrote (see :mod:`retrikt.paths`) and writes, all atomically:

``reports/results.json``
    Every number: per task and student size, one row per model (teacher, then the configured methods
    in the order of :data:`retrikt.params.METHODS`) with each task metric as mean ± std over seeds
    and the costs (parameters, model/store bytes, latency, training time); the best baseline; RetriKT
    minus the best baseline with a paired bootstrap CI and p-value; knowledge-store quality; PPO
    before/after; the inputs that were missing.
``reports/results.md``
    The same numbers as markdown tables (a view of results.json, nothing more).
``reports/metrics.json``
    Compact DVC metrics for ``dvc exp show``/``dvc exp diff``: primary-metric means, the teacher and
    the delta vs the best baseline with its CI and p-value.
``reports/figures/<task>/*.png``
    Learning curves, PPO curves, one confusion matrix per model (first seed), a bar chart of methods.

Statistics
    * ``std`` is the sample standard deviation over seeds (ddof=1); with one seed it is ``null``.
    * The best baseline has the highest mean primary metric among finetune, vanilla_kd, mgskd, adkd
      and retrikt_kd (those configured); a tie goes to the one listed first.
    * Paired bootstrap: the validation examples are resampled with replacement ``bootstrap_samples``
      times (one ``numpy`` Generator per task and size, seeded from ``(seed, crc32(task), layers)``);
      the same resampled rows serve both methods. On each resample a method's score is the mean over
      seeds of the metric of that seed's predictions, and the statistic is RetriKT's score minus the
      baseline's. The CI is the percentile interval at ``evaluate.confidence``; the two-sided p-value
      is ``min(1, 2 * min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1))``.

Missing optional inputs (plot rows, teacher/generate/ppo/index/prompt_tune metrics, predictions) are
listed in the report; a missing metrics file of a configured student is an error (one line naming it).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from retrikt import paths
from retrikt.io import DataError, atomic_write_json, atomic_write_text, read_json
from retrikt.tracking import timings_path
from retrikt.params import METHODS, Params
from retrikt.tasks import Task, get_task

log = logging.getLogger(__name__)

RESULTS_JSON = paths.REPORTS / "results.json"
RESULTS_MD = paths.REPORTS / "results.md"
METRICS_JSON = paths.REPORTS / "metrics.json"
PROPOSED = "retrikt"
# RetriKT is compared with the best of these: the task-data baselines and KD on the store (no retrieval)
BASELINE_CANDIDATES = ("finetune", "vanilla_kd", "mgskd", "adkd", "retrikt_kd")
COST_KEYS = ("parameters", "model_bytes", "store_bytes", "latency_ms", "forward_latency_ms", "train_seconds")
PPO_CURVE_KEYS = ("reward", "acc", "div", "len", "kl", "self_bleu")
STD_NOTE = "sample standard deviation over seeds (ddof=1); null when there is a single seed"
_PNG_DPI = 100


# --------------------------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------------------------- #
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


def confusion_counts(labels: np.ndarray, preds: np.ndarray, num_labels: int, rows: np.ndarray) -> np.ndarray:
    """Confusion matrices ``[B, true, pred]`` of the example subsets ``rows`` (``[B, m]`` indices)."""
    rows = np.atleast_2d(rows)
    c = num_labels
    cells = labels[rows] * c + preds[rows] + (np.arange(rows.shape[0]) * c * c)[:, None]
    return np.bincount(cells.ravel(), minlength=rows.shape[0] * c * c).reshape(rows.shape[0], c, c)


def metric_from_confusion(cm: np.ndarray, metric: str) -> np.ndarray:
    """A task metric (as :meth:`Task.compute_metrics` defines it) for each confusion matrix in ``cm``."""
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    true_count, pred_count = cm.sum(axis=2), cm.sum(axis=1)
    if metric == "accuracy":
        return tp.sum(axis=1) / n
    if metric in ("f1", "macro_f1"):
        denom = true_count + pred_count  # = 2tp + fp + fn; zero_division -> 0
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
        return f1[:, 1] if metric == "f1" else f1.mean(axis=1)
    if metric == "mcc":
        cov = tp.sum(axis=1) * n - (true_count * pred_count).sum(axis=1)
        denom = np.sqrt((n**2 - (pred_count**2).sum(axis=1)) * (n**2 - (true_count**2).sum(axis=1)))
        return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    raise ValueError(f"unknown metric {metric!r}")


def score(labels: np.ndarray, preds: np.ndarray, metric: str, num_labels: int) -> float:
    """``metric`` of ``preds`` against ``labels`` on all examples."""
    rows = np.arange(len(labels))[None]
    return float(metric_from_confusion(confusion_counts(labels, preds, num_labels, rows), metric)[0])


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


def paired_bootstrap(labels: np.ndarray, preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray], metric: str,
                     num_labels: int, *, samples: int, confidence: float, rng: np.random.Generator) -> Bootstrap:
    """Bootstrap CI and two-sided p-value of (mean over seeds of metric(a)) - (same for b).

    ``preds_a``/``preds_b`` hold one prediction array per seed, aligned with ``labels``; every
    resample draws ``len(labels)`` example indices with replacement and scores both methods on them.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0 or not preds_a or not preds_b:
        raise ValueError("paired_bootstrap: need examples and predictions for both methods")
    rows = rng.integers(0, n, size=(samples, n))

    def mean_score(preds: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
        per_seed = [metric_from_confusion(confusion_counts(labels, np.asarray(p, dtype=np.int64), num_labels, idx),
                                          metric) for p in preds]
        return np.mean(per_seed, axis=0)

    full = np.arange(n)[None]
    estimate = float((mean_score(preds_a, full) - mean_score(preds_b, full))[0])
    deltas = mean_score(preds_a, rows) - mean_score(preds_b, rows)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(deltas, [tail, 100.0 - tail])
    extreme = min(int((deltas <= 0).sum()), int((deltas >= 0).sum())) + 1
    p_value = min(1.0, 2.0 * extreme / (samples + 1))
    return Bootstrap(estimate, float(low), float(high), p_value, samples, confidence, n)


def best_baseline(rows: Mapping[str, Mapping[str, Any]], primary: str) -> str | None:
    """The baseline (of :data:`BASELINE_CANDIDATES` present in ``rows``) with the highest mean ``primary``."""
    candidates = [m for m in BASELINE_CANDIDATES if m in rows]
    if not candidates:
        return None
    return max(candidates, key=lambda m: (rows[m]["metrics"][primary]["mean"], -candidates.index(m)))


def ppo_before_after(ppo: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Pair up PPO metrics written as ``before_x``/``x_before``/``before.x`` (and the same for after)."""
    out: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    for key, value in _flatten(ppo).items():
        if not _is_number(value):
            continue
        for when in out:
            for sep in ("_", "."):
                if key.startswith(when + sep):
                    out[when][key[len(when) + 1:]] = value
                elif key.endswith(sep + when):
                    out[when][key[:-len(when) - 1]] = value
    return out


# --------------------------------------------------------------------------------------------- #
# Reading inputs
# --------------------------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Predictions:
    """One model's validation predictions (``paths.predictions``)."""

    path: Path
    idx: list
    labels: np.ndarray
    preds: np.ndarray


def load_predictions(path: Path, num_labels: int) -> Predictions:
    """Read and check a predictions file; DataError naming the file when it is malformed."""
    obj = read_json(path)
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), list) for k in ("idx", "label", "pred")):
        raise DataError(f"{path}: expected an object with 'idx', 'label' and 'pred' lists")
    if not obj["idx"] or not len(obj["idx"]) == len(obj["label"]) == len(obj["pred"]):
        raise DataError(f"{path}: 'idx', 'label' and 'pred' must be non-empty and of equal length")
    arrays = []
    for key in ("label", "pred"):
        arr = np.asarray(obj[key])
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= num_labels:
            raise DataError(f"{path}: '{key}' must be a list of class ids in 0..{num_labels - 1}")
        arrays.append(arr.astype(np.int64))
    return Predictions(path, list(obj["idx"]), arrays[0], arrays[1])


class _TaskReader:
    """Reads one task's files: records missing optional inputs, checks predictions are paired."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.missing: list[str] = []
        self.warnings: list[str] = []
        self.reference: Predictions | None = None

    def optional(self, path: Path) -> Any | None:
        if not path.exists():
            self.missing.append(path.as_posix())
            return None
        return read_json(path)

    def metrics(self, path: Path, required: bool) -> dict[str, Any] | None:
        """A metrics file holding every task metric; missing -> FileNotFoundError if required."""
        if required and not path.exists():
            raise FileNotFoundError(f"{path}: missing student metrics (a configured method, size and seed); "
                                    "run its train_student stage first")
        obj = self.optional(path)
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a JSON object")
        timings = timings_path(path)  # wall-clock costs live in the parallel reports/timings/ tree
        if timings.exists():
            obj = {**read_json(timings), **obj}
        for key in self.task.metrics:
            if not _is_number(obj.get(key)):
                raise DataError(f"{path}: missing or non-numeric metric '{key}'")
        return obj

    def predictions(self, name: str) -> Predictions | None:
        path = paths.predictions(self.task.name, name)
        if not path.exists():
            self.missing.append(path.as_posix())
            return None
        pred = load_predictions(path, self.task.num_labels)
        ref = self.reference
        if ref is None:
            self.reference = pred
        elif pred.idx != ref.idx or not np.array_equal(pred.labels, ref.labels):
            raise DataError(f"{path}: validation rows (idx/label) differ from {ref.path}; "
                            "paired tests need the same rows")
        return pred

    def check_agreement(self, pred: Predictions, metrics: Mapping[str, Any], what: str) -> None:
        """Warn when the metrics file disagrees with the metrics recomputed from the predictions."""
        for key in self.task.metrics:
            recomputed = score(pred.labels, pred.preds, key, self.task.num_labels)
            if abs(recomputed - float(metrics[key])) > 1e-6:
                self.warnings.append(f"{what}: {key} is {float(metrics[key]):.6f} in the metrics file but "
                                     f"{recomputed:.6f} from {pred.path.as_posix()}")


# --------------------------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------------------------- #
def _row(task: Task, files: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    metrics = {}
    for key in task.metrics:
        values = [float(f[key]) for f in files]
        metrics[key] = {**mean_std(values), "values": values}
    cost = {k: (mean_std([f[k] for f in files]) if all(_is_number(f.get(k)) for f in files) else None)
            for k in COST_KEYS}
    return {"seeds": list(seeds), "metrics": metrics, "cost": cost}


@dataclass
class _Loaded:
    """One task's report plus what its figures need (drawn once every task has been read)."""

    report: dict[str, Any]
    reader: _TaskReader
    teacher_pred: Predictions | None
    preds: dict[str, dict[str, list[Predictions | None]]]


def _task_report(params: Params, task: Task) -> _Loaded:
    reader = _TaskReader(task)
    seeds, primary = params.seeds, task.metrics[0]
    methods = [m for m in METHODS if m in params.student.methods]
    teacher_file = reader.metrics(paths.metrics(task.name, "teacher"), required=False)
    teacher_pred = reader.predictions("teacher")
    if teacher_file is not None and teacher_pred is not None:
        reader.check_agreement(teacher_pred, teacher_file, "teacher")
    teacher_row = _row(task, [teacher_file], [params.seed]) if teacher_file is not None else None

    sizes: dict[str, Any] = {}
    all_preds: dict[str, dict[str, list[Predictions | None]]] = {}
    for layers in params.student.layers:
        rows: dict[str, Any] = {"teacher": teacher_row} if teacher_row is not None else {}
        preds: dict[str, list[Predictions | None]] = {}
        for method in methods:
            files = [reader.metrics(paths.student_metrics(task.name, method, layers, s), required=True) for s in seeds]
            rows[method] = _row(task, files, seeds)
            loaded = [reader.predictions(f"{method}-L{layers}-s{s}") for s in seeds]
            for s, pred, file in zip(seeds, loaded, files):
                if pred is not None:
                    reader.check_agreement(pred, file, f"{method}-L{layers}-s{s}")
            preds[method] = loaded
        best = best_baseline(rows, primary)
        sizes[f"L{layers}"] = {"layers": layers, "rows": rows, "best_baseline": best,
                               "comparison": _compare(params, task, layers, rows, preds, best)}
        all_preds[f"L{layers}"] = preds

    ppo = reader.optional(paths.metrics(task.name, "ppo")) if params.rl.enabled else None
    report = {
        "metrics": list(task.metrics), "primary": primary, "labels": list(task.labels),
        "validation_examples": len(reader.reference.idx) if reader.reference is not None else None,
        "students": sizes,
        "store": reader.optional(paths.metrics(task.name, "generate")),
        "index": reader.optional(paths.metrics(task.name, "index")),
        "prompt_tune": reader.optional(paths.metrics(task.name, "prompt_tune")),
        "ppo": None if ppo is None else {**ppo_before_after(ppo), "metrics": ppo},
        "figures": [], "missing": reader.missing, "warnings": reader.warnings,  # lists filled in as we go
    }
    return _Loaded(report, reader, teacher_pred, all_preds)


def _compare(params: Params, task: Task, layers: int, rows: Mapping[str, Any],
             preds: Mapping[str, list[Predictions | None]], best: str | None) -> dict[str, Any] | None:
    """RetriKT - best baseline on the primary metric, with the paired bootstrap when predictions exist."""
    if best is None or PROPOSED not in rows:
        return None
    primary = task.metrics[0]
    ours, theirs = rows[PROPOSED]["metrics"][primary]["mean"], rows[best]["metrics"][primary]["mean"]
    out: dict[str, Any] = {"metric": primary, "method": PROPOSED, "baseline": best, "delta": ours - theirs,
                           "bootstrap": None}
    a, b = preds[PROPOSED], preds[best]
    if all(p is not None for p in (*a, *b)):
        rng = np.random.default_rng([params.seed, zlib.crc32(task.name.encode()), layers])
        out["bootstrap"] = paired_bootstrap(a[0].labels, [p.preds for p in a], [p.preds for p in b], primary,
                                            task.num_labels, samples=params.evaluate.bootstrap_samples,
                                            confidence=params.evaluate.confidence, rng=rng).to_dict()
    return out


def compact_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The small metrics.json dict: per task, teacher and per size primary-metric means + delta."""
    out: dict[str, Any] = {}
    for name, t in results["tasks"].items():
        primary, entry = t["primary"], {}
        for size, s in t["students"].items():
            block: dict[str, Any] = {}
            for model, row in s["rows"].items():
                if model == "teacher":
                    entry["teacher"] = {primary: row["metrics"][primary]["mean"]}
                else:
                    block[model] = {primary: row["metrics"][primary]["mean"]}
            comp = s["comparison"]
            if comp is not None:
                block["delta_vs_best"] = comp["delta"]
                if comp["bootstrap"] is not None:
                    low, high = comp["bootstrap"]["ci"]
                    block.update(delta_ci_low=low, delta_ci_high=high, delta_p_value=comp["bootstrap"]["p_value"])
            entry[size] = block
        out[name] = entry
    return out


def build_results(params: Params, figures: bool = True) -> dict[str, Any]:
    """Read and check every input, then draw the figures; return the results.json dict.

    With ``figures=False`` nothing is written (and the curve files, read only for figures, are not listed).
    """
    loaded = {name: _task_report(params, get_task(name)) for name in params.tasks}
    for name, t in loaded.items():
        if figures:
            t.report["figures"] = _task_figures(params, t.reader, t.report, t.teacher_pred, t.preds)
        for w in t.reader.warnings:
            log.warning("%s: %s", name, w)
    return {
        "seeds": list(params.seeds), "layers": list(params.student.layers), "rl_enabled": params.rl.enabled,
        "methods": [m for m in METHODS if m in params.student.methods], "std": STD_NOTE,
        "bootstrap": {"samples": params.evaluate.bootstrap_samples, "confidence": params.evaluate.confidence,
                      "seed": params.seed, "unit": "validation examples (paired; mean over seeds per resample)",
                      "ci": "percentile", "p_value": "two-sided, min(1, 2*min(#{d*<=0}+1, #{d*>=0}+1)/(B+1))"},
        "tasks": {name: t.report for name, t in loaded.items()},
    }


def evaluate(params: Params, run: Any) -> dict[str, Any]:
    """The ``evaluate`` stage: write results.json/.md, metrics.json and figures; log to ``run``.

    ``run`` is the stage's :class:`retrikt.tracking.StageRun` (anything with ``set_metrics`` and
    ``log_artifact``). Returns the compact metrics dict (the content of reports/metrics.json).
    """
    results = _clean(build_results(params))
    metrics = compact_metrics(results)
    atomic_write_json(RESULTS_JSON, results)
    atomic_write_text(RESULTS_MD, render_markdown(results))
    atomic_write_json(METRICS_JSON, metrics)
    run.set_metrics(_flatten(metrics))
    for path in (RESULTS_MD, RESULTS_JSON, METRICS_JSON):
        run.log_artifact(path)
    if paths.FIGURES.exists():
        run.log_artifact(paths.FIGURES, "figures")
    return metrics


# --------------------------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------------------------- #
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not _is_number(x):
        return str(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}"


def _fmt_ms(summary: Mapping[str, Any] | None, digits: int = 4, hide_zero_std: bool = False) -> str:
    """``mean ± std``; just the mean with one seed (or, if asked, when every seed gave the same value)."""
    if summary is None:
        return "–"
    mean, std = _fmt(summary["mean"], digits), summary["std"]
    return mean if std is None or (hide_zero_std and std == 0) else f"{mean} ± {std:.{digits}f}"


def _fmt_bytes(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "–"
    size = float(summary["mean"])
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "–"  # unreachable


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "---:") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join([align] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _kv_table(obj: Mapping[str, Any]) -> list[str]:
    return _table(["quantity", "value"], [[k, _fmt(v)] for k, v in _flatten(obj).items()])


def _size_section(t: Mapping[str, Any], size: str, s: Mapping[str, Any], seeds_note: str) -> list[str]:
    lines = [f"### {size} students (first {s['layers']} encoder layers)", ""]
    lines += _table(["model", *t["metrics"]],
                    [[m, *(_fmt_ms(r["metrics"][k]) for k in t["metrics"])] for m, r in s["rows"].items()])
    best, comp, primary = s["best_baseline"], s["comparison"], t["primary"]
    if best is not None:
        lines.append(f"Best baseline: **{best}** ({primary} {_fmt_ms(s['rows'][best]['metrics'][primary])}).")
    if comp is None:
        lines.append("RetriKT − best baseline: not available (RetriKT or every baseline is not configured).")
    else:
        text = f"RetriKT − {comp['baseline']} ({primary}): **{comp['delta']:+.4f}**"
        bs = comp["bootstrap"]
        if bs is None:
            text += " (no bootstrap: predictions missing, see below)."
        else:
            text += (f", {100 * bs['confidence']:g}% CI [{bs['ci'][0]:+.4f}, {bs['ci'][1]:+.4f}], p = {bs['p_value']:.4f}"
                     f" (paired bootstrap, {bs['samples']} resamples of {bs['examples']} validation examples"
                     f"{seeds_note}).")
        lines.append(text)
    lines += ["", f"Cost ({size}):", ""]
    cost_rows = []
    for m, r in s["rows"].items():
        c = r["cost"]
        cost_rows.append([m, _fmt_ms(c["parameters"], 0, True), _fmt_bytes(c["model_bytes"]),
                          _fmt_bytes(c["store_bytes"]), *(_fmt_ms(c[k], d, True) for k, d in
                                                          (("latency_ms", 3), ("forward_latency_ms", 3),
                                                           ("train_seconds", 1)))])
    lines += _table(["model", "parameters", "model size", "store size", "latency (ms/example)",
                     "forward (ms/example)", "train (s)"], cost_rows)
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: per task, a quality and a cost table per student size, store quality, PPO, missing inputs."""
    seeds, bs = results["seeds"], results["bootstrap"]
    seeds_note = f", metric averaged over {len(seeds)} seeds" if len(seeds) > 1 else ""
    lines = ["# RetriKT evaluation", "",
             f"Methods: {', '.join(results['methods'])}. Student sizes: "
             f"{', '.join(f'L{l}' for l in results['layers'])}. Seeds: {', '.join(map(str, seeds))}.",
             "",
             "Cells are mean ± sample standard deviation (ddof=1) over seeds; with one seed only the mean is shown. "
             "The teacher is a single run. The best baseline is the best mean primary metric among "
             f"{', '.join(BASELINE_CANDIDATES)}. RetriKT − best baseline: paired bootstrap over validation examples "
             f"({bs['samples']} resamples, seed {bs['seed']}), {100 * bs['confidence']:g}% percentile CI, two-sided p.",
             ""]
    for name, t in results["tasks"].items():
        lines += [f"## {name}", "", f"Primary metric: {t['primary']}. Validation examples: "
                  f"{_fmt(t['validation_examples'])}.", ""]
        for size, s in t["students"].items():
            lines += _size_section(t, size, s, seeds_note)
        lines += ["### Knowledge store (generate)", ""]
        lines += _kv_table(t["store"]) if t["store"] else ["Not available (generate metrics missing).", ""]
        if t["index"]:
            lines += ["### Index", "", *_kv_table(t["index"])]
        if t["prompt_tune"]:
            lines += ["### Prompt tuning", "", *_kv_table(t["prompt_tune"])]
        lines += ["### PPO: before → after", ""]
        ppo = t["ppo"]
        keys = [k for k in ppo["before"] if k in ppo["after"]] if ppo else []
        if not results["rl_enabled"]:
            lines += ["PPO disabled (rl.enabled: false): the store was generated with the prompt-tuned prompt.", ""]
        elif keys:
            lines += _table(["quantity", "before", "after", "change"],
                            [[k, _fmt(ppo["before"][k]), _fmt(ppo["after"][k]),
                              f"{ppo['after'][k] - ppo['before'][k]:+.4f}"] for k in keys])
        else:
            lines += ["Not available (ppo metrics missing or without before/after values).", ""]
        if t["figures"]:
            lines += ["### Figures", "", *(f"- [{Path(f).name}]({Path(f).relative_to(paths.REPORTS).as_posix()})"
                                          for f in t["figures"]), ""]
        if t["missing"]:
            lines += ["### Missing inputs", "", *(f"- `{m}`" for m in t["missing"]), ""]
        if t["warnings"]:
            lines += ["### Warnings", "", *(f"- {w}" for w in t["warnings"]), ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- #
# Figures (matplotlib object API, Agg; no timestamps in the PNG metadata)
# --------------------------------------------------------------------------------------------- #
def _new_figure(width: float, height: float, *, left: float = 0.7, right: float = 0.2, bottom: float = 0.55,
                top: float = 0.45, wspace: float = 0.35, hspace: float = 0.5):
    """A figure of ``width`` x ``height`` inches with margins in inches (fixed: no layout engine, faster)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace, hspace=hspace)
    return fig


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a deterministic PNG to ``path`` atomically (temporary sibling + os.replace)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PNG_DPI, metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _color(model: str) -> Any:
    from matplotlib import colormaps

    order = ("teacher", *METHODS)
    return colormaps["tab10"](order.index(model) if model in order else len(order))


def _series(rows: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if _is_number(r.get(x)) and _is_number(r.get(y))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _curve_rows(reader: _TaskReader, name: str) -> list[dict] | None:
    rows = reader.optional(paths.plot(reader.task.name, name))
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise DataError(f"{paths.plot(reader.task.name, name)}: expected a JSON list of objects")
    return rows


def _learning_curves(params: Params, reader: _TaskReader, methods: Sequence[str], out: Path) -> Path | None:
    """Teacher + student curves: top row train loss, bottom row validation primary metric."""
    task, primary = reader.task, reader.task.metrics[0]
    teacher = _curve_rows(reader, "teacher_curve")
    students = {l: {m: [(s, _curve_rows(reader, f"student_curve-{m}-L{l}-s{s}")) for s in params.seeds]
                    for m in methods} for l in params.student.layers}
    if teacher is None and all(r is None for by_m in students.values() for runs in by_m.values() for _, r in runs):
        return None
    cols = 1 + len(students)
    fig = _new_figure(3.6 * cols, 6.0, top=0.65, hspace=0.25)
    axes = fig.subplots(2, cols, squeeze=False)
    val = f"val_{primary}"
    axes[0, 0].set_title("teacher")
    if teacher is None:
        axes[0, 0].text(0.5, 0.5, "teacher_curve missing", ha="center", va="center", transform=axes[0, 0].transAxes)
    else:
        axes[0, 0].plot(*_series(teacher, "epoch", "train_loss"), marker="o", color=_color("teacher"))
        keys = ([val] if any(val in r for r in teacher)
                else sorted({k for r in teacher for k in r if k.startswith("val_")}))
        for k in keys:
            axes[1, 0].plot(*_series(teacher, "epoch", k), marker="o", label=k)
        if keys:
            axes[1, 0].legend(fontsize=7)
    for col, (layers, by_method) in enumerate(students.items(), start=1):
        axes[0, col].set_title(f"students L{layers}")
        for method, runs in by_method.items():
            for i, (_seed, rows) in enumerate(r for r in runs if r[1] is not None):
                label = method if i == 0 else None
                axes[0, col].plot(*_series(rows, "epoch", "train_loss"), color=_color(method), label=label,
                                  alpha=1.0 if i == 0 else 0.5)
                axes[1, col].plot(*_series(rows, "epoch", val), color=_color(method), label=label,
                                  alpha=1.0 if i == 0 else 0.5)
        if axes[1, col].get_legend_handles_labels()[0]:
            axes[1, col].legend(fontsize=7)
        else:
            axes[0, col].text(0.5, 0.5, "student curves missing", ha="center", va="center",
                              transform=axes[0, col].transAxes)
    for ax in axes[0]:
        ax.set_ylabel("train loss")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.set_ylabel(val)
    fig.suptitle(f"{task.name}: learning curves")
    return save_png(fig, out)


def _ppo_curves(reader: _TaskReader, out: Path) -> Path | None:
    rows = _curve_rows(reader, "ppo_curve")
    if not rows:
        return None
    present = {k for r in rows for k, v in r.items() if _is_number(v) and k != "update"}
    keys = [k for k in PPO_CURVE_KEYS if k in present] + sorted(present - set(PPO_CURVE_KEYS))
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig = _new_figure(3.6 * cols, 2.8 * nrows, top=0.7, hspace=0.6)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        ax.plot(*_series(rows, "update", key), marker="o")
        ax.set_title(key)
        ax.set_xlabel("update")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{reader.task.name}: PPO")
    return save_png(fig, out)


def _confusion(task: Task, pred: Predictions, title: str, out: Path) -> Path:
    cm = confusion_counts(pred.labels, pred.preds, task.num_labels, np.arange(len(pred.labels))[None])[0]
    room = 0.4 + 0.07 * max(len(label) for label in task.labels)  # tick labels, fontsize 8
    side = 0.6 * task.num_labels
    fig = _new_figure(room + 0.3 + side + 0.2, room * 0.5 + 0.35 + side + 0.35, left=room + 0.3, right=0.2,
                      bottom=room * 0.5 + 0.35, top=0.35)
    ax = fig.subplots()
    totals = cm.sum(axis=1, keepdims=True)
    ax.imshow(np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0), cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=9)
    ticks = range(task.num_labels)
    ax.set_xticks(ticks, task.labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(ticks, task.labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=9)
    return save_png(fig, out)


def _methods_bar(task: Mapping[str, Any], name: str, out: Path) -> Path:
    """Primary-metric mean ± std per method, grouped by student size; the teacher as a dashed line."""
    primary, sizes = task["primary"], task["students"]
    methods = [m for m in METHODS if any(m in s["rows"] for s in sizes.values())]
    fig = _new_figure(2.2 + 1.2 * len(sizes) + 0.2 * len(methods) * len(sizes), 3.6, right=1.3, bottom=0.4)
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs, means, stds = [], [], []
        for j, s in enumerate(sizes.values()):
            if method in s["rows"]:
                summary = s["rows"][method]["metrics"][primary]
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(summary["mean"])
                stds.append(summary["std"] or 0.0)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=method, color=_color(method))
    teacher = next((s["rows"]["teacher"] for s in sizes.values() if "teacher" in s["rows"]), None)
    if teacher is not None:
        ax.axhline(teacher["metrics"][primary]["mean"], color=_color("teacher"), linestyle="--", label="teacher")
    ax.set_xticks(range(len(sizes)), list(sizes))
    ax.set_ylabel(primary)
    ax.set_title(f"{name}: {primary} (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_png(fig, out)


def _task_figures(params: Params, reader: _TaskReader, report: Mapping[str, Any], teacher_pred: Predictions | None,
                  preds: Mapping[str, Mapping[str, list[Predictions | None]]]) -> list[str]:
    task = reader.task
    folder = paths.FIGURES / task.name
    methods = [m for m in METHODS if m in params.student.methods]
    written = [_learning_curves(params, reader, methods, folder / "learning_curves.png"),
               _ppo_curves(reader, folder / "ppo_curves.png") if params.rl.enabled else None,
               _methods_bar(report, task.name, folder / "methods.png")]
    if teacher_pred is not None:
        written.append(_confusion(task, teacher_pred, f"{task.name}: teacher", folder / "confusion-teacher.png"))
    for size, by_method in preds.items():
        for method in methods:
            pred = by_method[method][0]  # the first seed
            if pred is not None:
                name = f"{method}-{size}-s{params.seeds[0]}"
                written.append(_confusion(task, pred, f"{task.name}: {name}", folder / f"confusion-{name}.png"))
    return [p.as_posix() for p in written if p is not None]


# --------------------------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------------------------- #
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, floats rounded to 6 decimals, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), 6) if np.isfinite(obj) else None
    return obj
