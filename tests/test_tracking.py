"""Tracking: DVC metrics/plots files + MLflow runs in a temporary sqlite store, read back via the client."""

from __future__ import annotations

import warnings

import pytest

from retrikt.io import read_json
from retrikt.paths import main_repo_root, timings as timings_path
from retrikt.tracking import StageRun


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    monkeypatch.setattr(StageRun, "_mlflow_ok", None)
    return uri


def test_stage_run_writes_dvc_files_and_mlflow(store, tmp_path):
    from mlflow.tracking import MlflowClient

    mpath, ppath = tmp_path / "m.json", tmp_path / "p.json"
    with StageRun("teacher", metrics_path=mpath, task="cb", seed=3, params={"teacher": {"lr": 0.1}},
                  plots={"curve": ppath}) as run:
        for epoch in (1, 2):
            run.add_plot_row("curve", {"epoch": epoch, "loss": 1.0 / epoch}, step_key="epoch")
        run.set_metrics({"accuracy": 0.75})
        run.set_timings({"seconds": 1.5})
    assert read_json(mpath) == {"accuracy": 0.75}
    assert read_json(tmp_path / "m.timings.json") == {"seconds": 1.5}
    assert read_json(ppath) == [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]

    client = MlflowClient(store)
    r = client.get_run(run.run_id)
    assert r.data.params["teacher.lr"] == "0.1" and r.data.metrics["accuracy"] == 0.75
    assert r.data.tags["stage"] == "teacher" and r.data.tags["task"] == "cb" and r.data.tags["seed"] == "3"
    assert r.data.tags["dvc_exp_name"] == "exp-test" and "git_commit" in r.data.tags
    assert [m.value for m in client.get_metric_history(run.run_id, "curve.loss")] == [1.0, 0.5]
    parent = client.get_run(r.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["stage"] == "pipeline"

    with StageRun("prepare", metrics_path=None, task="cb") as run2:  # same pipeline -> same parent
        pass
    assert client.get_run(run2.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_pipeline_run_is_keyed_and_logged_by_the_stages_params_file(store, tmp_path, monkeypatch):
    """`retrikt STAGE --params other.yaml`: the pipeline run is that file's, not ./params.yaml's."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\nteacher:\n  lr: 1.0e-4\n")
    other = tmp_path / "other.yaml"
    other.write_text("seed: 7\nteacher:\n  lr: 3e-05\n")
    runs = {}
    for name, f in (("default", tmp_path / "params.yaml"), ("other", other), ("other-again", other)):
        with StageRun("teacher", metrics_path=None, task="cb", params_file=f) as run:
            pass
        runs[name] = MlflowClient(store).get_run(run.run_id).data.tags["mlflow.parentRunId"]
    assert runs["other"] == runs["other-again"] != runs["default"]
    parent = MlflowClient(store).get_run(runs["other"])
    assert parent.data.params["seed"] == "7" and parent.data.params["teacher.lr"] == "3e-05"


def test_unreachable_server_stops_the_stage_before_it_runs(tmp_path, monkeypatch):
    from retrikt.errors import TrackingError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    ran = []
    with pytest.raises(TrackingError, match=r"^MLflow tracking server http://127.0.0.1:9 is unreachable"):
        with StageRun("teacher", metrics_path=tmp_path / "m.json", task="cb") as run:
            ran.append(run)
    assert not ran and not (tmp_path / "m.json").exists()
    monkeypatch.setenv("RETRIKT_MLFLOW", "0")  # untracked: runs
    with StageRun("teacher", metrics_path=tmp_path / "m.json", task="cb") as run:
        run.set_metrics({"accuracy": 0.5})
    assert read_json(tmp_path / "m.json") == {"accuracy": 0.5}


def test_mlflow_failing_after_the_start_warns_once_and_stage_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr(StageRun, "_mlflow_ok", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with StageRun("teacher", metrics_path=tmp_path / "m.json", task="cb") as run:
            def broken(*a, **k):
                raise ConnectionError("server went away")

            if run._mlflow is not None:
                run._client.log_batch = broken
            run.set_metrics({"accuracy": 0.5})
    assert read_json(tmp_path / "m.json") == {"accuracy": 0.5}
    assert sum("MLflow tracking disabled" in str(w.message) for w in caught) == 1


def test_failed_stage_writes_no_metrics(store, tmp_path):
    with pytest.raises(RuntimeError):
        with StageRun("teacher", metrics_path=tmp_path / "m.json") as run:
            run.set_metrics({"accuracy": 1.0})
            raise RuntimeError("boom")
    assert not (tmp_path / "m.json").exists()


def test_queued_experiment_copies_track_into_the_main_repo(tmp_path):
    tmp_copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12"
    tmp_copy.mkdir(parents=True)
    assert main_repo_root(tmp_copy) == (tmp_path / "repo").resolve()
    assert main_repo_root(tmp_path) == tmp_path.resolve()


def test_relative_params_folders_resolve_from_the_main_checkout(tmp_path, monkeypatch):
    from retrikt.paths import user_path

    tmp_copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    tmp_copy.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_copy)  # where DVC runs a queued experiment's stages
    assert user_path("../shared/data/glue") == (tmp_path / "shared" / "data" / "glue").resolve()
    assert user_path(tmp_path / "abs") == tmp_path / "abs"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_path("~/m") == tmp_path / "home" / "m"


def test_timings_live_beside_metrics_in_their_own_tree():
    from pathlib import Path

    assert timings_path("reports/metrics/cb/teacher.json") == Path("reports/timings/cb/teacher.json")
    assert timings_path("x/m.json") == Path("x/m.timings.json")
