"""Real all-MiniLM-L6-v2: a 2-layer `retrikt` student on a few CB examples and a small hand-made store."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from retrikt import paths
from retrikt.classifier import Classifier
from retrikt.distill.train import train_student
from retrikt.index import index as index_stage
from retrikt.io import read_jsonl, write_jsonl
from retrikt.params import parse_params
from retrikt.retrieval import predict
from retrikt.tasks import get_task
from retrikt.tracking import StageRun

from .conftest import REPO

pytestmark = pytest.mark.slow
STORE = [
    ("The doctor said the test came back clean.", "The test result was clean.", 0),
    ("I doubt that he ever finished the book.", "He finished the book.", 1),
    ("She might have left the keys at the office.", "She left the keys at the office.", 2),
    ("It is certain that the train departed on time.", "The train departed on time.", 0),
    ("Nobody believes the bridge was ever repaired.", "The bridge was repaired.", 1),
    ("Perhaps the meeting was moved to Friday.", "The meeting was moved to Friday.", 2),
]


@pytest.fixture
def real_repo(in_tmp_repo, mirror, monkeypatch, real_model):
    encoder = real_model("encoder")
    monkeypatch.setenv("RETRIKT_MLFLOW", "0")
    write_jsonl(paths.split_file("cb", "train"), read_jsonl(mirror / "cb" / "train.jsonl")[:16])
    write_jsonl(paths.split_file("cb", "validation"), read_jsonl(mirror / "cb" / "validation.jsonl")[:8])
    paths.base_model("encoder").parent.mkdir(parents=True)
    os.symlink(encoder, paths.base_model("encoder"))
    teacher = Classifier.from_base(encoder, get_task("cb"), max_length=64)  # reward model stand-in
    teacher.save(paths.teacher("cb"))
    entries = [{"premise": p, "hypothesis": h, "label": y} for p, h, y in STORE]
    soft = teacher.predict_proba(entries).astype(np.float64)
    write_jsonl(paths.store_entries("cb"), [{"id": i, **e, "soft_label": (s / s.sum()).tolist(), "text": ""}
                                           for i, (e, s) in enumerate(zip(entries, soft))])
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["student"].update(epochs=1, batch_size=8, max_length=64, retrieval_candidates=4, retrieval_top_k=2)
    return parse_params(raw)


def test_real_retrikt_student_runs(real_repo):
    with StageRun("index", metrics_path=paths.metrics("cb", "index"), task="cb") as run:
        index_stage(real_repo, "cb", run)
    with StageRun("train_student", metrics_path=paths.student_metrics("cb", "retrikt", 2, 0), task="cb") as run:
        m = train_student(real_repo, "cb", run, method="retrikt", layers=2, seed=0)
    assert all(math.isfinite(v) for v in m.values())
    assert 15e6 < m["parameters"] < 16.5e6  # embeddings + 2 layers of MiniLM (+ a 3-way head)
    assert 0 <= m["accuracy"] <= 1 and m["store_bytes"] > 0 and m["latency_ms"] > 0
    (pred,) = predict("cb", paths.student("cb", "retrikt", 2, 0), [dict(premise=STORE[0][0], hypothesis=STORE[0][1])])
    assert pred["evidence"][0]["id"] == 0 and math.isclose(pred["evidence"][0]["similarity"], 1, abs_tol=1e-4)
