"""The report's figures (matplotlib object API, Agg backend, fixed margins, no timestamps: same inputs ->
same PNG bytes). Each function takes plain data (results.json parts, predictions, rows) and returns a
figure, or None when it has nothing to draw; :func:`save_png` writes one atomically.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from retrikt.io import atomic_write_bytes
from retrikt.methods import METHODS
from retrikt.report.inputs import Predictions
from retrikt.report.stats import is_number
from retrikt.tasks import Task

PNG_DPI = 100
REFERENCE = {"teacher": dict(color="0.2", linestyle="--", linewidth=1.2),
             "majority": dict(color="0.55", linestyle=":", linewidth=1.4)}


def new_figure(width: float, height: float, *, left: float = 0.7, right: float = 0.2, bottom: float = 0.55,
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
    """Write ``fig`` as a deterministic PNG to ``path`` atomically (:func:`retrikt.io.atomic_write_bytes`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


def color(model: str) -> Any:
    from matplotlib import colormaps

    order = ("teacher", *METHODS)
    return colormaps["tab10"](order.index(model) if model in order else len(order))


def label_color(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["Set2"](i % 8)


def _fitted_limits(values: Sequence[float], min_pad: float = 0.01) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = max(min_pad, 0.12 * (hi - lo))
    return lo - pad, hi + pad


def _series(rows: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if is_number(r.get(x)) and is_number(r.get(y))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------- methods --- #
def methods_figure(t: Mapping[str, Any], name: str):
    """Per student size: each method's mean (± std and the seeds when there are several), teacher and
    majority class as reference lines, the y axis fitted to the values drawn."""
    primary, sizes = t["primary"], t["students"]
    methods = [m for m in METHODS if any(m in s["rows"] for s in sizes.values())]
    if not methods:
        return None
    teacher = next((s["rows"]["teacher"]["metrics"][primary]["mean"] for s in sizes.values()
                    if "teacher" in s["rows"]), None)
    majority = t["majority"]["metrics"][primary] if t.get("majority") else None
    refs = {k: v for k, v in (("teacher", teacher), ("majority", majority)) if v is not None}
    values = list(refs.values())
    for s in sizes.values():
        for m in methods:
            if m in s["rows"]:
                summary = s["rows"][m]["metrics"][primary]
                std = summary["std"] or 0.0
                values += [*summary["values"], summary["mean"] - std, summary["mean"] + std]
    lo, hi = _fitted_limits(values)
    panel_w = 0.55 * len(methods) + 0.6
    fig = _figure_for_panels(len(sizes), panel_w, 3.3, left=0.75, right=1.25, bottom=0.85, top=0.5, wspace=0.12)
    axes = fig.subplots(1, len(sizes), squeeze=False, sharey=True)[0]
    for ax, (size, s) in zip(axes, sizes.items()):
        for x, m in enumerate(methods):
            if m not in s["rows"]:
                continue
            summary = s["rows"][m]["metrics"][primary]
            vals = summary["values"]
            if len(vals) > 1:
                jitter = np.linspace(-0.12, 0.12, len(vals))
                ax.scatter(x + jitter, vals, s=10, color=color(m), alpha=0.45, linewidths=0, zorder=2)
                ax.errorbar(x, summary["mean"], yerr=summary["std"], fmt="none", ecolor=color(m), capsize=3, zorder=3)
            ax.plot([x], [summary["mean"]], marker="o", markersize=7, color=color(m), zorder=4)
            ax.annotate(f"{summary['mean']:.3f}", (x, summary["mean"]), xytext=(7, 0), textcoords="offset points",
                        va="center", fontsize=7)
        for key, value in refs.items():
            ax.axhline(value, zorder=1, **REFERENCE[key])
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"{size} students", fontsize=9)
        ax.grid(axis="y", alpha=0.25)
    axes[0].set_ylim(lo, hi)
    axes[0].set_ylabel(primary)
    for key, value in refs.items():  # labels at the right edge, once
        axes[-1].annotate(f"{key} {value:.3f}", (1.0, value), xycoords=("axes fraction", "data"), xytext=(4, 0),
                          textcoords="offset points", va="center", fontsize=7, color=REFERENCE[key]["color"])
    seeds = max(len(s["rows"][m]["metrics"][primary]["values"]) for s in sizes.values() for m in methods
                if m in s["rows"])
    fig.suptitle(f"{name}: {primary} per method" + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else
                                                    " (one seed)"), fontsize=10)
    return fig


def _figure_for_panels(n: int, panel_w: float, height: float, *, left: float, right: float, bottom: float,
                       top: float, wspace: float):
    width = left + right + n * panel_w + (n - 1) * wspace * panel_w
    return new_figure(width, height, left=left, right=right, bottom=bottom, top=top, wspace=wspace)


# ----------------------------------------------------------------------------------------- forest --- #
def forest_figure(results: Mapping[str, Any]):
    """RetriKT − best baseline and RetriKT − RetriKT-KD, per task and student size, with their CIs."""
    rows = []
    for name, t in results["tasks"].items():
        for size, s in t["students"].items():
            for key, kind in (("comparison", "best"), ("vs_retrikt_kd", "kd")):
                comp = s.get(key)
                if comp is not None:
                    rows.append((f"{name} {size}: − {comp['baseline']}" + (" (best)" if kind == "best" else ""),
                                 kind, comp, t["primary"]))
    if not rows:
        return None
    conf = results["bootstrap"]["confidence"]
    fig = new_figure(7.2, 0.9 + 0.34 * len(rows), left=2.3, right=1.1, bottom=0.55, top=0.4)
    ax = fig.subplots()
    marks = {"best": dict(color="C3", marker="D"), "kd": dict(color="C0", marker="o")}
    extent = [0.0]
    for i, (_label, kind, comp, _) in enumerate(rows):
        y = len(rows) - 1 - i
        bs = comp["bootstrap"]
        if bs is not None:
            ax.plot(bs["ci"], [y, y], color=marks[kind]["color"], linewidth=2, solid_capstyle="butt")
            extent += bs["ci"]
            ax.annotate(f"p = {bs['p_value']:.3f}", (1.0, y), xycoords=("axes fraction", "data"), xytext=(5, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.plot([comp["delta"]], [y], linestyle="none", markersize=6, **marks[kind])
        extent.append(comp["delta"])
    ax.axvline(0.0, color="0.3", linewidth=1)
    lo, hi = _fitted_limits(extent, min_pad=0.02)
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    metrics = sorted({r[3] for r in rows})
    ax.set_xlabel(f"Δ {', '.join(metrics)} (RetriKT − comparator); {100 * conf:g}% paired-bootstrap CI", fontsize=8)
    ax.grid(axis="x", alpha=0.25)
    fig.suptitle("RetriKT against the best baseline and against RetriKT-KD (right of 0: RetriKT better)",
                 fontsize=9, x=0.5, ha="center")
    return fig


# -------------------------------------------------------------------------------------- confusion --- #
def confusion_grid(task: Task, teacher: Predictions | None,
                   by_size: Mapping[str, Mapping[str, Predictions | None]], seed: int):
    """One panel per model (first seed): rows = student sizes, the teacher in the first column."""
    methods = [m for m in METHODS if any(p.get(m) is not None for p in by_size.values())]
    if not methods and teacher is None:
        return None
    c = task.num_labels
    side = max(1.1, (0.42 if c <= 3 else 0.3) * c)
    longest = max(len(label) for label in task.labels)
    left, bottom = 0.3 + 0.055 * longest, 0.3 + 0.04 * longest  # horizontal / 40-degree tick labels
    cols, nrows = 1 + len(methods), max(1, len(by_size))
    fig = new_figure(left + cols * (side + 0.4), bottom + 0.6 + nrows * (side + 0.5), left=left + 0.2, right=0.1,
                     bottom=bottom + 0.12, top=0.6, wspace=0.35, hspace=0.5)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for r, (size, preds) in enumerate(by_size.items() or [("", {})]):
        panels = [("teacher", teacher if r == 0 else None)] + [(m, preds.get(m)) for m in methods]
        for col, (model, pred) in enumerate(panels):
            ax = axes[r, col]
            if pred is None:
                ax.set_visible(False)
                continue
            cm = task.confusion(pred.labels, pred.preds)[0]
            totals = cm.sum(axis=1, keepdims=True)
            ax.imshow(np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0), cmap="Blues", vmin=0, vmax=1)
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if totals[i, 0] and v / totals[i, 0] > 0.6 else "black")
            acc = float(np.trace(cm) / cm.sum())
            ax.set_title(f"{model}{'' if model == 'teacher' else ' ' + size}\nacc {acc:.3f}", fontsize=7)
            ax.set_xticks(range(c), task.labels if r == nrows - 1 else [""] * c, rotation=40, ha="right",
                          fontsize=6)
            ax.set_yticks(range(c), task.labels if col == 0 or (col == 1 and r > 0) else [""] * c, fontsize=6)
    fig.supxlabel("predicted", fontsize=8)
    fig.supylabel("gold", fontsize=8)
    fig.suptitle(f"{task.name}: confusion matrices (seed {seed}; colour = share of the gold row)", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------- rl --- #
# the reward and its terms as the rl stage writes them to rl_curve (in the legend's order)
RL_COMPONENTS = ("reward", "confidence", "diversity", "length_penalty", "parse_fail", "rm_agreement")


def rl_figure(rows: Sequence[Mapping[str, Any]] | None, before_after: Mapping[str, Mapping[str, float]] | None,
               name: str):
    """Reward components per update (left), the KL to the step-1 prompt (middle), and the seeded
    evaluation rollouts before and after RL (right)."""
    rows = rows or []
    present = {k for r in rows for k, v in r.items() if is_number(v)}
    comps = [k for k in RL_COMPONENTS if k in present]
    has_kl = "kl" in present
    ba = before_after or {"before": {}, "after": {}}
    keys = [k for k in ba["before"] if k in ba["after"]]
    panels = [p for p, on in (("components", bool(comps)), ("kl", has_kl), ("eval", bool(keys))) if on]
    if not panels:
        return None
    widths = {"components": 4.2, "kl": 2.6, "eval": 3.6}
    fig = new_figure(sum(widths[p] for p in panels) + 0.6 * len(panels) + 0.9, 3.3, left=0.6, right=0.3,
                     bottom=0.55, top=0.5, wspace=0.45)
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": [widths[p] for p in panels]})[0]
    from matplotlib.ticker import MaxNLocator

    for ax, panel in zip(axes, panels):
        if panel in ("components", "kl"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel == "components":
            for k in comps:
                ax.plot(*_series(rows, "update", k), marker="o", markersize=3, label=k,
                        linewidth=2.2 if k == "reward" else 1.2)
            ax.axhline(0, color="0.6", linewidth=0.8)
            ax.set_xlabel("update")
            ax.set_title("reward and its components", fontsize=9)
            ax.legend(fontsize=6, ncol=2, loc="best")
        elif panel == "kl":
            ax.plot(*_series(rows, "update", "kl"), marker="o", markersize=3, color="C7")
            ax.set_xlabel("update")
            ax.set_title("KL to the step-1 prompt", fontsize=9)
        else:
            for i, k in enumerate(keys):
                b, a = ba["before"][k], ba["after"][k]
                ax.plot([b, a], [i, i], color="0.6", linewidth=1)
                ax.plot([b], [i], marker="o", markersize=6, markerfacecolor="white", color="C0", linestyle="none")
                ax.plot([a], [i], marker="o", markersize=6, color="C0", linestyle="none")
                ax.annotate(f"{b:.3f} → {a:.3f}", (max(a, b), i), xytext=(6, 0), textcoords="offset points",
                            va="center", fontsize=6)
            ax.set_yticks(range(len(keys)), keys, fontsize=7)
            ax.set_ylim(-0.6, len(keys) - 0.4)
            lo, hi = _fitted_limits([v for k in keys for v in (ba["before"][k], ba["after"][k])], min_pad=0.02)
            ax.set_xlim(lo, hi + 0.35 * (hi - lo))
            ax.set_title("evaluation rollouts: before ○ → after ●", fontsize=9)
            ax.grid(axis="x", alpha=0.25)
    accepted = (before_after or {}).get("metrics", {}).get("accepted")
    verdict = {1: " (RL prompt kept: it raised the evaluation reward)",
               0: " (RL prompt rejected: generate uses the step-1 prompt)"}.get(accepted, "")
    fig.suptitle(f"{name}: RL on the soft prompt{verdict}", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ store --- #
def _words(task: Task, row: Mapping[str, Any]) -> int:
    return len(task.serialise(row).split())


def store_figure(task: Task, entries: Sequence[Mapping[str, Any]] | None, train: Sequence[Mapping[str, Any]] | None):
    """Label balance (conditioning label, teacher's argmax, train), length against the train rows, and
    the teacher's confidence in each entry's soft label."""
    if not entries:
        return None
    c, labels = task.num_labels, task.labels
    soft = np.asarray([e["soft_label"] for e in entries], dtype=np.float64)
    cond = np.asarray([e["label"] if isinstance(e.get("label"), int) else -1 for e in entries])
    fig = new_figure(12.0, 3.5, left=0.6, right=0.25, bottom=0.95, top=0.55, wspace=0.3)
    ax_bal, ax_len, ax_conf = fig.subplots(1, 3)

    groups = [("store: conditioning label", np.bincount(cond[cond >= 0], minlength=c)),
              ("store: teacher's argmax", np.bincount(soft.argmax(1), minlength=c))]
    if train:
        groups.append(("train (real rows)", np.bincount([r["label"] for r in train], minlength=c)))
    width = 0.8 / len(groups)
    for g, (label, counts) in enumerate(groups):
        share = counts / max(1, counts.sum())
        xs = np.arange(c) - 0.4 + width * (g + 0.5)
        ax_bal.bar(xs, share, width, label=label, color=f"C{g}")
        for x, s, n in zip(xs, share, counts):
            ax_bal.text(x, s, str(int(n)), ha="center", va="bottom", fontsize=6)
    ax_bal.set_xticks(range(c), labels, rotation=25, ha="right", fontsize=7)
    ax_bal.set_ylabel("share of rows")
    ax_bal.set_title("label balance (counts on the bars)", fontsize=9)
    ax_bal.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.32), ncol=len(groups), frameon=False)

    lens_store = np.asarray([_words(task, e) for e in entries])
    lens_train = np.asarray([_words(task, r) for r in train]) if train else np.zeros(0)
    both = np.concatenate([lens_store, lens_train])
    bins = np.histogram_bin_edges(both, bins=min(30, max(5, len(np.unique(both)))))
    ax_len.hist(lens_store, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color="C0",
                label=f"store (median {np.median(lens_store):.0f})")
    if len(lens_train):
        ax_len.hist(lens_train, bins=bins, density=True, histtype="step", linewidth=1.5, color="C2",
                    label=f"train (median {np.median(lens_train):.0f})")
    ax_len.set_xlabel("words in the serialised input")
    ax_len.set_ylabel("density")
    ax_len.set_title("length: store vs real train rows", fontsize=9)
    ax_len.legend(fontsize=7)

    conf = soft.max(1)
    agree = soft.argmax(1) == cond
    edges = np.linspace(1.0 / c, 1.0, 13)
    ax_conf.hist([conf[agree], conf[~agree]], bins=edges, stacked=True, color=["C2", "C3"],
                 label=[f"argmax = conditioning label ({int(agree.sum())})",
                        f"argmax ≠ conditioning label ({int((~agree).sum())})"])
    ax_conf.set_xlabel("teacher's confidence (max of the soft label)")
    ax_conf.set_ylabel("entries")
    ax_conf.set_title("teacher confidence per entry", fontsize=9)
    ax_conf.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.22), frameon=False)
    fig.suptitle(f"{task.name}: knowledge store, {len(entries)} entries"
                 + (f" (train: {len(train)} rows)" if train else ""), fontsize=10)
    return fig


# -------------------------------------------------------------------------------------- retrieval --- #
def pick_examples(task: Task, validation: Sequence[Mapping[str, Any]], n: int) -> list[int]:
    """``n`` validation rows for the retrieval panel: the first of each gold label in turn (round robin)."""
    by_label: dict[int, list[int]] = {}
    for i, r in enumerate(validation):
        by_label.setdefault(r["label"], []).append(i)
    out: list[int] = []
    while len(out) < min(n, len(validation)):
        for label in sorted(by_label):
            if by_label[label] and len(out) < n:
                out.append(by_label[label].pop(0))
    return out


def retrieval_figure(task: Task, rows: Sequence[Mapping[str, Any]], preds: Sequence[Mapping[str, Any]],
                     student: str):
    """For each validation input: the input, its gold label and the student's prediction, then the
    retrieved store entries (similarity bar coloured by the entry's soft-label argmax, its text)."""
    if not rows:
        return None
    k = max(len(p.get("evidence", [])) for p in preds)
    block = 0.75 + 0.2 * k
    fig = new_figure(12.5, 0.7 + block * len(rows), left=0.15, right=0.15, bottom=0.3, top=0.55, hspace=0.55)
    grid = fig.add_gridspec(len(rows), 2, width_ratios=[1.6, 8.6], wspace=0.02)
    text_of = lambda r: " | ".join(f"{f}: {r[f]}" for f in task.text_fields)  # noqa: E731
    for n, (row, pred) in enumerate(zip(rows, preds)):
        evidence = pred.get("evidence", [])
        ax_bar, ax_txt = fig.add_subplot(grid[n, 0]), fig.add_subplot(grid[n, 1])
        sims = [e["similarity"] for e in evidence]
        arg = [int(np.argmax(list(e["soft_label"].values()))) for e in evidence]
        ax_bar.barh(range(len(sims)), sims, color=[label_color(a) for a in arg], height=0.75)
        ax_bar.set_ylim(k - 0.5, -1.9)
        ax_bar.set_xlim(min([0.0, *sims]), 1.0)
        ax_bar.set_yticks([])
        ax_bar.tick_params(labelsize=6)
        ax_bar.spines[["top", "right", "left"]].set_visible(False)
        ax_txt.set_axis_off()
        ax_txt.set_ylim(k - 0.5, -1.9)
        ax_txt.set_xlim(0, 1)
        gold = task.labels[row["label"]]
        mark = "✓" if pred["label"] == gold else "✗"
        head = f"gold {gold}  |  {student}: {pred['label']} {mark} (p {pred['proba'][pred['label']]:.2f})  |  "
        ax_txt.text(0.0, -1.3, textwrap.shorten(head + text_of(row), 175, placeholder=" …"), fontsize=7.5,
                    fontweight="bold", va="center")
        for i, e in enumerate(evidence):
            lab = task.labels[arg[i]]
            line = (f"{i + 1:2d}. sim {e['similarity']:+.3f}  soft {lab} {max(e['soft_label'].values()):.2f}"
                    f"  (asked: {e.get('label') or '–'})  " + text_of(e))
            ax_txt.text(0.0, i, textwrap.shorten(line, 170, placeholder=" …"), fontsize=6.5, va="center",
                        family="monospace", color="0.15")
    from matplotlib.patches import Patch

    handles = [Patch(color=label_color(i), label=name) for i, name in enumerate(task.labels)]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=7, frameon=False,
               title="bar colour = entry's soft-label argmax", title_fontsize=7)
    fig.suptitle(f"{task.name}: what {student} retrieves (top {k} store entries, cosine similarity)", fontsize=10,
                 x=0.02, ha="left")
    return fig


# ------------------------------------------------------------------------------------------- cost --- #
def cost_figure(t: Mapping[str, Any], name: str):
    """Primary metric against serving time (≈ ms/example) and against the bytes read at serving: one
    point per method (colour) and student size (marker; methods at the same spot are drawn as rings
    around the first); the teacher (star, bytes only: its latency is not measured) and the majority
    class as references."""
    from matplotlib.lines import Line2D

    points = [(size, c) for size, s in t["students"].items() for c in (s.get("serving") or [])
              if c["metric"] is not None]
    if not points:
        return None
    primary = t["primary"]
    fig = new_figure(10.5, 3.9, left=0.7, right=2.0, bottom=0.6, top=0.5, wspace=0.12)
    ax_t, ax_b = fig.subplots(1, 2, sharey=True)
    markers = {size: m for size, m in zip(t["students"], "osD^v")}
    timed = False
    seen: dict[tuple, int] = {}  # methods of one size cost the same bytes: a repeat is drawn as a ring around

    def draw(ax: Any, x: float, c: Mapping[str, Any], size: str) -> None:
        teacher = c["model"] == "teacher"
        k = seen.get((id(ax), round(x, 6), round(c["metric"], 6)), 0)
        seen[(id(ax), round(x, 6), round(c["metric"], 6))] = k + 1
        ax.plot([x], [c["metric"]], marker="*" if teacher else markers[size], linestyle="none",
                markersize=(11 if teacher else 7) + 4 * k, color=color(c["model"]),
                markerfacecolor=color(c["model"]) if k == 0 else "none", markeredgewidth=1.3 if k else 0.5,
                markeredgecolor=color(c["model"]) if k else "white", zorder=10 - k)

    for size, c in points:
        if c["serving_ms"] is not None:
            draw(ax_t, c["serving_ms"], c, size)
            timed = True
        if c["serving_bytes"] is not None and (c["model"] != "teacher" or size == next(iter(t["students"]))):
            draw(ax_b, c["serving_bytes"] / 2**20, c, size)
    if not timed:
        ax_t.text(0.5, 0.5, "serving time not measured A/B in this run", ha="center", va="center",
                  transform=ax_t.transAxes, fontsize=8, color="0.4")
        ax_t.set_xticks([])
    values = [c["metric"] for _, c in points]
    majority = t["majority"]["metrics"][primary] if t.get("majority") else None
    if majority is not None:
        values.append(majority)
        for ax in (ax_t, ax_b):
            ax.axhline(majority, **REFERENCE["majority"])
        ax_b.annotate(f"majority {majority:.3f}", (1.0, majority), xycoords=("axes fraction", "data"), xytext=(4, 0),
                      textcoords="offset points", va="center", fontsize=7, color=REFERENCE["majority"]["color"])
    ax_t.set_ylim(*_fitted_limits(values))
    ax_t.set_xlabel("≈ ms per example at serving (batch 1)")
    ax_b.set_xlabel("MiB read at serving (model + store)")
    ax_t.set_ylabel(primary)
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.25)
    models = list(dict.fromkeys(c["model"] for _, c in points if c["model"] != "teacher"
                                or c["serving_bytes"] is not None))
    handles = [Line2D([], [], marker="*" if m == "teacher" else "o", color=color(m), linestyle="none", label=m)
               for m in models]
    handles += [Line2D([], [], marker=mk, color="0.35", linestyle="none", label=f"{size} students")
                for size, mk in markers.items()]
    ax_b.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.suptitle(f"{name}: {primary} against serving cost (up and left is better)", fontsize=10)
    return fig


# ------------------------------------------------------------------------------- learning curves --- #
def learning_curves(task: Task, teacher: Sequence[Mapping[str, Any]] | None,
                    students: Mapping[str, Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]]):
    """Teacher + student curves: top row train loss, bottom row the validation primary metric.
    ``students``: size -> method -> one row list per seed (missing seeds left out)."""
    if teacher is None and not any(runs for by_m in students.values() for runs in by_m.values()):
        return None
    primary = task.metrics[0]
    cols = 1 + len(students)
    fig = new_figure(3.6 * cols, 6.0, top=0.65, hspace=0.25)
    axes = fig.subplots(2, cols, squeeze=False)
    val = f"val_{primary}"
    axes[0, 0].set_title("teacher")
    if teacher is None:
        _no_data(axes[0, 0], "teacher_curve missing")
    else:
        axes[0, 0].plot(*_series(teacher, "epoch", "train_loss"), marker="o", color=color("teacher"))
        keys = [val] if any(val in r for r in teacher) else sorted({k for r in teacher for k in r
                                                                     if k.startswith("val_")})
        for k in keys:
            axes[1, 0].plot(*_series(teacher, "epoch", k), marker="o", label=k)
        if keys:
            axes[1, 0].legend(fontsize=7)
    for col, (size, by_method) in enumerate(students.items(), start=1):
        axes[0, col].set_title(f"students {size}")
        for method, runs in by_method.items():
            for i, rows in enumerate(runs):
                label = method if i == 0 else None
                alpha = 1.0 if i == 0 else 0.5
                axes[0, col].plot(*_series(rows, "epoch", "train_loss"), color=color(method), label=label, alpha=alpha)
                axes[1, col].plot(*_series(rows, "epoch", val), color=color(method), label=label, alpha=alpha)
        if axes[1, col].get_legend_handles_labels()[0]:
            axes[1, col].legend(fontsize=7)
        else:
            _no_data(axes[0, col], "student curves missing")
    for ax in axes[0]:
        ax.set_ylabel("train loss")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.set_ylabel(val)
    fig.suptitle(f"{task.name}: learning curves")
    return fig
