"""`prompt_tune` stage on the tiny causal and seq2seq generators, in a temporary repository.

The helpers here (params from params.yaml with overrides, a tmp-repo layout with CB-like rows, a
tracked run without MLflow) are reused by tests/test_generate.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from retrikt import paths
from retrikt.io import read_json, write_jsonl
from retrikt.llm import load_with_prompt, nll, source_text, target_text
from retrikt.params import Params, parse_params
from retrikt.prompt_tune import prompt_tune
from retrikt.tasks import get_task
from retrikt.tracking import StageRun

from .conftest import REPO

CB = get_task("cb")
TRAIN = [
    {"premise": "the cat sat on the mat .", "hypothesis": "a cat is sitting .", "label": 0},
    {"premise": "it rained all day .", "hypothesis": "the ground is dry .", "label": 1},
    {"premise": "the quick brown fox jumps over the lazy dog .", "hypothesis": "the dog sleeps .", "label": 2},
    {"premise": "the dog sleeps , and the cat sat .", "hypothesis": "a dog is sleeping .", "label": 0},
    {"premise": "it was a great movie , good film .", "hypothesis": "the movie was terrible .", "label": 1},
    {"premise": "the fox jumps over the mat .", "hypothesis": "the fox is brown .", "label": 2},
]
VALIDATION = [
    {"premise": "the cat sat all day .", "hypothesis": "a cat is sitting .", "label": 0},
    {"premise": "it rained on the dog .", "hypothesis": "the dog is dry .", "label": 1},
    {"premise": "the lazy fox sat on the mat .", "hypothesis": "the fox jumps .", "label": 2},
]


def make_params(**groups: dict) -> Params:
    """params.yaml's values with ``group={key: value}`` overrides, validated like the CLI does."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for group, values in groups.items():
        if isinstance(values, dict):
            raw[group].update(values)
        else:
            raw[group] = values
    return parse_params(raw)


def lay_out_repo(generator_dir: Path, encoder_dir: Path | None = None,
                 train: list[dict] = TRAIN, validation: list[dict] = VALIDATION) -> None:
    """In the cwd: models/base/generator (a copy), CB splits, and a (random-head) teacher if asked."""
    shutil.copytree(generator_dir, paths.base_model("generator"))
    for split, rows in (("train", train), ("validation", validation)):
        write_jsonl(paths.split_file("cb", split), [{**r, "idx": i} for i, r in enumerate(rows)])
    if encoder_dir is not None:
        from retrikt.classifier import Classifier

        torch.manual_seed(0)
        Classifier.from_base(encoder_dir, CB, max_length=64).save(paths.teacher("cb"))


def stage_run(stage: str, monkeypatch, plots: tuple[str, ...] = ()) -> StageRun:
    """A StageRun writing the DVC metrics/plots files, MLflow off (fast)."""
    monkeypatch.setenv("RETRIKT_MLFLOW", "0")
    return StageRun(stage, metrics_path=paths.metrics("cb", stage), task="cb",
                    plots={name: paths.plot("cb", name) for name in plots})


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_prompt_tune_lowers_nll_and_saves_adapter(kind, tiny_causal_dir, tiny_seq2seq_dir, in_tmp_repo,
                                                  monkeypatch):
    lay_out_repo(tiny_causal_dir if kind == "causal" else tiny_seq2seq_dir)
    params = make_params(prompt_tune={"num_virtual_tokens": 4, "lr": 0.3, "epochs": 4, "batch_size": 3,
                                      "max_length": 64, "train_limit": None, "init": "text", "dtype": "float32"})
    with stage_run("prompt_tune", monkeypatch, plots=("prompt_tune_curve",)) as run:
        metrics = prompt_tune(params, "cb", run)

    assert set(metrics) == {"val_nll_before", "val_nll", "train_nll", "trainable_parameters"}
    assert metrics["trainable_parameters"] == 4 * 32
    assert metrics["val_nll"] < metrics["val_nll_before"]
    curve = read_json(paths.plot("cb", "prompt_tune_curve"))
    assert [r["epoch"] for r in curve] == [0, 1, 2, 3, 4]
    assert curve[0]["val_nll"] == metrics["val_nll_before"] and curve[-1]["val_nll"] == metrics["val_nll"]
    assert curve[-1]["train_nll"] < curve[0]["train_nll"]
    assert all(a["val_nll"] > b["val_nll"] for a, b in zip(curve, curve[1:]))
    assert read_json(paths.metrics("cb", "prompt_tune")) == metrics

    folder = paths.prompt("cb")
    assert {"adapter_config.json", "adapter_model.safetensors", "retrikt_prompt.json"} <= {
        p.name for p in folder.iterdir()}
    meta = read_json(folder / "retrikt_prompt.json")
    assert meta["task"] == "cb" and meta["num_virtual_tokens"] == 4 and meta["seq2seq"] == (kind == "seq2seq")
    model, tok = load_with_prompt(paths.base_model("generator"), folder)
    src = [source_text(CB, r["label"]) for r in VALIDATION]
    tgt = [target_text(CB, r) for r in VALIDATION]
    reloaded = nll(model, tok, src, tgt, 64, 3, seq2seq=kind == "seq2seq")
    assert math.isclose(reloaded, metrics["val_nll"], rel_tol=1e-5)
    assert not list(folder.parent.glob(".prompt*"))  # no temporary folder left behind


def test_prompt_tune_in_bfloat16_keeps_a_float32_prompt(tiny_causal_dir, in_tmp_repo, monkeypatch):
    from safetensors.torch import load_file

    lay_out_repo(tiny_causal_dir)
    params = make_params(prompt_tune={"num_virtual_tokens": 4, "lr": 0.3, "epochs": 3, "batch_size": 3,
                                      "max_length": 64, "train_limit": None, "init": "text", "dtype": "bfloat16"})
    with stage_run("prompt_tune", monkeypatch) as run:
        metrics = prompt_tune(params, "cb", run)
    assert metrics["val_nll"] < metrics["val_nll_before"]
    (weights,) = load_file(paths.prompt("cb") / "adapter_model.safetensors").values()
    assert weights.dtype == torch.float32
    model, tok = load_with_prompt(paths.base_model("generator"), paths.prompt("cb"))  # float32 again
    fp32 = nll(model, tok, [source_text(CB, r["label"]) for r in VALIDATION], [target_text(CB, r) for r in VALIDATION],
               64, 3, seq2seq=False)
    assert math.isclose(fp32, metrics["val_nll"], rel_tol=0.02)


def test_prompt_tune_is_seeded(tiny_causal_dir, in_tmp_repo, monkeypatch):
    lay_out_repo(tiny_causal_dir)
    params = make_params(prompt_tune={"num_virtual_tokens": 3, "lr": 0.1, "epochs": 1, "batch_size": 4,
                                      "max_length": 48, "train_limit": 4, "init": "random"})
    runs = []
    for _ in range(2):
        with stage_run("prompt_tune", monkeypatch) as run:
            runs.append(prompt_tune(params, "cb", run))
    assert runs[0] == runs[1]


def _eos_nll(folder: Path) -> float:
    """Mean NLL of the EOS that ends each validation example, under the prompt saved in ``folder``."""
    from retrikt.llm import IGNORE, eos_id, target_token_nll, tokenize_for_training

    model, tok = load_with_prompt(paths.base_model("generator"), folder)
    batch = tokenize_for_training(tok, [source_text(CB, r["label"]) for r in VALIDATION],
                                  [target_text(CB, r) for r in VALIDATION], 64, False)
    with torch.no_grad():
        token_loss, labels = target_token_nll(model.eval(), batch, False)
    at_end = labels == eos_id(tok)
    assert int(at_end.sum()) == len(VALIDATION) and bool((labels[at_end] != IGNORE).all())
    return float(token_loss[at_end].mean())


def test_prompt_tune_eos_weight_teaches_the_stop(tiny_causal_dir, in_tmp_repo, monkeypatch):
    lay_out_repo(tiny_causal_dir)
    ends, nlls = {}, {}
    for weight in (1.0, 20.0):
        params = make_params(prompt_tune={"num_virtual_tokens": 4, "lr": 0.3, "epochs": 3, "batch_size": 3,
                                          "max_length": 64, "train_limit": None, "init": "text",
                                          "dtype": "float32", "eos_weight": weight})
        with stage_run("prompt_tune", monkeypatch) as run:
            nlls[weight] = prompt_tune(params, "cb", run)
        ends[weight] = _eos_nll(paths.prompt("cb"))
    assert ends[20.0] < ends[1.0]  # the weighted stop token is learnt faster, the example itself still learnt:
    assert all(m["val_nll"] < m["val_nll_before"] for m in nlls.values())
