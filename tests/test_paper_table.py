"""scripts/paper_table.py: collect a finished run's reports, then the table across tasks."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest
import yaml

from retrikt.evaluate import evaluate
from retrikt.io import read_json

from .conftest import REPO
from .test_evaluate import FakeRun, _params, _write_inputs


@pytest.fixture(scope="module")
def paper_table():
    spec = importlib.util.spec_from_file_location("paper_table", REPO / "scripts" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_then_table(tmp_path, monkeypatch, paper_table):
    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.chdir(clone)
    _write_inputs()
    evaluate(_params(), FakeRun())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(tasks=["cb"], seeds=[0, 1])
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    (clone / "dvc.lock").write_text("schema: '2.0'\n")
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=clone, check=True)
    root = tmp_path / "table"
    out = paper_table.collect(clone, "cb", 100, 100 + 5400, root)
    assert out == root / "cb"
    assert (out / "predictions" / "retrikt-L2-s1.json").exists() and (out / "metrics" / "teacher.json").exists()
    run = read_json(out / "run.json")
    assert run["wall_seconds"] == 5400 and run["seeds"] == [0, 1] and len(run["commit"]) == 40
    with pytest.raises(SystemExit, match="expected \\[rte\\]"):
        paper_table.collect(clone, "rte", 0, 1, root)

    res = read_json(out / "results.json")["tasks"]["cb"]["students"]
    table, md = paper_table.table(root, samples=200, confidence=0.95, seed=0)
    for size in ("L2", "L4"):
        pooled = table["pooled"][size]
        # one task: the pooled estimate is that task's RetriKT - best baseline, the sign test counts it once
        assert pooled["vs_best"]["bootstrap"]["estimate"] == pytest.approx(res[size]["comparison"]["delta"])
        assert pooled["vs_retrikt_kd"]["bootstrap"]["estimate"] == pytest.approx(res[size]["vs_retrikt_kd"]["delta"])
        assert pooled["vs_best"]["sign_test"] == {"positive": 1, "negative": 0, "ties": 0, "p_value": 1.0}
    assert table["run_hours"] == pytest.approx(1.5)
    assert "| cb (" in md and "(vs mgskd)" in md and "1.50 h wall in all, at 2 threads" in md
    # rows may come from different teachers and machines: the store table names both
    assert table["stores"][0]["teacher_model"] == params["teacher"]["model"]
    assert f"({params['teacher']['model']}) / " in md and f"| {run['cpu']} |" in md

    # a named subset: the same rows; a task never collected is one clear line
    sub, _ = paper_table.table(root, samples=200, confidence=0.95, seed=0, only=["cb"])
    assert sub["rows"] == table["rows"]
    with pytest.raises(SystemExit, match="no collected run for rte"):
        paper_table.table(root, samples=10, confidence=0.95, seed=0, only=["cb", "rte"])
    paper_table.main(["table", "--root", str(root), "--samples", "50", "--tasks", "cb", "--name", "subset"])
    assert read_json(root / "subset.json")["tasks"] == ["cb"] and (root / "subset.md").exists()

    shutil.rmtree(root / "cb")
    with pytest.raises(SystemExit, match="no task under"):
        paper_table.table(root, samples=10, confidence=0.95, seed=0)
