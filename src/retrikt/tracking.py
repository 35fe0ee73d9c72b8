"""DVC metrics/plots files and MLflow runs, in one place. Every stage goes through :class:`StageRun`.

- DVC: the stage's metrics JSON and plot rows (JSON lists) are written atomically at exit, whatever
  happens to MLflow.
- MLflow: one parent run per pipeline execution (keyed by git commit, DVC experiment name and the
  params.yaml hash, so every stage of one ``dvc repro``/``dvc exp run`` nests under the same parent),
  one nested run per stage with its params, metrics (per step for curves) and artifacts, tagged with
  stage, task, seed, git commit and ``DVC_EXP_NAME``. The parent run carries the whole params.yaml as
  params, runs from the first stage's start to the last stage's end, and gets the headline (metrics,
  best-baseline tags, a description and the figures) from ``evaluate`` (:meth:`StageRun.set_pipeline_summary`).
  The experiment is tagged as a model-training experiment (``mlflow.experimentKind``).
- Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db`` where <repo> is the *main*
  checkout even when DVC runs a queued experiment in a temporary copy under ``.dvc/tmp/exps/``, so
  foreground and queued runs land in the same store. Artifacts go to ``<repo>/mlartifacts``.
- A tracking server (``http(s)://``) that cannot be reached when a stage starts stops the stage before any
  compute with one line (:class:`retrikt.errors.TrackingError`; ``RETRIKT_MLFLOW=0`` runs untracked).
  Any later MLflow failure: one warning, and the stage carries on (its DVC files are still written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from retrikt.errors import TrackingError
from retrikt.io import atomic_write_json
from retrikt.paths import MLFLOW_ARTIFACTS, MLFLOW_DB, PARAMS_FILE, main_repo_root, timings as timings_path

log = logging.getLogger(__name__)
EXPERIMENT = "retrikt"
# MLflow 3's UI opens an experiment on the view of its kind; this tag says "model training". (MLflow
# 3.17's UI also keeps a GenAI / Machine-learning switch of its own in the sidebar, default GenAI,
# remembered per browser; a link with ``?workflowType=machine_learning`` sets it.)
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# A saved view of the runs table with the headline columns (see save_headline_view)
VIEW_TAG_PREFIX, VIEW_ID, VIEW_NAME, MAX_VIEW_COLUMNS = "mlflow.sharedViewState.", "headline", "Headline", 60
TELEMETRY_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def disable_telemetry() -> None:
    for k, v in TELEMETRY_ENV.items():
        os.environ.setdefault(k, v)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{main_repo_root() / MLFLOW_DB}"


_LOCK_DEPTH = 0  # store_lock held by this process (re-entrant)


@contextlib.contextmanager
def store_lock(uri: str):
    """For a sqlite store: hold an exclusive lock on ``<db>.lock``, re-entrant within the process.

    Stages of experiments run in parallel (``dvc queue start -j N``) write one sqlite file at once;
    without this, two first-time writers race through MLflow's schema migration ("table
    _alembic_tmp_experiments already exists") or time out on sqlite's own lock, and a run is lost.
    A tracking server serialises on its own side: no lock."""
    global _LOCK_DEPTH
    if not uri.startswith("sqlite:///"):
        yield
        return
    if _LOCK_DEPTH:  # this process holds it already
        _LOCK_DEPTH += 1
        try:
            yield
        finally:
            _LOCK_DEPTH -= 1
        return
    import fcntl

    path = Path(uri[len("sqlite:///"):] + ".lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _LOCK_DEPTH = 1
        try:
            yield
        finally:
            _LOCK_DEPTH = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError (one line) if ``uri`` is an MLflow server that does not answer its /health."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered: reachable (auth and the rest are MLflow's to report)
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
                            "MLFLOW_TRACKING_URI, or set RETRIKT_MLFLOW=0 to run untracked") from None


def save_headline_view(client, experiment_id: str, columns: list[str], width: int = 150) -> None:
    """A saved view of the experiment's runs table (MLflow 3.17: an experiment tag
    ``mlflow.sharedViewState.<id>`` holding ``{name, createdAt, updatedAt, state}``, listed under
    "Views" and opened by ``?viewStateShareKey=<id>``) showing ``columns`` (``metrics.`k```,
    ``tags.`k```) beside each run, merged with the columns it already had."""
    key = VIEW_TAG_PREFIX + VIEW_ID
    now = int(time.time() * 1000)
    old = client.get_experiment(experiment_id).tags.get(key)
    created, had = now, []
    if old:
        try:
            envelope = json.loads(old)
            created, had = envelope["createdAt"], json.loads(envelope["state"]).get("selectedColumns", [])
        except (ValueError, KeyError, TypeError):
            pass
    keep = list(dict.fromkeys([*(c for c in had if c not in columns), *columns]))[-MAX_VIEW_COLUMNS:]
    state = {"selectedColumns": keep, "columnWidths": {c: width for c in keep}}
    client.set_experiment_tag(experiment_id, key, json.dumps(
        {"name": VIEW_NAME, "createdAt": created, "updatedAt": now, "state": json.dumps(state)}))


def experiment_url(base: str = "http://127.0.0.1:5000", experiment_id: str = "1") -> str:
    """The runs table of the experiment in the headline view (and the UI's model-training mode)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_ID}"


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the key names MLflow and the report show)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def pipeline_key(params_path: str | os.PathLike = PARAMS_FILE) -> str:
    p = Path(params_path)
    h = hashlib.sha256(p.read_bytes()).hexdigest()[:12] if p.exists() else "noparams"
    return f"{git_commit()[:12]}:{os.environ.get('DVC_EXP_NAME', 'workspace')}:{h}"


class StageRun:
    """Context manager for one stage execution.

    >>> with StageRun("teacher", metrics_path=..., task="cb", seed=0, params={...}) as run:
    ...     run.log_metrics({"loss": 0.3}, step=1)        # curve point (MLflow), not a DVC metric
    ...     run.add_plot_row("teacher_curve", {"epoch": 1, "loss": 0.3})
    ...     run.set_metrics({"accuracy": 0.8})              # final DVC metrics
    """

    _mlflow_ok: bool | None = None  # class-wide: warn once per process

    def __init__(self, stage: str, *, metrics_path: str | os.PathLike | None, task: str | None = None,
                 seed: int | None = None, params: dict | None = None, plots: dict[str, str | os.PathLike] | None = None,
                 tags: dict[str, str] | None = None, execution: dict[str, str] | None = None,
                 params_file: str | os.PathLike = PARAMS_FILE):
        self.stage, self.task, self.seed = stage, task, seed
        self.params_file = Path(params_file)  # the stage's --params: keys the pipeline run, logged on it
        self.execution = dict(execution or {})  # device, threads, torch: recorded in timings and tags
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.params = params or {}
        self.plot_paths = {k: Path(v) for k, v in (plots or {}).items()}
        self.plot_rows: dict[str, list[dict]] = {k: [] for k in self.plot_paths}
        self.metrics: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.tags = dict(tags or {})
        self._mlflow = None
        self._uri = ""
        self.run_id: str | None = None
        self._parent_id: str | None = None

    # -- MLflow, guarded --------------------------------------------------------------------- #
    def _ml(self, fn, *args, **kwargs):
        if self._mlflow is None:
            return None
        try:
            with store_lock(self._uri):
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never fail a stage
            self._disable(e)
            return None

    def _disable(self, err: Exception) -> None:
        if StageRun._mlflow_ok is not False:
            warnings.warn(f"MLflow tracking disabled for this stage ({type(err).__name__}: {err}); "
                          "DVC metrics are still written", RuntimeWarning, stacklevel=3)
        StageRun._mlflow_ok = False
        self._mlflow = None

    def _start_mlflow(self) -> None:
        if os.environ.get("RETRIKT_MLFLOW", "1") == "0":
            return
        self._uri = tracking_uri()
        try:
            with store_lock(self._uri):  # one writer at a time on a sqlite store
                self._start_mlflow_locked()
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def _start_mlflow_locked(self) -> None:
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            uri = tracking_uri()
            mlflow.set_tracking_uri(uri)
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                art = (main_repo_root() / MLFLOW_ARTIFACTS).as_uri() if uri.startswith("sqlite") else None
                try:
                    exp_id = client.create_experiment(EXPERIMENT, artifact_location=art, tags={KIND_TAG: KIND})
                except Exception:  # noqa: BLE001 - a concurrent stage (dvc queue -j N) created it first
                    exp = client.get_experiment_by_name(EXPERIMENT)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
                if exp.tags.get(KIND_TAG) != KIND:  # a store made before the tag existed
                    client.set_experiment_tag(exp_id, KIND_TAG, KIND)
            parent = self._parent_run(client, exp_id)
            self._parent_id = parent
            client.update_run(parent, status="RUNNING")  # until this stage ends
            commit = git_commit()
            tags = {"stage": self.stage, "git_commit": commit, "mlflow.parentRunId": parent,
                    "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"), **self.execution, **self.tags}
            if self.task:
                tags["task"] = self.task
            if self.seed is not None:
                tags["seed"] = str(self.seed)
            name = "/".join(str(x) for x in (self.stage, self.task, self.tags.get("variant")) if x)
            run = client.create_run(exp_id, run_name=name, tags=tags)
            self._mlflow, self._client, self.run_id = mlflow, client, run.info.run_id
            flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(self.params).items()}
            for i in range(0, len(flat), 100):
                chunk = dict(list(flat.items())[i:i + 100])
                self._ml(self._client.log_batch, self.run_id,
                         params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in chunk.items()])
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def _parent_run(self, client, exp_id: str) -> str:
        key = pipeline_key(self.params_file)
        found = client.search_runs([exp_id], filter_string=f"tags.pipeline_key = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        commit, exp_name = git_commit(), os.environ.get("DVC_EXP_NAME", "workspace")
        run = client.create_run(exp_id, run_name=f"pipeline/{exp_name}",
                                tags={"pipeline_key": key, "git_commit": commit, "dvc_exp_name": exp_name,
                                      "stage": "pipeline"})
        # the whole params.yaml (the key pins it), so the runs table compares pipelines' params too
        try:
            from retrikt.io import load_yaml

            raw = load_yaml(self.params_file.read_text(encoding="utf-8")) or {}
        except (OSError, ValueError):
            raw = {}
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flatten(raw).items()}
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id  # its end time follows the last stage that ends (``__exit__``)

    # -- public API ---------------------------------------------------------------------------- #
    def __enter__(self) -> "StageRun":
        if os.environ.get("RETRIKT_MLFLOW", "1") != "0":
            check_reachable(tracking_uri())  # before any compute: a stage that cannot be tracked does not run
        self._start_mlflow()
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Curve points / intermediate values: MLflow only (DVC plots go through add_plot_row)."""
        if self._mlflow is None:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._ml(self._client.log_batch, self.run_id, metrics=items)

    def add_plot_row(self, name: str, row: dict[str, Any], step_key: str | None = None) -> None:
        """Append a row to DVC plot ``name`` and log its numbers to MLflow at step row[step_key]."""
        self.plot_rows.setdefault(name, []).append(row)
        step = int(row[step_key]) if step_key and step_key in row else len(self.plot_rows[name])
        self.log_metrics({f"{name}.{k}": v for k, v in row.items() if k != step_key}, step=step)

    def set_metrics(self, metrics: dict[str, Any]) -> None:
        """Final metrics: written to the DVC metrics JSON and logged to MLflow."""
        self.metrics.update(metrics)
        self.log_metrics(metrics)

    def set_timings(self, timings: dict[str, float]) -> None:
        """Wall-clock numbers (seconds, latencies): machine-dependent, so they are kept out of the
        metrics file (same seed -> identical metrics) in the parallel ``reports/timings/`` tree."""
        self.timings.update(timings)
        self.log_metrics(timings)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            fn = self._client.log_artifacts if Path(path).is_dir() else self._client.log_artifact
            self._ml(fn, self.run_id, str(path), artifact_path)

    def set_pipeline_summary(self, metrics: dict[str, float], tags: dict[str, str] | None = None,
                             description: str | None = None,
                             artifacts: dict[str, str | os.PathLike] | None = None) -> None:
        """The headline of the whole pipeline, on its parent run (so the runs table shows it without
        expanding anything): ``metrics``, ``tags``, a markdown ``description`` (the run's note) and
        ``artifacts`` (artifact folder -> file or folder)."""
        if self._mlflow is None or self._parent_id is None:
            return
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if description:
            run_tags.append(RunTag("mlflow.note.content", description))
        for i in range(0, max(len(items), 1), 1000):
            self._ml(self._client.log_batch, self._parent_id, metrics=items[i:i + 1000],
                     tags=run_tags if i == 0 else [])
        for folder, path in (artifacts or {}).items():
            if Path(path).exists():
                fn = self._client.log_artifacts if Path(path).is_dir() else self._client.log_artifact
                self._ml(fn, self._parent_id, str(path), folder or None)
        columns = [f"metrics.`{m.key}`" for m in items] + [f"tags.`{k}`" for k in (tags or {})]
        self._ml(save_headline_view, self._client, self._client.get_run(self._parent_id).info.experiment_id,
                 columns)

    def write_files(self) -> None:
        for name, rows in self.plot_rows.items():
            path = self.plot_paths.get(name)
            if path is not None:
                atomic_write_json(path, rows)
        if self.metrics_path is not None:
            atomic_write_json(self.metrics_path, self.metrics)
            timings = {**self.timings, **({"execution": self.execution} if self.execution else {})}
            if timings:
                atomic_write_json(timings_path(self.metrics_path), timings)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write_files()
        if self._mlflow is not None:
            status = "FINISHED" if exc_type is None else "FAILED"
            self._ml(self._client.set_terminated, self.run_id, status)
            if self._parent_id is not None:  # the pipeline's duration: first stage start -> last stage end
                self._ml(self._client.set_terminated, self._parent_id, status)
