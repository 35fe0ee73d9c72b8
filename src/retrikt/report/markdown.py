"""results.md: a view of results.json, nothing more (every number here is in the JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from retrikt import paths
from retrikt.report.stats import is_number
from retrikt.tracking import flatten

LATENCY_NOTE = (
    "Serving time is measured A/B in the student's own stage: its end-to-end prediction of one validation "
    "row (tokenise, forward, and for RetriKT the search and the aggregation over the store) and the plain "
    "forward of the same student, interleaved, 3 rounds over (up to) 64 validation rows after a warm-up; "
    "**× forward** is the median per-row ratio, robust to load that hits both alike. **≈ ms** is that ratio "
    "times the median plain-forward time of all students of this size (one architecture), so it is "
    "comparable across methods on this machine; absolute milliseconds move with the machine and its load "
    "(`benchmarks/bench_retrieval.py` measures them at scale). Bytes at serving: the model file plus the "
    "store the method reads at inference (RetriKT: its index and entries; RetriKT-KD trains on the store "
    "but serves without it).")


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not is_number(x):
        return str(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}"


def fmt_ms(summary: Mapping[str, Any] | None, digits: int = 4, hide_zero_std: bool = False) -> str:
    """``mean ± std``; just the mean with one seed (or, if asked, when every seed gave the same value)."""
    if summary is None:
        return "–"
    mean, std = fmt(summary["mean"], digits), summary["std"]
    return mean if std is None or (hide_zero_std and std == 0) else f"{mean} ± {std:.{digits}f}"


def fmt_bytes(size: float | None) -> str:
    if size is None:
        return "–"
    size = float(size)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "---:") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join([align] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def kv_table(obj: Mapping[str, Any]) -> list[str]:
    return table(["quantity", "value"], [[k, fmt(v)] for k, v in flatten(obj).items()])


def _comparison_cells(comp: Mapping[str, Any] | None) -> list[str]:
    if comp is None:
        return ["–", "–", "–"]
    bs = comp["bootstrap"]
    if bs is None:
        return [f"{comp['delta']:+.4f}", "– (predictions missing)", "–"]
    return [f"**{comp['delta']:+.4f}**", f"[{bs['ci'][0]:+.4f}, {bs['ci'][1]:+.4f}]", f"{bs['p_value']:.3f}"]


def _size_section(t: Mapping[str, Any], size: str, s: Mapping[str, Any], conf: float) -> list[str]:
    primary = t["primary"]
    lines = [f"### {size} students (first {s['layers']} encoder layers)", ""]
    rows = []
    if t.get("majority"):
        maj = t["majority"]
        rows.append([f"majority class ({maj['label']})", *(fmt(maj["metrics"][k]) for k in t["metrics"]), "–"])
    ceiling = (t.get("index") or {}).get("rm_retrieval")
    if ceiling:  # the index stage's diagnostic: what retrieval with the reward model's own embeddings reaches
        rows.append(["reward model as the retriever (RetriKT's ceiling)",
                     *(fmt(ceiling.get(k)) for k in t["metrics"]), "–"])
    for m, r in s["rows"].items():
        rows.append([m, *(fmt_ms(r["metrics"][k]) for k in t["metrics"]), fmt(r.get("gap_closed"), 3)])
    lines += table(["model", *t["metrics"], f"gap closed ({primary})"], rows)
    lines += [f"Gap closed = (model − finetune) / (teacher − finetune) on {primary}: 0 = fine-tuning, "
              "1 = the teacher; – when the teacher is not better than fine-tuning (no gap to close)."
              + (" The reward model as the retriever: its own embeddings search the store and the top-k soft "
                 "labels are aggregated as RetriKT does; a student imitating its similarities approaches it."
                 if ceiling else ""), ""]
    best = s["best_baseline"]
    comp_rows = [[f"RetriKT − best baseline ({best})" if best else "RetriKT − best baseline",
                  *_comparison_cells(s["comparison"])],
                 ["RetriKT − RetriKT-KD (same store)", *_comparison_cells(s.get("vs_retrikt_kd"))]]
    lines += table([f"comparison ({primary})", "Δ", f"{100 * conf:g}% CI", "p"], comp_rows)
    serving = s.get("serving") or []
    if serving:
        lines += [f"Serving cost ({size}):", ""]
        lines += table(["model", primary, "parameters", "× forward", "≈ ms/example", "model", "store at serving",
                        "bytes at serving", "train (s)"],
                       [[c["model"], fmt(c["metric"]), fmt(c["parameters"]), fmt(c["latency_ratio"], 2),
                         fmt(c["serving_ms"], 2), fmt_bytes(c["model_bytes"]), fmt_bytes(c["serving_store_bytes"]),
                         fmt_bytes(c["serving_bytes"]), fmt(c["train_seconds"], 1)] for c in serving])
    return lines


def _figure_lines(figures: Sequence[str], caption: Mapping[str, str]) -> list[str]:
    out = []
    for f in figures:
        rel = Path(f).relative_to(paths.REPORTS).as_posix()
        name = Path(f).stem
        out += [f"**{caption.get(name, name)}**", "", f"![{name}]({rel})", ""]
    return out


CAPTIONS = {
    "methods": "Every method per student size: mean (± std over seeds when there are several, seeds as dots), "
               "the teacher and the majority class as reference lines",
    "cost": "Accuracy against serving cost: time relative to the plain forward, and bytes read at serving",
    "confusion": "Confusion matrices (first seed), one panel per model",
    "store": "The knowledge store against the real train rows",
    "retrieval": "What the retrieval student retrieves for a few validation inputs",
    "rl": "RL on the soft prompt: reward components per update, and the evaluation before/after",
    "learning_curves": "Learning curves",
    "forest": "RetriKT − best baseline and RetriKT − RetriKT-KD, with bootstrap CIs",
}


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: headline, then per task quality, comparisons, serving cost, store, RL, figures."""
    seeds, bs = results["seeds"], results["bootstrap"]
    seeds_note = f"; the metric is averaged over {len(seeds)} seeds per resample" if len(seeds) > 1 else ""
    lines = ["# RetriKT evaluation", "",
             f"Methods: {', '.join(results['methods'])}. Student sizes: "
             f"{', '.join(f'L{layers}' for layers in results['layers'])}. Seeds: {', '.join(map(str, seeds))}.",
             "",
             "Cells are mean ± sample standard deviation (ddof=1) over seeds; with one seed only the mean is shown. "
             "The teacher is a single run. The best baseline is the best mean primary metric among the baselines "
             f"trained on the task data only ({', '.join(results['baselines'])}). Δ: paired bootstrap over "
             f"validation examples ({bs['samples']} resamples, seed {bs['seed']}{seeds_note}), "
             f"{100 * bs['confidence']:g}% percentile CI, two-sided p.", ""]
    if results.get("figures"):
        lines += _figure_lines(results["figures"], CAPTIONS)
    for name, t in results["tasks"].items():
        maj = t.get("majority")
        lines += [f"## {name}", "", f"Primary metric: {t['primary']}. Validation examples: "
                  f"{fmt(t['validation_examples'])}."
                  + (f" Majority class of train: {maj['label']} ({t['primary']} {fmt(maj['metrics'][t['primary']])})."
                     if maj else ""), ""]
        for size, s in t["students"].items():
            lines += _size_section(t, size, s, bs["confidence"])
        if any(s.get("serving") for s in t["students"].values()):
            lines += [LATENCY_NOTE, ""]
        lines += ["### Knowledge store (generate)", ""]
        lines += kv_table(t["store"]) if t["store"] else ["Not available (generate metrics missing).", ""]
        if t["index"]:
            lines += ["### Index", "", *kv_table(t["index"])]
        if t["prompt_tune"]:
            lines += ["### Prompt tuning", "", *kv_table(t["prompt_tune"])]
        lines += ["### RL: before → after", ""]
        rl = t["rl"]
        keys = [k for k in rl["before"] if k in rl["after"]] if rl else []
        if not results["rl_enabled"]:
            lines += ["RL disabled (rl.enabled: false): the store was generated with the prompt-tuned prompt.", ""]
        elif keys:
            lines += table(["quantity", "before", "after", "change"],
                           [[k, fmt(rl["before"][k]), fmt(rl["after"][k]),
                             f"{rl['after'][k] - rl['before'][k]:+.4f}"] for k in keys])
        else:
            lines += ["Not available (rl metrics missing or without before/after values).", ""]
        if t["figures"]:
            lines += ["### Figures", "", *_figure_lines(t["figures"], CAPTIONS)]
        if t["missing"]:
            lines += ["### Missing inputs", "", *(f"- `{m}`" for m in t["missing"]), ""]
        if t["warnings"]:
            lines += ["### Warnings", "", *(f"- {w}" for w in t["warnings"]), ""]
    return "\n".join(lines).rstrip() + "\n"
