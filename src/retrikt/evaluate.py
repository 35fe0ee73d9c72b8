"""`evaluate` stage: one report over every task, student size, method and seed.

Reads what the other stages wrote (:mod:`retrikt.report.inputs`) and writes, all atomically:

``reports/results.json``
    Every number: per task the majority class of train and, per student size, one row per model
    (teacher, then the configured methods in the order of :data:`retrikt.methods.METHODS`) with each
    task metric as mean ± std over seeds, the gap closed and the costs; the best baseline (of
    :data:`retrikt.methods.BASELINES`); RetriKT − best baseline and RetriKT − RetriKT-KD with paired
    bootstrap CIs and p-values; the serving cost per method (accuracy, time relative to the plain
    forward, bytes read at serving); knowledge-store quality; the RL stage's before/after; the missing inputs.
``reports/results.md``
    The same numbers as markdown tables, with the figures embedded (:mod:`retrikt.report.markdown`).
``reports/metrics.json``
    The compact headline :func:`compact_metrics` for ``dvc exp show`` (the only file DVC declares as
    metrics; 23 columns for one task and two student sizes): per task the teacher, the majority class
    and the store size, and per size RetriKT, RetriKT-KD, the best baseline and both deltas with CIs.
``reports/figures/``
    ``forest.png`` (every task), and per task ``methods``, ``cost``, ``confusion``, ``store``,
    ``retrieval``, ``rl`` and ``learning_curves`` (:mod:`retrikt.report.figures`).

MLflow: the stage's run gets the compact metrics and every file above; the pipeline's parent run gets
the same headline metrics, tags naming each best baseline, a description (the headline table) and the
figures, so the runs table compares pipelines without expanding them.

Statistics are defined in :mod:`retrikt.report.stats`. Missing optional inputs are listed in the report;
a missing metrics file of a configured student is an error (one line naming it). Inputs are read and
checked before anything is written.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from retrikt import paths
from retrikt.device import resolve_device
from retrikt.io import atomic_write_json, atomic_write_text
from retrikt.methods import BASELINES, METHODS, REGISTRY
from retrikt.params import Params
from retrikt.report.figures import (
    confusion_grid,
    cost_figure,
    forest_figure,
    learning_curves,
    methods_figure,
    pick_examples,
    retrieval_figure,
    rl_figure,
    save_png,
    store_figure,
)
from retrikt.report.inputs import Predictions, TaskReader, clean
from retrikt.report.markdown import render_markdown
from retrikt.report.stats import (
    best_baseline,
    gap_closed,
    is_number,
    majority_class,
    mean_std,
    paired_bootstrap,
    rl_before_after,
)
from retrikt.tasks import Task, get_task
from retrikt.tracking import flatten

log = logging.getLogger(__name__)

PROPOSED = "retrikt"
STORE_KD = "retrikt_kd"
RETRIEVE_AT_SERVING = tuple(n for n, m in REGISTRY.items() if m.retrieves)  # read the store at inference
COST_KEYS = ("parameters", "model_bytes", "store_bytes", "latency_ms", "forward_latency_ms", "latency_ratio",
             "train_seconds")
RETRIEVAL_EXAMPLES, RETRIEVAL_SHOWN = 4, 5  # validation inputs in the retrieval panel; entries shown each
STD_NOTE = "sample standard deviation over seeds (ddof=1); null when there is a single seed"


# --------------------------------------------------------------------------------------- reading --- #
def _row(task: Task, files: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    metrics = {}
    for key in task.metrics:
        values = [float(f[key]) for f in files]
        metrics[key] = {**mean_std(values), "values": values}
    cost = {k: (mean_std([f[k] for f in files]) if all(is_number(f.get(k)) for f in files) else None)
            for k in COST_KEYS}
    return {"seeds": list(seeds), "metrics": metrics, "cost": cost}


@dataclass
class _Loaded:
    """One task's report plus what its figures need (drawn once every task has been read)."""

    report: dict[str, Any]
    reader: TaskReader
    teacher_pred: Predictions | None
    preds: dict[str, dict[str, list[Predictions | None]]]
    train: list[dict] | None


def _majority(task: Task, train: list[dict] | None, ref: Predictions | None) -> dict[str, Any] | None:
    if not train or ref is None:
        return None
    cls = majority_class([r["label"] for r in train], task.num_labels)
    return {"class": cls, "label": task.labels[cls],
            "metrics": task.compute_metrics(ref.labels, np.full(len(ref.labels), cls))}


def _task_report(params: Params, task: Task) -> _Loaded:
    reader = TaskReader(task)
    seeds, primary = params.seeds, task.metrics[0]
    methods = [m for m in METHODS if m in params.student.methods]
    baselines = [m for m in BASELINES if m in methods]
    teacher_file = reader.metrics(paths.metrics(task.name, "teacher"), required=False)
    teacher_pred = reader.predictions("teacher")
    if teacher_file is not None and teacher_pred is not None:
        reader.check_agreement(teacher_pred, teacher_file, "teacher")
    weights = paths.teacher(task.name) / paths.WEIGHTS_FILE
    if teacher_file is not None and weights.exists():
        teacher_file = {**teacher_file, "model_bytes": weights.stat().st_size}
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
        mean = lambda m, rows=rows: rows[m]["metrics"][primary]["mean"] if m in rows else None
        for model, row in rows.items():
            row["gap_closed"] = None if model == "teacher" else gap_closed(mean(model), mean("teacher"),
                                                                            mean("finetune"))
        best = best_baseline(rows, primary, baselines)
        sizes[f"L{layers}"] = {
            "layers": layers, "rows": rows, "best_baseline": best,
            "comparison": _compare(params, task, layers, rows, preds, best, "best"),
            "vs_retrikt_kd": _compare(params, task, layers, rows, preds, STORE_KD if STORE_KD in rows else None,
                                      "kd"),
            "serving": serving_costs(rows, primary)}
        all_preds[f"L{layers}"] = preds

    train = reader.rows("train")
    rl = reader.optional(paths.metrics(task.name, "rl")) if params.rl.enabled else None
    report = {
        "metrics": list(task.metrics), "primary": primary, "labels": list(task.labels),
        "validation_examples": len(reader.reference.idx) if reader.reference is not None else None,
        "majority": _majority(task, train, reader.reference),
        "students": sizes,
        "store": reader.optional(paths.metrics(task.name, "generate")),
        "index": reader.optional(paths.metrics(task.name, "index")),
        "prompt_tune": reader.optional(paths.metrics(task.name, "prompt_tune")),
        "rl": None if rl is None else {**rl_before_after(rl), "metrics": rl},
        "figures": [], "missing": reader.missing, "warnings": reader.warnings,  # lists filled in as we go
    }
    return _Loaded(report, reader, teacher_pred, all_preds, train)


def _compare(params: Params, task: Task, layers: int, rows: Mapping[str, Any],
             preds: Mapping[str, list[Predictions | None]], other: str | None, stream: str) -> dict[str, Any] | None:
    """RetriKT − ``other`` on the primary metric, with the paired bootstrap when predictions exist.
    Each comparison has its own seeded Generator: ``(seed, crc32(task), layers, crc32(stream))``."""
    if other is None or PROPOSED not in rows:
        return None
    primary = task.metrics[0]
    ours, theirs = rows[PROPOSED]["metrics"][primary]["mean"], rows[other]["metrics"][primary]["mean"]
    out: dict[str, Any] = {"metric": primary, "method": PROPOSED, "baseline": other, "delta": ours - theirs,
                           "bootstrap": None}
    a, b = preds[PROPOSED], preds[other]
    if all(p is not None for p in (*a, *b)):
        key = [params.seed, zlib.crc32(task.name.encode()), layers]
        rng = np.random.default_rng(key if stream == "best" else [*key, zlib.crc32(stream.encode())])
        out["bootstrap"] = paired_bootstrap(task, a[0].labels, [p.preds for p in a], [p.preds for p in b], primary,
                                            samples=params.evaluate.bootstrap_samples,
                                            confidence=params.evaluate.confidence, rng=rng).to_dict()
    return out


def serving_costs(rows: Mapping[str, Any], primary: str) -> list[dict[str, Any]]:
    """Per model: the primary metric against the cost of serving it.

    ``latency_ratio``: the median of the A/B per-row ratio (serving / plain forward of the same student,
    measured in its stage); ``serving_ms``: that ratio times the median plain-forward time over this
    size's students (one architecture, so a pooled and steadier reference than any single process);
    ``serving_bytes``: the model file plus the store it reads at inference.
    """
    def mean(row: Mapping[str, Any], key: str) -> Any:
        c = row["cost"].get(key)
        return None if c is None else c["mean"]

    forwards = [mean(r, "forward_latency_ms") for m, r in rows.items() if m != "teacher"]
    forwards = [f for f in forwards if f is not None]
    reference = float(np.median(forwards)) if forwards else None
    out = []
    for model, row in rows.items():
        ratio, model_bytes = mean(row, "latency_ratio"), mean(row, "model_bytes")
        store_bytes = (mean(row, "store_bytes") or 0) if model in RETRIEVE_AT_SERVING else 0
        out.append({"model": model, "metric": row["metrics"][primary]["mean"], "parameters": mean(row, "parameters"),
                    "latency_ratio": ratio,
                    "serving_ms": ratio * reference if ratio is not None and reference is not None else None,
                    "model_bytes": model_bytes, "serving_store_bytes": store_bytes,
                    "serving_bytes": None if model_bytes is None else model_bytes + store_bytes,
                    "train_seconds": mean(row, "train_seconds")})
    return out


# --------------------------------------------------------------------------------------- figures --- #
def _task_figures(params: Params, loaded: _Loaded) -> list[str]:
    reader, report, task = loaded.reader, loaded.report, loaded.reader.task
    methods = [m for m in METHODS if m in params.student.methods]
    curves = {size: {m: [r for r in (reader.curve(f"student_curve-{m}-{size}-s{s}") for s in params.seeds)
                         if r is not None] for m in methods} for size in report["students"]}
    first = {size: {m: runs[0] for m, runs in by_m.items()} for size, by_m in loaded.preds.items()}
    drawn = {"methods": methods_figure(report, task.name),
             "cost": cost_figure(report, task.name),
             "confusion": confusion_grid(task, loaded.teacher_pred, first, params.seeds[0]),
             "store": store_figure(task, reader.store_entries(), loaded.train),
             "retrieval": _retrieval_panel(params, reader) if PROPOSED in methods else None,
             "rl": rl_figure(reader.curve("rl_curve"), report["rl"], task.name) if params.rl.enabled else None,
             "learning_curves": learning_curves(task, reader.curve("teacher_curve"), curves)}
    return [save_png(fig, paths.figure(task.name, name)).as_posix() for name, fig in drawn.items() if fig is not None]


def _retrieval_panel(params: Params, reader: TaskReader):
    task = reader.task
    validation = reader.rows("validation")
    if not validation:
        return None
    layers, seed = params.student.layers[0], params.seeds[0]
    rows = [validation[i] for i in pick_examples(task, validation, RETRIEVAL_EXAMPLES)]
    preds = reader.retrieval(paths.student(task.name, PROPOSED, layers, seed), rows,
                             min(RETRIEVAL_SHOWN, params.student.retrieval_top_k), resolve_device(params.device))
    return None if preds is None else retrieval_figure(task, rows, preds, f"{PROPOSED}-L{layers}-s{seed}")


# --------------------------------------------------------------------------------------- results --- #
def compact_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline for ``dvc exp show`` and the MLflow parent run: per task ``teacher``, ``majority``,
    ``store_size``, and per size ``retrikt``, ``retrikt_kd``, ``best_baseline`` (its primary-metric mean),
    ``delta_vs_best`` with ``delta_ci_low``/``delta_ci_high``/``delta_p_value``, and ``delta_vs_kd`` with
    its CI. Absent values are left out."""
    out: dict[str, Any] = {}
    for name, t in results["tasks"].items():
        primary, entry = t["primary"], {}
        first = next(iter(t["students"].values()), None)
        if first is not None and "teacher" in first["rows"]:
            entry["teacher"] = first["rows"]["teacher"]["metrics"][primary]["mean"]
        if t.get("majority"):
            entry["majority"] = t["majority"]["metrics"][primary]
        if t.get("store") and is_number(t["store"].get("size")):
            entry["store_size"] = t["store"]["size"]
        for size, s in t["students"].items():
            rows, block = s["rows"], {}
            for model in (PROPOSED, STORE_KD):
                if model in rows:
                    block[model] = rows[model]["metrics"][primary]["mean"]
            if s["best_baseline"] is not None:
                block["best_baseline"] = rows[s["best_baseline"]]["metrics"][primary]["mean"]
            for comp, prefix in ((s["comparison"], "delta"), (s.get("vs_retrikt_kd"), "delta_vs_kd")):
                if comp is None:
                    continue
                block["delta_vs_best" if prefix == "delta" else prefix] = comp["delta"]
                bs = comp["bootstrap"]
                if bs is not None:
                    block[f"{prefix}_ci_low"], block[f"{prefix}_ci_high"] = bs["ci"]
                    if prefix == "delta":
                        block["delta_p_value"] = bs["p_value"]
            entry[size] = block
        out[name] = entry
    return out


def headline_tags(results: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the MLflow parent run: which method each best baseline is."""
    return {f"{name}.{size}.best_baseline": s["best_baseline"] for name, t in results["tasks"].items()
            for size, s in t["students"].items() if s["best_baseline"] is not None}


def headline_markdown(results: Mapping[str, Any]) -> str:
    """A short table (the MLflow parent run's description): per task and size, RetriKT, the best
    baseline and the delta with its CI."""
    lines = ["| task | size | RetriKT | best baseline | Δ (CI, p) | RetriKT − RetriKT-KD |",
             "|---|---|---|---|---|---|"]
    for name, t in results["tasks"].items():
        for size, s in t["students"].items():
            rows, best = s["rows"], s["best_baseline"]
            p = t["primary"]
            ours = f"{rows[PROPOSED]['metrics'][p]['mean']:.3f}" if PROPOSED in rows else "–"
            theirs = f"{best} {rows[best]['metrics'][p]['mean']:.3f}" if best else "–"

            def delta(comp: Mapping[str, Any] | None) -> str:
                if comp is None:
                    return "–"
                bs = comp["bootstrap"]
                return f"{comp['delta']:+.3f}" + ("" if bs is None else
                                                  f" [{bs['ci'][0]:+.3f}, {bs['ci'][1]:+.3f}], p {bs['p_value']:.3f}")

            lines.append(f"| {name} | {size} | {ours} | {theirs} | {delta(s['comparison'])} | "
                         f"{delta(s.get('vs_retrikt_kd'))} |")
    return "\n".join(lines) + "\n"


def build_results(params: Params, figures: bool = True) -> dict[str, Any]:
    """Read and check every input, then draw the figures; return the results.json dict.

    With ``figures=False`` nothing is written (and the inputs read only for figures are not listed).
    """
    loaded = {name: _task_report(params, get_task(name)) for name in params.tasks}
    results = {
        "seeds": list(params.seeds), "layers": list(params.student.layers), "rl_enabled": params.rl.enabled,
        "methods": [m for m in METHODS if m in params.student.methods],
        "baselines": [m for m in BASELINES if m in params.student.methods], "std": STD_NOTE,
        "bootstrap": {"samples": params.evaluate.bootstrap_samples, "confidence": params.evaluate.confidence,
                      "seed": params.seed, "unit": "validation examples (paired; mean over seeds per resample)",
                      "ci": "percentile", "p_value": "two-sided, min(1, 2*min(#{d*<=0}+1, #{d*>=0}+1)/(B+1))"},
        "figures": [],
        "tasks": {name: t.report for name, t in loaded.items()},
    }
    if figures:
        for t in loaded.values():
            t.report["figures"] = _task_figures(params, t)
        forest = forest_figure(clean(results))
        if forest is not None:
            results["figures"] = [save_png(forest, paths.FOREST_FIGURE).as_posix()]
    for name, t in loaded.items():
        for w in t.reader.warnings:
            log.warning("%s: %s", name, w)
    return results


def evaluate(params: Params, run: Any) -> dict[str, Any]:
    """The ``evaluate`` stage: write results.json/.md, metrics.json and figures; log to ``run`` and to
    the pipeline's parent run.

    ``run`` is the stage's :class:`retrikt.tracking.StageRun` (anything with ``set_metrics``,
    ``log_artifact`` and ``set_pipeline_summary``). Returns the compact metrics (reports/metrics.json).
    """
    results = clean(build_results(params))
    metrics = compact_metrics(results)
    atomic_write_json(paths.RESULTS_JSON, results)
    atomic_write_text(paths.RESULTS_MD, render_markdown(results))
    atomic_write_json(paths.HEADLINE_METRICS, metrics)
    run.set_metrics(flatten(metrics))
    for path in (paths.RESULTS_MD, paths.RESULTS_JSON, paths.HEADLINE_METRICS):
        run.log_artifact(path)
    if paths.FIGURES.exists():
        run.log_artifact(paths.FIGURES, "figures")
    run.set_pipeline_summary(flatten(metrics), tags=headline_tags(results), description=headline_markdown(results),
                             artifacts={"figures": paths.FIGURES, "": paths.RESULTS_MD})
    return metrics
