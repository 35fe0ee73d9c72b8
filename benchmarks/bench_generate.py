"""Tokens/s of our sampler vs plain float32 ``transformers`` ``generate`` on the same soft-prompted model.

One run, the same prompts (label-balanced conditions of the task), the same budget, the same token
counting (generated tokens up to and including the first EOS; padding and anything after EOS not
counted). Also the quality checks: mean NLL per target token of real serialised validation examples
under our decoder (its dtype) vs ``transformers`` in float32 (within 1 %), and the parse rate of
both runs' samples (strict :meth:`Task.read`; a sample cut by the budget does not parse).

    python benchmarks/bench_generate.py                 # cb, models/cb/prompt if it exists, 2 threads
    python benchmarks/bench_generate.py --quick         # < 2 minutes
    python benchmarks/bench_generate.py --task rte --prompt models/rte/prompt --samples 512

The baseline is ``generate(inputs_embeds=[prompt; source], do_sample, top_p, top_k=0)`` at batch
``--hf-batch`` in float32 — what the pipeline did before retrikt.sampling. Our side ends samples at
EOS only here (no ``end_at_last_line``), so both sides do the same work per sample.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def hf_generate(model, tok, sources, *, max_new_tokens, temperature, top_p, batch_size, seed):
    """Plain float32 transformers generate on [soft prompt; source] (left-padded); (texts, tokens)."""
    import torch
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts, tokens = [], 0
    for b, i in enumerate(range(0, len(sources), batch_size)):
        enc = tok(list(sources[i:i + batch_size]), padding=True, padding_side="left", return_tensors="pt")
        emb, mask = base.get_input_embeddings()(enc["input_ids"]), enc["attention_mask"]
        if isinstance(model, PeftModel):
            n = int(model.active_peft_config.num_virtual_tokens)
            prompt = model.get_prompt(batch_size=emb.shape[0])[:, :n].to(emb.dtype)
            emb, mask = torch.cat([prompt, emb], 1), torch.cat([mask.new_ones(emb.shape[0], n), mask], 1)
        torch.manual_seed(seed + b)
        out = base.generate(inputs_embeds=emb, attention_mask=mask, do_sample=True, temperature=temperature,
                            top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        for row in out.tolist():
            done = eos in row
            row = row[:row.index(eos)] if done else row
            texts.append((tok.decode(row, skip_special_tokens=True).strip(), done))
            tokens += len(row) + done
    return texts, tokens


def ours_nll(model, tok, task, rows, dtype) -> float:
    """Mean NLL per target token (EOS included) of ``rows`` under LlamaDecoder in ``dtype``."""
    import torch
    import torch.nn.functional as F

    from retrikt.llm import source_text, target_text
    from retrikt.sampling import DTYPES, LlamaDecoder, _prefix_embeds

    base = model.get_base_model()
    total, count = 0.0, 0
    with torch.no_grad():
        dec = None
        for r in rows:
            prefix = _prefix_embeds(model, tok, source_text(task, r["label"]))
            tgt = tok(target_text(task, r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            x = torch.cat([prefix, base.get_input_embeddings()(torch.tensor(tgt))])
            if dec is None or dec.max_len < len(x):
                dec = LlamaDecoder(base, DTYPES[dtype], 1, max(512, len(x)))
            logits = dec.prefill(x, 0, all_logits=True)[prefix.shape[0] - 1:-1]
            total += float(F.cross_entropy(logits, torch.tensor(tgt), reduction="sum"))
            count += len(tgt)
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="cb")
    ap.add_argument("--prompt", default=None, help="soft prompt folder (default models/<task>/prompt if present)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max-new-tokens", default="auto")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--slots", type=int, default=128, help="our decode slots")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="our sampler's dtype; auto: bfloat16 where the CPU computes it natively, else float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nll-rows", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="64 samples, max_new_tokens 96, 16 NLL rows")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.max_new_tokens, args.nll_rows = 64, "96", 16

    import os

    os.chdir(REPO)
    import torch

    torch.set_num_threads(args.threads)
    from retrikt.device import resolve_dtype

    args.dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    from peft import PeftModel

    from retrikt import paths
    from retrikt.io import read_jsonl
    from retrikt.llm import length_budget, load_with_prompt, nll, sample_full, source_text, target_text
    from retrikt.models import load_generator
    from retrikt.tasks import get_task

    task = get_task(args.task)
    prompt = Path(args.prompt) if args.prompt else paths.prompt(task.name)
    if (prompt / "adapter_config.json").exists():
        model, tok = load_with_prompt(paths.base_model("generator"), prompt)
    else:
        print(f"no soft prompt at {prompt}: the bare generator")
        model, tok = load_generator(paths.base_model("generator"))
    train = read_jsonl(paths.split_file(task.name, "train"))
    val = read_jsonl(paths.split_file(task.name, "validation"))[:args.nll_rows]
    budget = length_budget(args.max_new_tokens if args.max_new_tokens == "auto" else int(args.max_new_tokens),
                           tok, task, train)
    sources = [source_text(task, i % task.num_labels) for i in range(args.samples)]
    print(f"{task.name}: {len(sources)} samples, max_new_tokens {budget}, T {args.temperature}, top-p {args.top_p}, "
          f"{args.threads} threads, torch {torch.__version__}")

    t0 = time.perf_counter()
    ours = sample_full(model, tok, sources, max_new_tokens=budget, temperature=args.temperature, top_p=args.top_p,
                       batch_size=args.slots, seed=0, dtype=args.dtype)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf, hf_tokens = hf_generate(model, tok, sources, max_new_tokens=budget, temperature=args.temperature,
                                top_p=args.top_p, batch_size=args.hf_batch, seed=0)
    t_hf = time.perf_counter() - t0

    def parse_rate(pairs):
        return sum(done and task.read(t)[0] is not None for t, done in pairs) / len(pairs)

    ours_parse = parse_rate(list(zip(ours.texts, ours.finished)))
    hf_parse = parse_rate(hf)
    fp32_nll = nll(model, tok, [source_text(task, r["label"]) for r in val], [target_text(task, r) for r in val],
                   4096, 4, seq2seq=False)
    our_nll = ours_nll(model, tok, task, val, args.dtype) if isinstance(model, PeftModel) else float("nan")
    res = {
        "task": task.name, "samples": len(sources), "max_new_tokens": budget, "threads": args.threads,
        "ours": {"tokens": ours.tokens, "seconds": t_ours, "tokens_per_second": ours.tokens / t_ours,
                 "parse_rate": ours_parse, "eos_rate": Counter(ours.ended)["eos"] / len(sources),
                 "slots": args.slots, "dtype": args.dtype},
        "hf_fp32": {"tokens": hf_tokens, "seconds": t_hf, "tokens_per_second": hf_tokens / t_hf,
                    "parse_rate": hf_parse, "eos_rate": sum(d for _, d in hf) / len(hf), "batch": args.hf_batch},
        "nll": {"hf_fp32": fp32_nll, "ours": our_nll, "relative_difference": abs(our_nll - fp32_nll) / fp32_nll,
                "rows": len(val)},
    }
    res["speedup"] = res["ours"]["tokens_per_second"] / res["hf_fp32"]["tokens_per_second"]
    o, h, n = res["ours"], res["hf_fp32"], res["nll"]
    print(f"ours ({args.dtype}, {args.slots} slots): {o['tokens']} tokens in {o['seconds']:.1f} s = "
          f"{o['tokens_per_second']:.0f} tokens/s; parse rate {o['parse_rate']:.3f}, EOS {o['eos_rate']:.3f}")
    print(f"transformers generate (float32, batch {args.hf_batch}): {h['tokens']} tokens in {h['seconds']:.1f} s = "
          f"{h['tokens_per_second']:.0f} tokens/s; parse rate {h['parse_rate']:.3f}, EOS {h['eos_rate']:.3f}")
    print(f"speed-up: {res['speedup']:.2f}x")
    print(f"NLL of {n['rows']} real validation examples: float32 {n['hf_fp32']:.4f}, ours {n['ours']:.4f} "
          f"({100 * n['relative_difference']:.2f} % apart)")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
