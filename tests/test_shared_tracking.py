"""Shared tracking: concurrent experiments and the multi-user set-up lose or duplicate no MLflow run.

1. `dvc queue start -j 2` over a grid of 4 experiments, both workers writing the default kind of store
   (one sqlite file) at once: every experiment has exactly one run per stage and one parent, finished.
2. The multi-user set-up of the README: an `mlflow server` on PostgreSQL (Debian's server binaries,
   started here on 127.0.0.1 in a temporary folder) and a shared DVC remote (a local folder). Two
   workers, each in its own clone, run an experiment at the same time and push to both (`dvc exp push`:
   git refs + DVC cache; MLflow: through the server). A third clone pulls both experiments and gets
   their metrics and models back; the server's database holds both workers' runs, once each.

Tiny models, the `teacher@cb` part of the DAG (check_params, resolve_model@encoder, prepare, teacher).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, tiny_models
from .test_teacher import learnable_rows

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STAGES = ["pipeline", "prepare", "resolve_model", "teacher"]  # the MLflow runs of one `teacher@cb` experiment
GIT_ID = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **GIT_ID, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env.pop("DVC_EXP_NAME", None)
    return env


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def make_project(root: Path, encoder_dir: Path, remote: Path | None = None) -> Path:
    """A git + DVC project: this repository's dvc.yaml, src/ and params.yaml at tiny scale, one commit."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    for rel in ("dvc.yaml", ".dvcignore", ".dvc/config"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / ".gitignore").write_text("__pycache__/\n")
    mirror = root / "mirror" / "cb"
    mirror.mkdir(parents=True)
    (mirror / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in learnable_rows(24)))
    (mirror / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in learnable_rows(6, 100)))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(threads=1, device="cpu")
    params["data"]["mirror_dir"] = str(root / "mirror")
    tiny_models(params, encoder=encoder_dir)
    params["teacher"].update({"epochs": 1, "batch_size": 8, "max_length": 32})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env()
    _run(["git", "init", "-q"], repo, env)
    if remote is not None:
        _run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(remote)], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "tiny"], repo, env)
    return repo


def runs_by_experiment(uri: str) -> dict[str, list[dict]]:
    """MLflow runs of experiment `retrikt`, grouped by their `dvc_exp_name` tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("retrikt")
    out: dict[str, list[dict]] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(r.data.tags.get("dvc_exp_name"), []).append(
            {"stage": r.data.tags.get("stage"), "status": r.info.status, "metrics": r.data.metrics,
             "threads": r.data.tags.get("threads")})
    return out


def assert_one_run_per_stage(by_exp: dict[str, list[dict]], names, ran: dict[str, list[str]] | None = None) -> None:
    """Each experiment: one finished run per stage that ran (default: all of STAGES) and one parent."""
    assert set(names) <= set(by_exp), sorted(by_exp, key=str)
    for name in names:
        stages = sorted(r["stage"] for r in by_exp[name])
        want = STAGES if ran is None else sorted(["pipeline", *ran[name]])
        assert stages == want, (name, stages, want)  # none lost, none twice
        assert all(r["status"] == "FINISHED" for r in by_exp[name]), by_exp[name]
        teacher = next(r for r in by_exp[name] if r["stage"] == "teacher")
        assert 0.0 <= teacher["metrics"]["accuracy"] <= 1.0


# ------------------------------------------------------------------------------ 1. the queue, -j 2
def test_parallel_queue_loses_and_duplicates_no_run(tmp_path, tiny_encoder_dir):
    repo = make_project(tmp_path, tiny_encoder_dir)
    uri = f"sqlite:///{tmp_path}/shared-mlflow.db"
    env = _env(MLFLOW_TRACKING_URI=uri)
    dvc = [str(BIN / "dvc")]
    grid = {"lr-1": "1e-4", "lr-2": "3e-4", "lr-3": "1e-3", "lr-4": "3e-3"}
    for name, lr in grid.items():
        _run([*dvc, "exp", "run", "--queue", "-n", name, "-S", f"teacher.lr={lr}", "teacher@cb"], repo, env)
    try:
        _run([*dvc, "queue", "start", "-j", "2"], repo, env)
        deadline = time.time() + 900
        while time.time() < deadline:
            status = _run([*dvc, "queue", "status"], repo, env)
            if not any(s in status for s in ("Queued", "Running")):
                break
            time.sleep(3)
        assert "Failed" not in status, status
    finally:  # never leave a worker behind
        subprocess.run([*dvc, "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)
    # what each experiment ran; the rest DVC restored from its run-cache (the queue's experiments share it)
    ran = {}
    for name in grid:
        log = _run([*dvc, "queue", "logs", name], repo, env)
        ran[name] = sorted({line.split("'")[1].split("@")[0] for line in log.splitlines()
                            if line.startswith("Running stage '")} - {"check_params"})  # check_params: no run
        assert "teacher" in ran[name], log[-2000:]  # its own lr: always computed
    assert_one_run_per_stage(runs_by_experiment(uri), grid, ran)
    shown = json.loads(_run([*dvc, "exp", "show", "--json"], repo, env))
    names = {e["name"] for c in shown for e in (c.get("experiments") or [])}
    assert set(grid) <= names, names


# ------------------------------------------------------------- 2. PostgreSQL + a shared DVC remote
def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and Path(found).with_name("initdb").exists():
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True)
    return next((Path(d) for d in dirs if (Path(d) / "initdb").exists()), None)


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (trust auth, fsync off); yields its SQLAlchemy URI."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql "
                    "package (`apt-get install -y postgresql`, as .ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="retrikt-pg-"))  # under /tmp: the postgres user must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-locale", "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                        "-t", "60", "-o", f"-h 127.0.0.1 -p {port} -k {data} -F", "start"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q", "-c",
                        "CREATE DATABASE mlflow"], check=True, capture_output=True, timeout=60)
        yield {"uri": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow", "psql": [
            str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "mlflow", "-tA", "-c"]}
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_on_postgres(postgres, tmp_path):
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", postgres["uri"],
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # the first start creates the schema in PostgreSQL
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 120 s")
        if proc.poll() is not None:
            pytest.fail("mlflow server exited:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
        yield {**postgres, "server": base}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_two_workers_share_a_postgres_tracking_server_and_a_dvc_remote(tmp_path, tiny_encoder_dir,
                                                                        mlflow_on_postgres):
    remote, origin = tmp_path / "dvc-remote", tmp_path / "origin.git"
    remote.mkdir()
    seed = make_project(tmp_path / "seed", tiny_encoder_dir, remote=remote)
    env = _env(MLFLOW_TRACKING_URI=mlflow_on_postgres["server"])
    _run(["git", "clone", "-q", "--bare", str(seed), str(origin)], tmp_path, env)
    dvc = str(BIN / "dvc")

    workers = {"worker-a": "1e-4", "worker-b": "1e-3"}
    procs = {}
    for name, lr in workers.items():  # each in its own clone, at the same time
        clone = tmp_path / name
        _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
        script = (f"{dvc} exp run -n {name} -S teacher.lr={lr} teacher@cb && "
                  f"{dvc} exp push origin {name}")  # git refs to origin, the DVC cache to the shared remote
        procs[name] = subprocess.Popen(["bash", "-c", script], cwd=clone, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}:\n{out[-4000:]}"

    # MLflow: each worker's runs, once each, finished, in the server's PostgreSQL database
    by_exp = runs_by_experiment(mlflow_on_postgres["server"])
    assert_one_run_per_stage(by_exp, workers)
    assert {r["threads"] for name in workers for r in by_exp[name] if r["stage"] == "teacher"} == {"1"}
    psql = mlflow_on_postgres["psql"]
    count = subprocess.run([*psql, "SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                   "WHERE t.key = 'dvc_exp_name' AND t.value LIKE 'worker-%'"],
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert int(count) == len(workers) * len(STAGES)

    # DVC: a third clone gets both experiments, their metrics and their models, from origin + the remote
    reviewer = tmp_path / "reviewer"
    _run(["git", "clone", "-q", str(origin), str(reviewer)], tmp_path, env)
    for name in workers:
        _run([dvc, "exp", "pull", "origin", name], reviewer, env)
    shown = json.loads(_run([dvc, "exp", "show", "--json"], reviewer, env))
    names = {e["name"] for c in shown for e in (c.get("experiments") or [])}
    assert set(workers) <= names, names
    for name in workers:  # its commit, then its teacher from the reviewer's cache, filled by the pull
        _run([dvc, "exp", "branch", name, f"from-{name}"], reviewer, env)
        _run(["git", "checkout", "-q", f"from-{name}"], reviewer, env)
        _run([dvc, "checkout", "teacher@cb"], reviewer, env)
        mine = json.loads((reviewer / "reports/metrics/cb/teacher.json").read_text())
        theirs = json.loads((tmp_path / name / "reports/metrics/cb/teacher.json").read_text())
        assert mine == theirs
        assert (reviewer / "models/cb/teacher/model.safetensors").stat().st_size > 0  # from the shared remote
        assert mine["accuracy"] == next(r for r in by_exp[name] if r["stage"] == "teacher")["metrics"]["accuracy"]
