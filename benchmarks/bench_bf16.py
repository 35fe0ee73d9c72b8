"""Milliseconds per training step in float32 vs bfloat16 on this CPU, with a torch.profiler breakdown.

Not a test: a benchmark (run it alone; ``flock /tmp/retrikt-cpu.lock`` here). One training step is
the pipeline's: forward, loss, backward, clip to norm 1, AdamW step (:func:`retrikt.classifier.fit`),
on real rows (CB train, truncated to ``--max-length``; the batch is padded to its longest row).

Models: ``teacher`` (all 6 layers of ``models/base/encoder`` + head), ``L2``/``L4`` students (their
first 2 / 4 layers, cross-entropy: the ``finetune`` step; the other methods add loss terms on the same
forward), and ``prompt`` (SmolLM2-135M frozen, ``models/base/generator``, a 16-token soft prompt
trainable: the prompt_tune step, CB rows serialised as its targets).

Modes (``--modes``):
* ``fp32``: the default.
* ``autocast``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss; weights and
  optimiser fp32.
* ``bf16``: bf16 weights for forward/backward, fp32 master weights in AdamW (copied back to the bf16
  model after each step; gradients cast up before clipping; :class:`MasterWeights` below) — inside the
  same autocast, so the ops autocast keeps in fp32 (softmax, layer norm, the losses) still
  compute in fp32 while the matmuls find their weights already in bf16 (no per-step weight casts).
  For ``prompt`` the frozen generator is simply held in bf16 (it has no master weights to keep), the
  soft prompt in fp32, without autocast (as prompt_tune does).
* ``+fused`` (e.g. ``fp32+fused``): AdamW with ``fused=True`` (torch's vectorised CPU kernel) instead of
  the default per-tensor loop.

Every mode of a model is built first (same seed, so the same head and prompt init); then each timed
round runs one step of every mode in a rotating order, so drifts in machine load hit all modes alike.

    python benchmarks/bench_bf16.py --models teacher L2 L4 prompt --steps 6
    python benchmarks/bench_bf16.py --models teacher --modes fp32 bf16 --profile   # top ops per mode
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class MasterWeights:
    """bf16 model weights for forward/backward with float32 master copies (``params``) for the optimiser."""

    def __init__(self, model):
        import torch

        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params = [p.detach().clone().float().requires_grad_(True) for p in self.model_params]
        model.to(torch.bfloat16)  # in place: the Parameter objects stay, their data is cast

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None

    def grads_to_master(self) -> None:
        for m, p in zip(self.params, self.model_params):
            m.grad = None if p.grad is None else p.grad.float()

    def master_to_model(self) -> None:
        import torch

        with torch.no_grad():
            for m, p in zip(self.params, self.model_params):
                p.copy_(m)


def _encoder_step(model_name: str, mode: str, rows, batch: int, max_length: int):
    import torch

    from retrikt.classifier import Classifier
    from retrikt.tasks import get_task

    layers = {"teacher": None, "L2": 2, "L4": 4}[model_name]
    clf = Classifier.from_base(REPO / "models/base/encoder", get_task("cb"), max_length, num_layers=layers)
    clf.model.train()
    mode, fused = mode.split("+")[0], mode.endswith("+fused")
    master = MasterWeights(clf.model) if mode == "bf16" else None
    params = master.params if master else list(clf.model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=fused or None)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if mode != "fp32" else contextlib.nullcontext()
    y = torch.tensor([r["label"] for r in rows[:batch]])
    enc = clf.encode(rows[:batch])

    def step():
        with cast:
            logits = clf.model(**enc).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        if master:
            master.zero_grad()
        loss.backward()
        if master:
            master.grads_to_master()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if master:
            master.master_to_model()
        return float(loss)

    return step, {"tokens": int(enc["attention_mask"].sum()), "shape": list(enc["input_ids"].shape)}


def _prompt_step(mode: str, rows, batch: int, max_length: int):
    import torch

    from retrikt.llm import attach_prompt, source_text, target_text, token_nll, tokenize_for_training
    from retrikt.models import load_generator
    from retrikt.tasks import get_task

    mode = mode.split("+")[0]  # one 16x576 prompt tensor: the optimiser kind does not matter
    gen_dir = REPO / "models/base/generator"
    model, tok = load_generator(gen_dir)
    if mode == "bf16":
        model.to(torch.bfloat16)
    model = attach_prompt(model, 16, "text", "Write a new example for the task described below.", gen_dir).eval()
    emb = model.prompt_encoder["default"].embedding
    emb.float()  # the trainable prompt stays fp32 (its own master); PEFT casts its output to the model's dtype
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    task = get_task("cb")
    data = tokenize_for_training(tok, [source_text(task, r["label"]) for r in rows[:batch]],
                                 [target_text(task, r) for r in rows[:batch]], max_length, False)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()

    def step():
        with cast:
            s, n = token_nll(model, data, False)
            loss = s / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step, {"tokens": int(data["attention_mask"].sum()), "shape": list(data["input_ids"].shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["teacher", "L2", "L4", "prompt"],
                    choices=["teacher", "L2", "L4", "prompt"])
    ap.add_argument("--modes", nargs="+", default=["fp32", "autocast", "bf16"],
                    choices=[f"{m}{o}" for m in ("fp32", "autocast", "bf16") for o in ("", "+fused")])
    ap.add_argument("--steps", type=int, default=6,
                    help="timed rounds per model (each runs every mode once, after 2 warm-up steps each)")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 (encoders), 8 (prompt)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one step")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from retrikt.io import read_jsonl
    from retrikt.tracking import disable_telemetry

    disable_telemetry()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = read_jsonl(REPO / "data/processed/cb/train.jsonl")
    rows = sorted(rows, key=lambda r: -len(r["premise"]))  # the long rows: the batch fills max_length
    results = []
    for name in args.models:
        batch = args.batch or (8 if name == "prompt" else 16)
        steps, losses, times = {}, {}, {m: [] for m in args.modes}
        for mode in args.modes:
            torch.manual_seed(0)  # the same head / prompt init in every mode
            steps[mode], info = (_prompt_step(mode, rows, batch, args.max_length) if name == "prompt"
                                 else _encoder_step(name, mode, rows, batch, args.max_length))
            losses[mode] = [steps[mode]() for _ in range(2)]  # warm-up
        for r in range(args.steps):  # interleaved: every round runs each mode once, in a rotating order
            order = args.modes[r % len(args.modes):] + args.modes[:r % len(args.modes)]
            for mode in order:
                t0 = time.perf_counter()
                losses[mode].append(steps[mode]())
                times[mode].append(1000 * (time.perf_counter() - t0))
        base = float(np.median(times["fp32"])) if "fp32" in times else None
        for mode in args.modes:
            ms = float(np.median(times[mode]))
            row = {"model": name, "mode": mode, "batch": info["shape"], "ms_per_step": round(ms, 1),
                   "ms_min_max": [round(min(times[mode]), 1), round(max(times[mode]), 1)],
                   "speedup_vs_fp32": round(base / ms, 3) if base else None,
                   "loss_first_last": [round(losses[mode][0], 4), round(losses[mode][-1], 4)],
                   "threads": args.threads}
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                    steps[mode]()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                                max_name_column_width=40), flush=True)
        del steps
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
