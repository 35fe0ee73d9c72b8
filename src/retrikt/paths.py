"""The file layout every stage agrees on (and dvc.yaml mirrors). Stages talk through these files only."""

from __future__ import annotations

import os
from pathlib import Path

PROCESSED = Path("data/processed")
STORE = Path("data/store")
INDEX = Path("data/index")
MODELS = Path("models")
BASE_MODELS = MODELS / "base"  # resolve_model's output, one folder per role
REPORTS = Path("reports")
METRICS = REPORTS / "metrics"
PLOTS = REPORTS / "plots"
FIGURES = REPORTS / "figures"
TIMINGS = REPORTS / "timings"  # wall-clock costs, parallel to METRICS (machine-dependent, not compared)
RESULTS_JSON = REPORTS / "results.json"
RESULTS_MD = REPORTS / "results.md"
HEADLINE_METRICS = REPORTS / "metrics.json"  # the one file dvc.yaml declares as metrics
PARAMS_FILE = Path("params.yaml")  # the default --params, read from the working directory
FOREST_FIGURE = FIGURES / "forest.png"  # evaluate's cross-task figure
MLFLOW_DB = "mlflow.db"  # in the main checkout (main_repo_root()): the default MLflow store ...
MLFLOW_ARTIFACTS = "mlartifacts"  # ... and its artifact folder

# file names inside the folders above (names, not paths: each is joined to the folder it lives in)
ENTRIES_FILE = "entries.jsonl"  # a store's entries, in data/store/<task>/ and in a retrikt student's store/
STORE_STATS = "stats.json"  # in data/store/<task>/: the generate stage's metrics
STORE_PREVIEW = "preview.md"  # in data/store/<task>/: a readable sample of the entries
DATA_CARD = "card.json"  # in data/processed/<task>/: the splits' source, row and label counts, digest
MODEL_META = "retrikt_model.json"  # in models/base/<role>/: where the model came from
MODEL_CONFIG = "config.json"  # a Hugging Face model folder's config
WEIGHTS_FILE = "model.safetensors"  # a model folder's weights (base models, teacher, students)
CLASSIFIER_META = "retrikt_classifier.json"  # in a classifier folder (teacher, students): task, labels, method
PROMPT_META = "retrikt_prompt.json"  # in models/<task>/prompt/: how the soft prompt was tuned
RL_META = "retrikt_rl.json"  # in models/<task>/rl/: the rl stage's outcome (accepted or not)
RL_DISABLED = "disabled.json"  # in models/<task>/rl/ instead of a prompt when rl.enabled is false
ADAPTER_FILE = "adapter_config.json"  # a saved soft prompt (PEFT adapter): models/<task>/prompt/, .../rl/
STORE_SUBDIR = "store"  # in a retrikt student's folder: its own index over a copy of the entries
INDEX_FILE = "index.faiss"  # an index folder (data/index/<task>/, a retrikt student's store/): the FAISS index,
INDEX_IDS = "ids.json"  # ... index row -> entry id,
INDEX_META = "meta.json"  # ... which model embedded the entries, index kind, dimension, count
INDEX_EMBEDDINGS = "embeddings.npy"  # ... and, where saved, the indexed vectors (row i = index row i)


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


def rl(task: str) -> Path:
    """The rl stage's output: the RL-tuned soft prompt (or ``disabled.json``)."""
    return MODELS / task / "rl"


def store(task: str) -> Path:
    return STORE / task


def store_entries(task: str) -> Path:
    return store(task) / ENTRIES_FILE


def index(task: str) -> Path:
    """The index stage's output folder (next to, not inside, the generate stage's ``data/store/<task>``)."""
    return INDEX / task


def student(task: str, method: str, layers: int, seed: int) -> Path:
    return MODELS / task / "students" / f"{method}-L{layers}-s{seed}"


def metrics(task: str, stage: str) -> Path:
    return METRICS / task / f"{stage}.json"


def student_metrics(task: str, method: str, layers: int, seed: int) -> Path:
    return METRICS / task / "students" / f"{method}-L{layers}-s{seed}.json"


def model_metrics(role: str) -> Path:
    """The resolve_model stage's metrics of the base model ``role``."""
    return METRICS / "models" / f"{role}.json"


def timings(metrics_path: str | os.PathLike) -> Path:
    """``reports/metrics/x/y.json`` -> ``reports/timings/x/y.json`` (elsewhere: ``y.timings.json``)."""
    p = Path(metrics_path)
    parts = list(p.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == METRICS.name and i > 0 and parts[i - 1] == REPORTS.name:
            parts[i] = TIMINGS.name
            return Path(*parts)
    return p.with_name(p.stem + ".timings.json")


def figures(task: str) -> Path:
    return FIGURES / task


def figure(task: str, name: str) -> Path:
    """One of evaluate's per-task figures."""
    return figures(task) / f"{name}.png"


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
