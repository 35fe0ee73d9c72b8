"""`retrikt predict`: predictions with retrieved evidence, terminal formatting, CLI input parsing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from retrikt import paths
from retrikt.io import DataError
from retrikt.predict import format_prediction, parse_cli_inputs
from retrikt.retrieval import predict

from .test_train_student import TASK, make_tiny_repo, run_student


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_encoder_dir):
    """A tiny repo with a trained retrikt and finetune student; yields their folders."""
    root = tmp_path_factory.mktemp("predict-repo")
    old, env, threads = os.getcwd(), os.environ.get("RETRIKT_MLFLOW"), torch.get_num_threads()
    os.chdir(root)
    os.environ["RETRIKT_MLFLOW"] = "0"
    torch.set_num_threads(1)
    try:
        params = make_tiny_repo(tiny_encoder_dir)
        for method in ("retrikt", "finetune"):
            run_student(params, method)
        yield {m: root / paths.student(TASK, m, 2, 0) for m in ("retrikt", "finetune")}, params
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("RETRIKT_MLFLOW", None)
        else:
            os.environ["RETRIKT_MLFLOW"] = env


INPUTS = [{"premise": "the cat", "hypothesis": "dog yes true"}, {"premise": "fox", "hypothesis": "day no no"}]


def test_retrikt_prediction_has_sorted_evidence(students):
    folders, params = students
    preds = predict(TASK, folders["retrikt"], INPUTS, k=3)
    for p in preds:
        assert p["label"] == max(p["proba"], key=p["proba"].get)
        assert p["label"] == ("entailment", "contradiction", "neutral")[p["label_index"]]
        assert set(p["proba"]) == {"entailment", "contradiction", "neutral"}
        assert np.isclose(sum(p["proba"].values()), 1, atol=1e-4)
        ev = p["evidence"]
        assert len(ev) == 3
        sims = [e["similarity"] for e in ev]
        assert sims == sorted(sims, reverse=True)
        assert all(np.isclose(sum(e["soft_label"].values()), 1, atol=1e-4) for e in ev)
        assert all({"id", "premise", "hypothesis", "label"} <= set(e) for e in ev)
    default_k = predict(TASK, folders["retrikt"], INPUTS[:1])[0]["evidence"]
    assert len(default_k) == params.student.retrieval_top_k
    text = format_prediction(preds[0], TASK)
    assert text.startswith(f"prediction: {preds[0]['label']}") and len(text.splitlines()) == 4
    json.dumps(preds)  # plain JSON types


def test_classifier_student_has_no_evidence(students):
    folders, _ = students
    (pred,) = predict(TASK, folders["finetune"], INPUTS[:1])
    assert "evidence" not in pred and set(pred) == {"label", "label_index", "proba"}
    assert format_prediction(pred, TASK).count("\n") == 0


def test_wrong_task_is_refused(students):
    folders, _ = students
    with pytest.raises(DataError, match="a cb student, not rte"):
        predict("rte", folders["retrikt"], [{"sentence1": "a", "sentence2": "b"}])


def test_parse_cli_inputs(tmp_path):
    assert parse_cli_inputs("cb", ["premise=a b", "hypothesis=c=d"], None) == [{"premise": "a b", "hypothesis": "c=d"}]
    wsc = parse_cli_inputs("wsc", ["text=Mark told Pete he lied", "span1_index=0", "span2_index=3",
                                   "span1_text=Mark", "span2_text=he"], None)
    assert wsc[0]["span2_index"] == 3
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps(INPUTS[0]) + "\n" + json.dumps(INPUTS[1]) + "\n")
    assert parse_cli_inputs("cb", None, f) == INPUTS


@pytest.mark.parametrize("fields, message", [
    (["premise=a"], "missing field(s) hypothesis for task cb"),
    (["premise=a", "hypothesis=b", "label=1"], "unknown field 'label' for task cb"),
    (["premise"], "expected field=value"),
    (["premise=a", "hypothesis= "], "empty field 'hypothesis'"),
    (None, "give either field=value arguments or --jsonl"),
])
def test_parse_cli_inputs_errors(fields, message):
    with pytest.raises(DataError) as err:
        parse_cli_inputs("cb", fields, None)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_parse_cli_inputs_jsonl_errors(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"premise": "a"}) + "\n")
    with pytest.raises(DataError, match="input 1: missing field"):
        parse_cli_inputs("cb", None, f)
    with pytest.raises(DataError, match="not both"):
        parse_cli_inputs("cb", ["premise=a"], f)
    f.write_text("{not json\n")
    with pytest.raises(DataError, match="invalid JSON"):
        parse_cli_inputs("cb", None, f)
