"""The file layout every stage agrees on (and dvc.yaml mirrors). Stages talk through these files only."""

from __future__ import annotations

import os
from pathlib import Path

PROCESSED = Path("data/processed")
STORE = Path("data/store")
MODELS = Path("models")
BASE_MODELS = MODELS / "base"  # resolve_model's output, one folder per role
REPORTS = Path("reports")
METRICS = REPORTS / "metrics"
PLOTS = REPORTS / "plots"
FIGURES = REPORTS / "figures"


def base_model(role: str) -> Path:
    return BASE_MODELS / role


def processed(task: str) -> Path:
    return PROCESSED / task


def split_file(task: str, split: str) -> Path:
    return processed(task) / f"{split}.jsonl"


def spare_file(task: str) -> Path:
    """Train rows left out by ``data.train_limit`` (the oracle store's source; empty without a limit)."""
    return processed(task) / "spare.jsonl"


def teacher(task: str) -> Path:
    return MODELS / task / "teacher"


def prompt(task: str) -> Path:
    return MODELS / task / "prompt"


def ppo(task: str) -> Path:
    return MODELS / task / "ppo"


def store(task: str) -> Path:
    return STORE / task


def student(task: str, method: str, layers: int, seed: int) -> Path:
    return MODELS / task / "students" / f"{method}-L{layers}-s{seed}"


def metrics(task: str, stage: str) -> Path:
    return METRICS / task / f"{stage}.json"


def student_metrics(task: str, method: str, layers: int, seed: int) -> Path:
    return METRICS / task / "students" / f"{method}-L{layers}-s{seed}.json"


def plot(task: str, name: str) -> Path:
    return PLOTS / task / f"{name}.json"


def predictions(task: str, name: str) -> Path:
    """Per-example validation predictions of a model (teacher, a student): evaluate's paired tests read them."""
    return REPORTS / "predictions" / task / f"{name}.json"


def main_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The main checkout: DVC_ROOT or cwd, with a ``.dvc/tmp/exps/<tmp>`` temp-copy suffix removed."""
    here = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def user_path(path: str | os.PathLike) -> Path:
    """A folder named in params (data mirror, local model): ``~`` expanded, and a relative path taken
    from the main checkout, so a queued experiment's temporary copy under ``.dvc/tmp/exps/`` finds the
    same folder as a foreground run (``../shared/data/glue`` would otherwise point inside ``.dvc/``)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (main_repo_root() / p).resolve()
