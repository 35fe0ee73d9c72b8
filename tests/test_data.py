"""`prepare`: mirror and fixtures, stratified subsampling, clear errors on bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from retrikt import paths
from retrikt.data import load_split, prepare, stratified_subsample
from retrikt.io import DataError, read_json, read_jsonl
from retrikt.params import parse_params
from retrikt.tasks import get_task

from .conftest import FIXTURES, REPO


def _params(mirror_dir, **data):
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"] = {**raw["data"], "mirror_dir": str(mirror_dir), **data}
    return parse_params(raw)


def _fixture_mirror(root: Path, task: str) -> Path:
    """Lay a fixture file out as a mirror: first half train, second half validation."""
    rows = read_jsonl(FIXTURES / f"{task}.jsonl")
    (root / task).mkdir(parents=True)
    half = len(rows) // 2
    for split, part in (("train", rows[:half]), ("validation", rows[half:])):
        (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def test_prepare_cb_from_mirror(mirror, in_tmp_repo):
    card = prepare(_params(mirror), "cb")
    assert card["train"]["rows"] == 250 and card["validation"]["rows"] == 56
    assert card["validation"]["labels"] == {"entailment": 23, "contradiction": 28, "neutral": 5}
    assert len(read_jsonl(paths.split_file("cb", "train"))) == 250
    assert read_json(paths.processed("cb") / "card.json")["sha256"] == card["sha256"]


def test_train_limit_is_stratified_seeded_and_ordered(mirror, in_tmp_repo):
    a = prepare(_params(mirror, train_limit=100), "cb")
    rows = read_jsonl(paths.split_file("cb", "train"))
    assert a["train"]["labels"] == {"entailment": 46, "contradiction": 48, "neutral": 6}  # 115/119/16 of 250
    assert [r["idx"] for r in rows] == sorted(r["idx"] for r in rows)
    b = prepare(_params(mirror, train_limit=100), "cb")
    assert a["sha256"] == b["sha256"]


def test_stratified_subsample_proportions():
    rows = [{"label": 0}] * 70 + [{"label": 1}] * 30
    out = stratified_subsample(rows, 10, seed=1)
    assert Counter(r["label"] for r in out) == {0: 7, 1: 3}
    assert stratified_subsample(rows, None, 0) == rows


@pytest.mark.parametrize("task", ["boolq", "wic"])
def test_prepare_unmirrored_tasks_from_fixtures(task, tmp_path, in_tmp_repo):
    mirror = _fixture_mirror(tmp_path / "mirror", task)
    card = prepare(_params(mirror), task)
    assert card["train"]["rows"] + card["validation"]["rows"] == len(read_jsonl(FIXTURES / f"{task}.jsonl"))
    assert set(card["train"]["labels"]) == {"False", "True"}


def test_malformed_file_names_file_and_line(tmp_path):
    mirror = tmp_path / "m"
    shutil.copytree(FIXTURES.parent / "fixtures", mirror / "x")  # unrelated content is fine
    (mirror / "cb").mkdir()
    good = {"premise": "a", "hypothesis": "b", "idx": 0, "label": 0}
    (mirror / "cb" / "train.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"cb/train.jsonl:2: invalid JSON"):
        load_split(get_task("cb"), "train", mirror)
    no_hypothesis = {"premise": "a", "idx": 1, "label": 0}
    (mirror / "cb" / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(no_hypothesis) + "\n")
    with pytest.raises(DataError, match=r"cb/train.jsonl:2: .*hypothesis"):
        load_split(get_task("cb"), "train", mirror)
    (mirror / "cb" / "train.jsonl").write_text(json.dumps({**good, "label": 7}) + "\n")
    with pytest.raises(DataError, match=r"cb/train.jsonl:1: .*label"):
        load_split(get_task("cb"), "train", mirror)


def test_missing_task_lists_known_ones(tmp_path):
    with pytest.raises(KeyError, match="known tasks: boolq, cb"):
        get_task("imdb")
    with pytest.raises(DataError, match="has no task 'boolq'"):
        load_split(get_task("boolq"), "train", tmp_path)
