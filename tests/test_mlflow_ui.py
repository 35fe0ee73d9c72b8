"""MLflow shows the work: the pipeline's parent run carries the headline and the figures, with a real
duration, and the experiment page renders it in a real browser (headless Chromium, slow).

The browser test starts `mlflow server` on 127.0.0.1 over a store filled by the real `evaluate` stage
(on the synthetic inputs of test_evaluate), opens the experiment page in Debian's `chromium`
(no browser download at run time) and checks the DOM for the parent run and its headline metrics. The
screenshot is kept as a test artifact: ``$RETRIKT_TEST_ARTIFACTS`` (default ``<repo>/.test-artifacts``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from retrikt.evaluate import evaluate
from retrikt.tracking import EXPERIMENT, KIND, KIND_TAG, VIEW_ID, VIEW_TAG_PREFIX, StageRun, experiment_url

from .conftest import REPO
from .test_evaluate import _params, _write_inputs

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
HEADLINE = ("cb.L2.delta_vs_best", "cb.L2.retrikt", "cb.L2.best_baseline", "cb.teacher")  # columns shown


def _fill_store(root: Path, uri: str, monkeypatch) -> None:
    """Two stages of one pipeline in the store at ``uri``: a teacher run, then the real evaluate."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "ui-check")
    monkeypatch.delenv("RETRIKT_MLFLOW", raising=False)
    monkeypatch.setattr(StageRun, "_mlflow_ok", None)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    _write_inputs()
    with StageRun("teacher", metrics_path=root / "teacher.json", task="cb") as run:
        run.set_metrics({"accuracy": 0.9})
        time.sleep(0.3)
    with StageRun("evaluate", metrics_path=None) as run:
        evaluate(_params(), run)


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return client, exp, runs


def test_parent_run_carries_the_headline_and_a_real_duration(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fill_store(tmp_path, uri, monkeypatch)
    client, exp, runs = _runs(uri)
    assert exp.tags[KIND_TAG] == KIND
    parent = next(r for r in runs if r.data.tags.get("stage") == "pipeline")
    stages = [r for r in runs if r.data.tags.get("stage") != "pipeline"]
    assert [r.data.tags["stage"] for r in stages] == ["teacher", "evaluate"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline/ui-check"
    # the parent spans its stages: from before the first starts to when the last ends
    assert parent.info.start_time <= stages[0].info.start_time
    assert parent.info.end_time >= max(r.info.end_time for r in stages)
    assert parent.info.end_time - parent.info.start_time >= 300
    m = parent.data.metrics
    assert m["cb.L2.delta_vs_best"] == pytest.approx(0.2) and m["cb.L2.retrikt"] == pytest.approx(0.95)
    assert m["cb.L2.delta_ci_low"] > 0 and m["cb.store_size"] == 180 and m["cb.teacher"] == pytest.approx(0.9)
    assert parent.data.tags["cb.L2.best_baseline"] == "mgskd"
    assert "| cb | L2 | 0.950 | mgskd 0.750 |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["student.retrieval_tau"] == "0.1"  # the whole params.yaml
    shown = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/forest.png", "figures/cb"} <= shown
    assert "results.md" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    # the runs table's saved "Headline" view shows those metrics beside each run
    envelope = json.loads(client.get_experiment(exp.experiment_id).tags[VIEW_TAG_PREFIX + VIEW_ID])
    columns = json.loads(envelope["state"])["selectedColumns"]
    assert envelope["name"] == "Headline" and "metrics.`cb.L2.delta_vs_best`" in columns
    assert "tags.`cb.L2.best_baseline`" in columns and len(columns) == len(m) + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    return exe


def _browse(exe: str, url: str, profile: Path, *args: str, size: str = "1900,900",
            budget_ms: int = 20000) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                           f"--window-size={size}", *args, url], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_experiment_page_shows_the_pipeline_and_its_headline(tmp_path, monkeypatch):
    exe = _chromium()
    db = tmp_path / "mlflow.db"
    _fill_store(tmp_path, f"sqlite:///{db}", monkeypatch)
    exp_id = _runs(f"sqlite:///{db}")[1].experiment_id
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{db}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    artifacts = Path(os.environ.get("RETRIKT_TEST_ARTIFACTS") or REPO / ".test-artifacts")
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 120 s")
        url = experiment_url(base, exp_id)  # the README's link
        # the table renders only the columns in view (sorted by name): a wide window shows them all
        dom = _browse(exe, url, tmp_path / "profile", "--dump-dom", size="6000,900")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert "pipeline/ui-check" in html, html[-3000:]
        for key in HEADLINE:  # the parent run's headline metrics are columns of the runs table
            assert f'col-id="metrics.`{key}`"' in html, key
        assert ">0.95<" in html and ">mgskd<" in html  # RetriKT L2 and the best baseline's name, on the row
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = artifacts / "mlflow-experiment.png"
        taken = _browse(exe, url, tmp_path / "profile", f"--screenshot={shot}")
        assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
