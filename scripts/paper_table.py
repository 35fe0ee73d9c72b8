"""The paper's table (README "The paper's table"), one task at a time.

  python scripts/paper_table.py collect CLONE TASK --started UNIX --ended UNIX
      copy what a finished run in CLONE made for TASK into reports/experiments/table/TASK/
      (params.yaml, dvc.lock, results.{json,md}, the task's metrics, predictions, plots and figures,
      run.json: commit, times, machine, threads)
  python scripts/paper_table.py table [--root reports/experiments/table] [--tasks A,B --name NAME]
      rebuild table.{md,json} over every task collected so far (or NAME.{md,json} over the tasks
      named): per task and student size each method's mean ± std over seeds, RetriKT − best baseline
      and RetriKT − RetriKT-KD with the run's own paired bootstrap CI, then across tasks the equal-weight
      mean, a paired bootstrap stratified by task (retrikt.report.stats.pooled_bootstrap) and a sign
      test over tasks, and the run hours.

``bash scripts/paper_table.sh TASK`` runs a task and calls both. Uses this checkout's .venv.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from retrikt.io import atomic_write_json, atomic_write_text, load_yaml, read_json
from retrikt.methods import BASELINES, METHODS
from retrikt.report.inputs import load_predictions
from retrikt.report.stats import Comparison, pooled_bootstrap, sign_test
from retrikt.tasks import get_task

ROOT = Path("reports/experiments/table")
PROPOSED, STORE_KD = "retrikt", "retrikt_kd"
TITLE = "The paper's table, re-made"
STORE_KEYS = ("samples", "size", "parse_rate", "finished_rate", "eos_rate", "truncated_in_store", "max_new_tokens",
              "teacher_agreement", "self_bleu", "self_bleu_train")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(clone: Path, task: str, started: int, ended: int, root: Path) -> Path:
    params = load_yaml((clone / "params.yaml").read_text())
    if params.get("tasks") != [task]:
        sys.exit(f"paper_table: {clone}/params.yaml has tasks {params.get('tasks')}, expected [{task}]")
    results = clone / "reports/results.json"
    if not results.exists():
        sys.exit(f"paper_table: {results} is missing: the run did not reach evaluate")
    out = root / task
    tmp = root / f".{task}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("params.yaml", "dvc.lock"):
        shutil.copy2(clone / name, tmp / name)
    for name in ("results.json", "results.md", "metrics.json"):
        shutil.copy2(clone / "reports" / name, tmp / name)
    for kind in ("metrics", "predictions", "plots", "figures", "timings"):
        src = clone / "reports" / kind / task
        if src.exists():
            shutil.copytree(src, tmp / kind)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    atomic_write_json(tmp / "run.json", {
        "task": task, "commit": commit, "train_limit": params["data"]["train_limit"], "seeds": params["seeds"],
        "threads": params["threads"], "started_unix": started, "ended_unix": ended, "wall_seconds": ended - started,
        "cpu": _cpu(), "cores": os.cpu_count()})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _int(x: int | None) -> str:
    return "–" if x is None else f"{x:,}"


def _cell(row: dict, primary: str) -> str:
    m = row["metrics"][primary]
    return _fmt(m["mean"]) + ("" if m["std"] is None else f" ± {_fmt(m['std'])}")


def _cmp(c: dict | None) -> str:
    if c is None:
        return "–"
    b = c["bootstrap"]
    if b is None:
        return f"{c['delta']:+.3f}"
    return f"{c['delta']:+.3f} [{b['ci'][0]:+.3f}, {b['ci'][1]:+.3f}] (p {b['p_value']:.3f})"


def _preds(task_dir: Path, task, method: str, layers: int, seeds: list[int]) -> list[np.ndarray]:
    return [load_predictions(task_dir / "predictions" / f"{method}-L{layers}-s{s}.json", task.num_labels)
            for s in seeds]


def table(root: Path, samples: int, confidence: float, seed: int,
          title: str = TITLE, only: list[str] | None = None) -> tuple[dict, str]:
    tasks = sorted(p.parent.name for p in root.glob("*/results.json"))
    if not tasks:
        sys.exit(f"paper_table: no task under {root} (run bash scripts/paper_table.sh TASK first)")
    if only:
        missing = sorted(set(only) - set(tasks))
        if missing:
            sys.exit(f"paper_table: no collected run for {', '.join(missing)} under {root} (have {', '.join(tasks)})")
        tasks = sorted(set(only))
    rows, stores, per_size, hours = [], [], {}, 0.0
    for name in tasks:
        d = root / name
        res, run = read_json(d / "results.json"), read_json(d / "run.json")
        t = res["tasks"][name]
        task, primary = get_task(name), t["primary"]
        hours += run["wall_seconds"] / 3600
        st = t["store"] or {}
        rm = ((t["index"] or {}).get("rm_retrieval") or {}).get(primary)
        teacher_model = load_yaml((d / "params.yaml").read_text())["teacher"]["model"]
        stores.append({"task": name, "hours": run["wall_seconds"] / 3600, "threads": run["threads"],
                       "cpu": run["cpu"], "teacher_model": teacher_model,
                       "teacher": read_json(d / "metrics" / "teacher.json").get(primary), "rm_retrieval": rm,
                       **{k: st.get(k) for k in STORE_KEYS}})
        for size, s in t["students"].items():
            r = s["rows"]
            seeds = r[PROPOSED]["seeds"]
            best = s["best_baseline"]
            entry = {"task": name, "size": size, "primary": primary, "train_limit": run["train_limit"],
                     "validation": t["validation_examples"], "seeds": seeds, "store": (t["index"] or {}).get("entries"),
                     "teacher": r["teacher"]["metrics"][primary]["mean"] if "teacher" in r else None,
                     "majority": t["majority"]["metrics"][primary],
                     "methods": {m: r[m]["metrics"][primary] for m in METHODS if m in r},
                     "best_baseline": best, "vs_best": s["comparison"], "vs_retrikt_kd": s["vs_retrikt_kd"]}
            rows.append(entry)
            a = _preds(d, task, PROPOSED, s["layers"], seeds)
            labels = a[0].labels
            for key, other in (("vs_best", best), ("vs_retrikt_kd", STORE_KD)):
                b = _preds(d, task, other, s["layers"], seeds)
                per_size.setdefault(size, {}).setdefault(key, []).append(
                    Comparison(task, labels, [p.preds for p in a], [p.preds for p in b], primary))
    pooled = {}
    for size, comps in sorted(per_size.items()):
        pooled[size] = {}
        for key, parts in comps.items():
            rng = np.random.default_rng([seed, zlib.crc32(f"pooled-{key}".encode()), int(size[1:])])
            boot = pooled_bootstrap(parts, samples=samples, confidence=confidence, rng=rng).to_dict()
            deltas = [e[key]["delta"] for e in rows if e["size"] == size]
            pooled[size][key] = {"bootstrap": boot, "sign_test": sign_test(deltas), "tasks": len(parts)}
        pooled[size]["means"] = {m: float(np.mean([e["methods"][m]["mean"] for e in rows if e["size"] == size]))
                                 for m in METHODS if all(m in e["methods"] for e in rows if e["size"] == size)}
    out = {"tasks": tasks, "rows": rows, "pooled": pooled, "stores": stores, "run_hours": hours,
           "bootstrap": {"samples": samples, "confidence": confidence, "seed": seed,
                         "unit": "validation examples, resampled within each task; tasks weighted equally"}}
    return out, render(out, title)


def render(t: dict, title: str = TITLE) -> str:
    methods = [m for m in METHODS if all(m in e["methods"] for e in t["rows"])]
    head = "| task (train / val) | L | teacher | majority | " + " | ".join(methods) + \
        " | RetriKT − best baseline [95 % CI] (p) | RetriKT − RetriKT-KD [95 % CI] (p) |"
    lines = [f"# {title}", "",
             "Primary metric of each task on its validation split, mean ± std over seeds "
             "(`bash scripts/paper_table.sh TASK`; each task's reports are in its folder here). "
             "Best baseline: the highest mean among " + ", ".join(BASELINES) + " (chosen on the same validation "
             "rows, which favours the baseline). CIs: paired bootstrap over validation examples.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for e in t["rows"]:
        cells = [_cell({"metrics": {e["primary"]: e["methods"][m]}}, e["primary"]) for m in methods]
        lines.append(f"| {e['task']} ({e['train_limit'] or 'all'} / {e['validation']}) | {e['size'][1:]} | "
                     f"{_fmt(e['teacher'])} | {_fmt(e['majority'])} | " + " | ".join(cells) +
                     f" | {_cmp(e['vs_best'])} (vs {e['best_baseline']}) | {_cmp(e['vs_retrikt_kd'])} |")
    lines += ["", "Across tasks (equal weight per task):", "",
              "| L | mean per method | RetriKT − best baseline: pooled bootstrap | sign test (won / lost, p) "
              "| RetriKT − RetriKT-KD: pooled bootstrap | sign test |", "|---|---|---|---|---|---|"]
    for size, p in t["pooled"].items():
        means = ", ".join(f"{m} {v:.3f}" for m, v in p["means"].items())
        cols = []
        for key in ("vs_best", "vs_retrikt_kd"):
            b, s = p[key]["bootstrap"], p[key]["sign_test"]
            cols += [f"{b['estimate']:+.3f} [{b['ci'][0]:+.3f}, {b['ci'][1]:+.3f}] (p {b['p_value']:.3f})",
                     f"{s['positive']} / {s['negative']} (p {s['p_value']:.3f})"]
        lines.append(f"| {size[1:]} | {means} | " + " | ".join(cols) + " |")
    lines += ["", "The knowledge store per task (the `generate` stage's metrics):", "",
              "| task | samples | entries | parse rate | ended by themselves | EOS | truncated | max_new_tokens "
              "| teacher agreement | self-BLEU store / train | teacher (model) / reward model as the retriever "
              "| run hours | CPU |",
              "|---|" + "---:|" * 11 + "---|"]
    for e in t["stores"]:
        lines.append(f"| {e['task']} | {_int(e['samples'])} | {_int(e['size'])} | {_fmt(e['parse_rate'])} | "
                     f"{_fmt(e['finished_rate'])} | {_fmt(e['eos_rate'])} | {_int(e['truncated_in_store'])} | "
                     f"{_int(e['max_new_tokens'])} | {_fmt(e['teacher_agreement'])} | {_fmt(e['self_bleu'])} / "
                     f"{_fmt(e['self_bleu_train'])} | {_fmt(e['teacher'])} ({e['teacher_model']}) / "
                     f"{_fmt(e['rm_retrieval'])} | {e['hours']:.2f} | {e['cpu']} |")
    threads = sorted({e["threads"] for e in t["stores"]})
    lines += ["", f"Tasks: {len(t['tasks'])}; run time {t['run_hours']:.2f} h wall in all, at "
              f"{'/'.join(map(str, threads))} threads (core hours: wall × threads).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("clone", type=Path)
    c.add_argument("task")
    c.add_argument("--started", type=int, required=True)
    c.add_argument("--ended", type=int, required=True)
    c.add_argument("--root", type=Path, default=ROOT)
    t = sub.add_parser("table")
    t.add_argument("--root", type=Path, default=ROOT)
    t.add_argument("--samples", type=int, default=1000)
    t.add_argument("--confidence", type=float, default=0.95)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--title", default=TITLE)
    t.add_argument("--tasks", default="", help="comma-separated subset of the collected tasks (default: all)")
    t.add_argument("--name", default="table", help="output stem under --root: NAME.md and NAME.json")
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        print(collect(args.clone, args.task, args.started, args.ended, args.root))
        return
    only = [x.strip() for x in args.tasks.split(",") if x.strip()]
    out, md = table(args.root, args.samples, args.confidence, args.seed, args.title, only)
    atomic_write_json(args.root / f"{args.name}.json", out)
    atomic_write_text(args.root / f"{args.name}.md", md)
    print(md)


if __name__ == "__main__":
    main()
