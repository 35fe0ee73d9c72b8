"""The `teacher` stage on a tiny encoder and a learnable dataset: it learns, saves, and reports."""

from __future__ import annotations

import json
import shutil

import torch
import yaml

from retrikt import paths
from retrikt.classifier import Classifier, mean_pool
from retrikt.io import read_json
from retrikt.params import parse_params
from retrikt.seeding import seed_everything
from retrikt.teacher import teacher
from retrikt.tracking import StageRun

from .conftest import REPO, tiny_models

WORDS = {0: "good great yes", 1: "bad terrible no", 2: "movie film dog"}  # the label is in the hypothesis


def learnable_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"premise": f"the cat sat on the mat {i}", "hypothesis": WORDS[i % 3], "idx": offset + i, "label": i % 3}
            for i in range(n)]


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]


def test_teacher_stage_learns_and_writes_outputs(in_tmp_repo, tiny_encoder_dir, one_thread):
    raw = tiny_models(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["teacher"].update({"epochs": 15, "lr": 3e-3, "batch_size": 8, "max_length": 32, "warmup_ratio": 0.0,
                           "dtype": "float32"})
    params = parse_params(raw)
    seed_everything(params.seed)  # the CLI does this before every stage; the fresh head follows it
    shutil.copytree(tiny_encoder_dir, paths.base_model("encoder"))
    for split, rows in (("train", learnable_rows(48)), ("validation", learnable_rows(12, 100))):
        p = paths.split_file("cb", split)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with StageRun("teacher", metrics_path=paths.metrics("cb", "teacher"), task="cb",
                  plots={"teacher_curve": paths.plot("cb", "teacher_curve")}) as run:
        m = teacher(params, "cb", run)
    assert m["accuracy"] > 0.6 and 0 < m["macro_f1"] <= 1  # chance is 1/3
    assert read_json(paths.metrics("cb", "teacher")) == m
    curve = read_json(paths.plot("cb", "teacher_curve"))
    assert len(curve) == 15 and curve[-1]["train_loss"] < curve[0]["train_loss"]
    preds = read_json(paths.predictions("cb", "teacher"))
    assert preds["idx"] == list(range(100, 112)) and len(preds["proba"]) == 12
    clf = Classifier.load(paths.teacher("cb"))
    emb = clf.embed(learnable_rows(3))
    assert emb.shape == (3, 32) and abs(float((emb ** 2).sum(1).mean()) - 1.0) < 1e-5
