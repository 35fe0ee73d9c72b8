"""Pinned execution: params `threads` fixes the CPU thread count of every stage, and is recorded.

`threads` (like `device`) is an execution setting: results depend on it, so it is pinned before any
compute and written next to every stage's timings and into its MLflow run's tags; it is no stage's
experiment parameter, so changing it re-runs nothing but check_params.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import yaml

from retrikt.params import ParamsError, parse_params

from .conftest import MIRROR, REPO

RAW = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def restore_threads(monkeypatch):
    import faiss
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # monkeypatch puts the old value back
    t, f = torch.get_num_threads(), faiss.omp_get_max_threads()
    pools = {i["prefix"]: i["num_threads"] for i in threadpool_info()}
    yield
    torch.set_num_threads(t)
    faiss.omp_set_num_threads(f)
    threadpool_limits(pools)


def test_default_is_two_and_range_is_checked():
    assert RAW["threads"] == 2 and parse_params(RAW).threads == 2
    for bad, msg in ((0, "threads: 0 is out of range (must be >= 1)"), ("2", "threads: expected an integer, got '2'")):
        with pytest.raises(ParamsError) as e:
            parse_params({**copy.deepcopy(RAW), "threads": bad})
        assert str(e.value) == msg


def test_threads_is_an_execution_setting_not_a_stage_param():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params = (stage.get("do") or stage).get("params", [])
        assert not any(str(p).split(".")[0] in ("threads", "device") for p in params), name


def test_setup_pins_torch_faiss_and_blas(tmp_path, restore_threads):
    import faiss
    import numpy  # noqa: F401 - its BLAS must be loaded for threadpoolctl to see it
    import torch
    from threadpoolctl import threadpool_info

    from retrikt.cli import _setup

    torch.set_num_threads(2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**RAW, "threads": 1, "device": "cpu"}))
    _setup(path)
    assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    assert torch.are_deterministic_algorithms_enabled()


def test_every_stage_records_threads_in_timings_and_mlflow(tmp_path, monkeypatch, restore_threads, mirror):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from retrikt.cli import app
    from retrikt.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RETRIKT_MLFLOW", "1")
    raw = copy.deepcopy(RAW)
    raw.update(threads=1, device="cpu")
    raw["data"].update(mirror_dir=str(MIRROR), train_limit=20)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["prepare", "cb"])
    assert result.exit_code == 0, result.output
    timings = json.loads((tmp_path / "reports/timings/cb/prepare.json").read_text())
    assert timings["execution"]["threads"] == "1" and timings["execution"]["device"] == "cpu"
    assert "execution" not in json.loads((tmp_path / "reports/metrics/cb/prepare.json").read_text())
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("retrikt")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'prepare' and tags.threads = '1'")
    assert runs and runs[0].data.tags["torch"].startswith("2.")
