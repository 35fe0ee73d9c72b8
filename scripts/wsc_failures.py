"""Why WSC samples fail to parse: sample from a tuned WSC prompt and classify each unlocated span.

    cd OUT/work && PYTHONPATH=src python /path/to/retrikt/scripts/wsc_failures.py [N] [SEED]

Run it in the work clone of `bash scripts/probe_generate.sh OUT 250 256 wsc` (it reads that clone's
models/wsc/prompt and models/base/generator). Draws N (default 48) samples, labels alternating, with the
generate defaults (forced field names, end at the last line, T 0.8, top-p 0.95, bf16, 1 thread), and prints
the parse outcome counts and, per unlocated sample, the mark counts (``*``, ``[``, ``]``; a well-formed
sample has 2, 1, 1) and how often the candidate and pronoun texts occur in the unmarked text (0: absent,
more than 1: ambiguous), next to the sample (README "The store on every task").
"""

from __future__ import annotations

import collections
import re
import sys


def occurrences(words: list[str], span: str) -> int:
    want = span.lower().split()
    if not want:
        return -1
    return sum(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))


def main(n: int, seed: int) -> None:
    import torch

    from retrikt import paths
    from retrikt.llm import load_with_prompt, sample_full, source_text
    from retrikt.tasks import get_task

    torch.set_num_threads(1)
    task = get_task("wsc")
    model, tok = load_with_prompt(paths.base_model("generator"), paths.prompt("wsc"))
    model.get_base_model().to(torch.bfloat16)
    sources = [source_text(task, i % 2) for i in range(n)]
    drawn = sample_full(model, tok, sources, max_new_tokens=141, temperature=0.8, top_p=0.95, batch_size=n,
                        seed=seed, dtype="bfloat16", stop_lines=3, field_names=task.line_names)
    kinds: collections.Counter = collections.Counter()
    rows = []
    for text in drawn.texts:
        why = task.read(text)[1]
        if why != "unlocated_span":
            kinds[why] += 1
            continue
        lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        body = lines.get("text", "")
        words = re.sub(r"[*\[\]]", "", body).lower().split()
        marks = (body.count("*"), body.count("["), body.count("]"))
        kinds["unlocated, marks " + ("well-formed" if marks == (2, 1, 1) else "broken")] += 1
        cand, pron = (occurrences(words, lines.get(k, "").strip()) for k in ("candidate", "pronoun"))
        rows.append(f"marks={marks} candidate_occurs={cand} pronoun_occurs={pron} | " + text.replace("\n", " / "))
    print(dict(kinds))
    print("\n".join(rows))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 48, int(sys.argv[2]) if len(sys.argv) > 2 else 7)
