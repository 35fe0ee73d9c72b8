"""Queued DVC experiments land in the same MLflow store as foreground runs (issue: experiments).

A real `mlflow server` on 127.0.0.1, a throw-away git+DVC copy of this repository with tiny local
models, a grid of two experiments queued with `dvc exp run --queue -S ...` and run by
`dvc queue start`; both must show in `dvc exp show` and, with their metrics, in MLflow's REST API.
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
import yaml

from .conftest import REPO, tiny_models
from .test_teacher import learnable_rows

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--default-artifact-root", str(tmp_path / "artifacts")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _make_repo(root: Path, encoder_dir: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    for rel in ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", "pyproject.toml"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # a mark only this copy's code leaves: queued experiments must run the code they were queued with,
    # not the package the virtualenv's editable install points at
    teacher_py = repo / "src" / "retrikt" / "teacher.py"
    code = teacher_py.read_text()
    line = 'out = {**metrics, "parameters": count_parameters(clf.model)}'
    assert line in code
    teacher_py.write_text(code.replace(line, line[:-1] + ', "code_of_this_copy": 1}'))
    mirror = root / "mirror" / "cb"
    mirror.mkdir(parents=True)
    (mirror / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in learnable_rows(24)))
    (mirror / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in learnable_rows(6, 100)))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["threads"] = 1  # tiny models: a second thread only thrashes
    params["data"]["mirror_dir"] = "../mirror"  # relative, like the default: queued copies must find it too
    tiny_models(params, encoder=encoder_dir)
    params["teacher"].update({"epochs": 1, "batch_size": 8, "max_length": 32})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], cwd=repo, check=True)
    return repo


def test_queued_grid_lands_in_dvc_and_mlflow(tmp_path, tiny_encoder_dir, mlflow_server):
    repo = _make_repo(tmp_path, tiny_encoder_dir)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)

    def dvc(*args: str, timeout: int = 300) -> str:
        out = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    names = ["lr-small", "lr-large"]
    for name, lr in zip(names, ("1e-4", "1e-3")):
        dvc("exp", "run", "--queue", "-n", name, "-S", f"teacher.lr={lr}", "teacher@cb")
    try:
        dvc("queue", "start", "-j", "1")
        deadline = time.time() + 900
        while time.time() < deadline:
            status = dvc("queue", "status")
            if not any(s in status for s in ("Queued", "Running")):
                break
            time.sleep(5)
        assert "Failed" not in status, status + dvc("queue", "logs", names[0])
    finally:  # never leave a worker behind, even when an assertion fails
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)

    shown = json.loads(dvc("exp", "show", "--json"))
    exp_names = {e.get("name") for commit in shown for e in (commit.get("experiments") or [])
                 for e in [e["revs"][0] if e.get("revs") else e]}
    assert set(names) <= exp_names, exp_names

    exp = _api(mlflow_server, "experiments/get-by-name?experiment_name=retrikt")["experiment"]
    runs = _api(mlflow_server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 200,
                                               "filter": "tags.stage = 'teacher'"})["runs"]
    by_exp = {}
    for r in runs:
        tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        by_exp[tags.get("dvc_exp_name")] = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
    assert set(names) <= set(by_exp), by_exp.keys()
    for name in names:
        assert 0.0 <= by_exp[name]["accuracy"] <= 1.0
        assert by_exp[name]["code_of_this_copy"] == 1.0  # the experiment ran its own src/, not ours
