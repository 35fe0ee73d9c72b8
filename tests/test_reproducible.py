"""Reproducible for real, end to end through `dvc repro` on a tiny pipeline (issue: reproducible for real).

A throw-away DVC project holds this repository's dvc.yaml and src/ and params.yaml changed only in scale
(tiny local models, a small synthetic CB mirror, short budgets, RL on, one baseline and the retrieval
student). `dvc repro` runs every stage as its own process, as a user's would.

- Determinism: two fresh copies, `dvc repro` in each: every metrics file (and every prediction file)
  is the same bytes.
- Crash safety: in a third copy `dvc repro` (DVC and the stage's process together) is SIGKILLed while
  `teacher`, then `generate`, then one `train_store_student` computes. After each kill no partial output
  is left (each declared output is absent or complete), DVC does not take the killed stage for done, and
  the next `dvc repro` carries on; when it completes, the metrics equal the uninterrupted run's, byte
  for byte, and no temporary file is left anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from retrikt.tasks import get_task

from .conftest import REPO, fit_tiny_generator, tiny_models
from .test_train_student import keyword_rows

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
KILLED = ("teacher@cb", "generate@cb", "train_store_student@cb-retrikt-2-0")
DEVICE = os.environ.get("RETRIKT_TEST_DEVICE", "cpu")  # scripts/gpu-check.sh runs this file with cuda


def _params(mirror: Path, generator: Path, encoder: Path) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p.update(tasks=["cb"], seeds=[0], threads=1, device=DEVICE)
    p["data"].update(mirror_dir=str(mirror), train_limit=None, validation_limit=None)
    tiny_models(p, encoder=encoder, generator=generator)
    p["teacher"].update(epochs=12, batch_size=8, max_length=48)
    p["prompt_tune"].update(num_virtual_tokens=2, epochs=2, batch_size=4, max_length=96, train_limit=8)
    p["rl"].update(updates=1, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=48, eval_samples=2)
    p["generate"].update(num_samples=96, batch_size=16, max_new_tokens=48, min_entries=16)  # T 0.8: ~40 unique
    p["student"].update(layers=[2], baselines=["finetune"], store_methods=["retrikt"], epochs=6, batch_size=8,
                        max_length=48, retrieval_candidates=8, retrieval_top_k=4)
    p["evaluate"]["bootstrap_samples"] = 50
    return p


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory, tiny_causal_dir, tiny_encoder_dir):
    """The tiny mirror and models every copy shares (read-only)."""
    import torch

    root = tmp_path_factory.mktemp("repro-ingredients")
    rng = random.Random(3)
    rows = keyword_rows(96, rng)
    mirror = root / "mirror"
    (mirror / "cb").mkdir(parents=True)
    for split, part in (("train", rows[:48]), ("validation", rows[48:72])):
        (mirror / "cb" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = fit_tiny_generator(tiny_causal_dir, get_task("cb"), rows[72:], root / "generator", 96, 120)
    finally:
        torch.set_num_threads(threads)
    return _params(mirror, generator, tiny_encoder_dir)


def make_copy(root: Path, params: dict) -> Path:
    """A fresh DVC project: this repository's dvc.yaml and src/, the tiny params."""
    proj = root / "project"
    proj.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=proj, check=True, env=_env())
    return proj


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RETRIKT_MLFLOW": "0"}
    env.pop("DVC_EXP_NAME", None)
    return env


class Repro:
    """`dvc repro` in its own process group; its output (and its stages') read live, line by line."""

    def __init__(self, proj: Path):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=proj, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def wait_for(self, text: str, after: int = 0, timeout: float = 600) -> tuple[int, float]:
        """(index, time) of the first line from ``after`` on containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.lines)):
                if text in self.lines[i][1]:
                    return i, self.lines[i][0]
            if time.monotonic() >= deadline or (self.proc.poll() is not None and not self.reader.is_alive()):
                break
            time.sleep(0.02)
        raise AssertionError(f"never saw {text!r}:\n" + "\n".join(line for _, line in self.lines[-40:]))

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # DVC and the stage it runs, mid-flight
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)

    def finish(self, timeout: float = 900) -> str:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
        self.reader.join(timeout=10)
        out = "\n".join(line for _, line in self.lines)
        assert self.proc.returncode == 0, out[-4000:]
        return out

    def compute_seconds(self, stage: str) -> float:
        """Wall time of a stage's compute: from its process's `device:` line to the next stage's start."""
        i, _ = self.wait_for(f"Running stage '{stage}'", timeout=0)
        j, start = self.wait_for("device: ", after=i, timeout=0)
        nxt = [t for t, line in self.lines[j:] if "Running stage" in line or "Updating lock file" in line]
        return nxt[0] - start


def files(proj: Path, top: str) -> dict[str, bytes]:
    base = proj / top
    if base.is_file():
        return {top: base.read_bytes()}
    return {p.relative_to(proj).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def results(proj: Path) -> dict[str, bytes]:
    """Every metrics file (reports/metrics/ and reports/metrics.json) and every prediction file."""
    return {**files(proj, "reports/metrics"), **files(proj, "reports/metrics.json"),
            **files(proj, "reports/predictions")}


@pytest.fixture(scope="module")
def reference(ingredients, tmp_path_factory):
    """An uninterrupted run: the project and its `dvc repro`."""
    proj = make_copy(tmp_path_factory.mktemp("repro-a"), ingredients)
    run = Repro(proj)
    run.finish()
    return proj, run


def test_same_seed_same_bytes_in_a_fresh_copy(reference, ingredients, tmp_path):
    first, _ = reference
    second = make_copy(tmp_path, ingredients)
    Repro(second).finish()
    a, b = results(first), results(second)
    assert any(k.startswith("reports/metrics/cb/students/") for k in a) and "reports/metrics.json" in a
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"differ between two fresh runs: {differ}"
    store = json.loads(a["reports/metrics/cb/generate.json"])
    assert store["size"] >= 4  # the retrieval student had a real store to learn from
    timings = [json.loads(p.read_text()) for p in sorted((first / "reports/timings").rglob("*.json"))]
    assert len(timings) >= 8 and all(  # every stage recorded where and how it computed
        t["execution"]["device"].split(":")[0] == DEVICE.split(":")[0] and t["execution"]["threads"] == "1"
        for t in timings), timings


def _outs(proj: Path, stage: str) -> list[Path]:
    """The declared outputs of a resolved stage (`dvc` itself resolves foreach/matrix)."""
    from dvc.repo import Repo

    with Repo(str(proj)) as repo:
        (s,) = [s for s in repo.index.stages if s.name == stage]
        return [proj / str(o.def_path) for o in s.outs]


def _complete(path: Path) -> bool:
    """An output left after a kill is whole: JSON parses, model folders load their metadata."""
    if path.is_file():
        text = path.read_text() if path.suffix in (".json", ".jsonl") else ""
        if path.suffix == ".json":
            json.loads(text)
        for line in text.splitlines() if path.suffix == ".jsonl" else []:
            json.loads(line)
        return True
    return any(path.iterdir()) and all(_complete(p) for p in path.rglob("*.json*"))


def test_sigkill_mid_stage_leaves_no_partial_output_and_repro_completes(reference, ingredients, tmp_path):
    ref_proj, ref_run = reference
    proj = make_copy(tmp_path, ingredients)
    for stage in KILLED:
        delay = 0.4 * ref_run.compute_seconds(stage)  # well inside the stage's compute, measured just now
        assert delay > 0.3, f"{stage}: too short to interrupt ({delay:.2f} s)"
        run = Repro(proj)
        i, _ = run.wait_for(f"Running stage '{stage}'")
        run.wait_for("device: ", after=i)  # the stage's process is up and about to compute
        time.sleep(delay)
        assert run.proc.poll() is None, f"dvc repro ended before {stage} could be killed"
        run.kill()
        out = "\n".join(line for _, line in run.lines)
        assert f"Running stage '{stage}'" in out and not any(
            "Running stage" in line for _, line in run.lines[i + 1:]), f"{stage} was not the stage killed"
        outs = _outs(proj, stage)
        for o in outs:  # DVC removed the outputs before running; what exists now is whole
            assert not o.exists() or _complete(o), f"{stage}: partial output {o}"
        metrics = [o for o in outs if "reports/metrics" in o.as_posix()]
        assert metrics and not any(m.exists() for m in metrics), f"{stage} finished before the kill"
        status = subprocess.run([str(BIN / "dvc"), "status", stage], cwd=proj, env=_env(), capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0 and stage.split("@")[0] in status.stdout, status.stdout  # not taken for done
    Repro(proj).finish()
    leftovers = [p.relative_to(proj).as_posix() for p in proj.rglob("*.tmp")
                 if ".dvc" not in p.relative_to(proj).parts]
    assert not leftovers, f"temporary files left: {leftovers}"
    a, b = results(ref_proj), results(proj)
    assert sorted(a) == sorted(b) and not [k for k in a if a[k] != b[k]]
