"""Seconds per epoch of every student method with the real models (not a test).

Builds a throw-away repo in a temporary folder: CB train/validation from ``data/processed/cb``, the
real encoder and teacher (``models/base/encoder``, ``models/cb/teacher``; an untrained head on the
encoder if the teacher is not trained yet), and — TIMING ONLY — a stand-in store made of the
``--store`` shortest train rows (generated entries are at most ``generate.max_new_tokens`` tokens
long), soft-labelled by the teacher. The pipeline never does this: its store comes from the
generate stage. Then runs the index stage and one student per method × layers.

    python benchmarks/bench_students.py --quick    # < 2 min: finetune + retrikt, L2, fp32 vs bf16, 1 epoch
                                                   # over 64 train rows and a 64-entry store (4 batches)
    python benchmarks/bench_students.py --epochs 1 --layers 2 4 --out /tmp/bench_students.json
    python benchmarks/bench_students.py --dtypes float32 bfloat16 --seeds 0 1 2 --epochs 3 --layers 2 \
        --teacher models/cb/teacher          # fp32/bf16 seconds per epoch and accuracy, per method

With several ``--dtypes`` (``student.dtype``), each method × layers × seed is trained in every dtype
back to back, and a closing table gives per method the epoch seconds per dtype, the float32/bf16 ratio
(median over seeds) and the validation accuracy mean ± std over the seeds per dtype.

Reported per run: ``setup_seconds`` (one-off teacher passes, candidate mining), ``epoch_seconds``
(one epoch + its validation pass), ``total_seconds`` (the whole ``train_student`` call, saving and
latency included), ``cpu_seconds`` (process CPU time of that call, all threads) and the load average
before/after — on a shared machine wall times are inflated by other processes, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_repo(root: Path, store_size: int, teacher: Path | None = None, train_rows: int | None = None) -> None:
    import numpy as np

    from retrikt import paths
    from retrikt.classifier import Classifier
    from retrikt.io import read_jsonl, write_jsonl

    for split in ("train", "validation"):
        rows = read_jsonl(REPO / paths.split_file("cb", split))
        write_jsonl(paths.split_file("cb", split), rows[:train_rows] if split == "train" else rows)
    paths.base_model("encoder").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(REPO / paths.base_model("encoder"), paths.base_model("encoder"))
    real_teacher = teacher or REPO / paths.teacher("cb")
    if (real_teacher / "model.safetensors").exists():  # a copy: the pipeline may replace the original
        shutil.copytree(real_teacher, paths.teacher("cb"))
    else:
        from retrikt.tasks import get_task

        Classifier.from_base(paths.base_model("encoder"), get_task("cb")).save(paths.teacher("cb"))
    teacher = Classifier.load(paths.teacher("cb"))
    rows = read_jsonl(paths.split_file("cb", "train"))  # stand-in store: timing only
    rows = sorted(rows, key=lambda r: len(teacher.tokenizer(*teacher.task.render(r))["input_ids"]))[:store_size]
    soft = teacher.predict_proba(rows).astype(np.float64)
    write_jsonl(paths.store_entries("cb"), [
        {"id": i, "premise": r["premise"], "hypothesis": r["hypothesis"], "label": r["label"],
         "soft_label": (s / s.sum()).tolist(), "text": ""} for i, (r, s) in enumerate(zip(rows, soft))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="finetune and retrikt, L2, 1 epoch of 64 train rows and a 64-entry store, float32 vs "
                         "bfloat16, 2 threads (< 2 min, also where bf16 is emulated)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default 2 4 (quick: 2)")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--store", type=int, default=None, help="stand-in store entries (default 150; quick 64)")
    ap.add_argument("--train-rows", type=int, default=None,
                    help="the first N CB train rows (default all 250; quick 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                    help="student.dtype values to compare (default: params.yaml's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--teacher", type=Path, default=None,
                    help="a trained teacher folder (default: models/cb/teacher, else an untrained head)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.methods = args.methods or ["finetune", "retrikt"]
        args.dtypes = args.dtypes or ["float32", "bfloat16"]
        args.threads = args.threads or 2
        args.train_rows = args.train_rows or 64
        args.store = args.store or 64
    args.store = args.store or 150
    args.layers = args.layers or ([2] if args.quick else [2, 4])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("RETRIKT_MLFLOW", "0")

    from retrikt.distill.train import train_student
    from retrikt.index import index as index_stage
    from retrikt.io import load_yaml
    from retrikt.methods import METHODS
    from retrikt.params import parse_params
    from retrikt.tracking import StageRun, disable_telemetry

    disable_telemetry()
    raw = load_yaml((REPO / "params.yaml").read_text())
    raw["student"]["epochs"] = args.epochs
    dtypes = args.dtypes or [raw["student"]["dtype"]]
    by_dtype = {}
    for dtype in dtypes:
        raw["student"]["dtype"] = dtype
        by_dtype[dtype] = parse_params(raw)
    params = by_dtype[dtypes[0]]
    teacher = args.teacher.resolve() if args.teacher else None
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-students-") as tmp:
        os.chdir(tmp)
        build_repo(Path(tmp), args.store, teacher, args.train_rows)
        with StageRun("index", metrics_path=None, task="cb") as run:
            print("index:", json.dumps(index_stage(params, "cb", run)), flush=True)
        for layers, method, seed, dtype in ((lay, meth, sd, dt) for lay in args.layers
                                            for meth in args.methods or METHODS
                                            for sd in args.seeds for dt in dtypes):
            load0, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
            with StageRun("train_student", metrics_path=None, task="cb") as run:
                m = train_student(by_dtype[dtype], "cb", run, method=method, layers=layers, seed=seed)
            row = {"method": method, "layers": layers, "seed": seed, "dtype": dtype, "epochs": args.epochs,
                   "setup_seconds": round(m["setup_seconds"], 1), "epoch_seconds": round(m["epoch_seconds"], 1),
                   "total_seconds": round(time.perf_counter() - t0, 1),
                   "cpu_seconds": round(time.process_time() - c0, 1),
                   "latency_ms": round(m["latency_ms"], 1), "forward_latency_ms": round(m["forward_latency_ms"], 1),
                   "accuracy": round(m["accuracy"], 3), "load_avg": [round(load0, 1), round(os.getloadavg()[0], 1)]}
            results.append(row)
            print(json.dumps(row), flush=True)
    if len(dtypes) > 1:
        print(dtype_table(results, dtypes))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def dtype_table(rows: list[dict], dtypes: list[str]) -> str:
    """Per method × layers: epoch seconds per dtype, the first dtype / each other ratio (median over
    seeds, paired by seed) and accuracy mean ± std over seeds per dtype, as Markdown."""
    import numpy as np

    order = [r["method"] for r in rows]
    keys = sorted({(r["layers"], r["method"]) for r in rows}, key=lambda k: (k[0], order.index(k[1])))
    head = ["method", "L"] + [f"{d} s/epoch" for d in dtypes] + [f"{dtypes[0]}/{d}" for d in dtypes[1:]] + \
        [f"acc {d}" for d in dtypes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layers, method in keys:
        rs = {d: {r["seed"]: r for r in rows if (r["layers"], r["method"], r["dtype"]) == (layers, method, d)}
              for d in dtypes}
        secs = [f"{np.median([r['epoch_seconds'] for r in rs[d].values()]):.1f}" for d in dtypes]
        first = rs[dtypes[0]]
        ratios = [f"{np.median([first[s]['epoch_seconds'] / r['epoch_seconds'] for s, r in rs[d].items()]):.2f}×"
                  for d in dtypes[1:]]
        accs = []
        for d in dtypes:
            a = [r["accuracy"] for r in rs[d].values()]
            accs.append(f"{np.mean(a):.3f} ± {np.std(a, ddof=1):.3f}" if len(a) > 1 else f"{a[0]:.3f}")
        lines.append("| " + " | ".join([method, str(layers), *secs, *ratios, *accs]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
