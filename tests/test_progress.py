"""Progress: bars on a terminal, one line per phase elsewhere, and no library noise in a stage's log."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from retrikt import progress
from retrikt.progress import bar

from .conftest import REPO, tiny_models
from .test_teacher import learnable_rows


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="retrikt.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "retrikt.progress"]


def test_log_mode_one_line_per_phase_never_per_item(monkeypatch, lines):
    monkeypatch.setenv(progress.ENV, "log")
    with bar(total=3, desc="train", unit="epoch") as outer:
        for epoch in range(3):
            inner = bar(total=50, desc=f"train epoch {epoch + 1}/3", unit="batch")
            for _ in range(50):
                inner.update(1)
                inner.set_postfix(loss=0.123456)
            inner.close()
            outer.update(1)
    got = lines()
    assert len(got) == 5, got  # start of the outer phase, one line per epoch, its end
    assert got[0] == "train: start, 3 epoch"
    assert got[1].startswith("train epoch 1/3: 50/50 batch in ") and got[1].endswith("; loss 0.1235")
    assert got[-1].startswith("train: 3/3 epoch in ")


def test_log_every_gives_lines_along_the_way_not_per_item(monkeypatch, lines):
    monkeypatch.setenv(progress.ENV, "log")
    with bar(total=12, desc="rl updates", unit="update", log_every=5) as b:
        for _ in range(12):
            b.update(1)
            b.set_postfix(reward=0.5)
    got = [line.split(" in ")[0] for line in lines()]
    assert got == ["rl updates: start, 12 update", "rl updates: 5/12 update",
                   "rl updates: 10/12 update", "rl updates: 12/12 update"], got
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        bar(total=3, desc="x", log_every=0)


def test_iterating_counts_items_and_closes(monkeypatch, lines):
    monkeypatch.setenv(progress.ENV, "log")
    assert list(bar(range(4), desc="embed", unit="batch", announce=False)) == [0, 1, 2, 3]
    assert [line.split(" in ")[0] for line in lines()] == ["embed: 4/4 batch"]


def test_off_mode_is_silent(monkeypatch, lines, capfd):
    monkeypatch.setenv(progress.ENV, "off")
    with bar(total=2, desc="x") as b:
        b.update(2)
    assert lines() == [] and capfd.readouterr().err == ""


def test_bar_mode_draws_on_stderr(monkeypatch, lines, capfd):
    monkeypatch.setenv(progress.ENV, "bar")
    with bar(total=4, desc="sampling", unit="sample") as b:
        b.update(4)
        b.set_postfix(parse_rate=0.5)
    err = capfd.readouterr().err
    assert "sampling" in err and "4/4" in err and "parse_rate=0.5" in err
    assert lines() == []  # the bar replaces the log lines


def test_auto_follows_stderr_and_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(progress.ENV, "auto")
    assert progress.mode() == "log"  # pytest captures stderr: not a terminal
    monkeypatch.setenv(progress.ENV, "loud")
    with pytest.raises(ValueError, match="RETRIKT_PROGRESS"):
        progress.mode()


def test_fresh_head_is_one_line_not_a_load_report(tiny_encoder_dir, capfd, caplog):
    from retrikt.classifier import Classifier
    from retrikt.tasks import get_task

    caplog.set_level(logging.INFO, logger="retrikt.classifier")
    Classifier.from_base(tiny_encoder_dir, get_task("cb"), 32, num_layers=2)
    assert "LOAD REPORT" not in capfd.readouterr().err
    said = [r.getMessage() for r in caplog.records if r.name == "retrikt.classifier"]
    assert len(said) == 1 and "new 3-class head (classifier.bias, classifier.weight)" in said[0], said


def test_stage_log_off_a_terminal_is_lean(tmp_path, tiny_encoder_dir, monkeypatch):
    """The teacher stage as DVC runs it (stderr a pipe): its phases, no tables, no library bars."""
    monkeypatch.chdir(tmp_path)
    raw = tiny_models(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["teacher"].update({"epochs": 2, "batch_size": 8, "max_length": 32})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(tiny_encoder_dir, tmp_path / "models/base/encoder")
    for split, rows in (("train", learnable_rows(24)), ("validation", learnable_rows(6, 100))):
        p = tmp_path / "data/processed/cb" / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if k not in (progress.ENV, "TQDM_DISABLE")}
    env.update(RETRIKT_MLFLOW="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-m", "retrikt.cli", "teacher", "cb"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    log = out.stderr
    for noise in ("LOAD REPORT", "MISSING", "Loading weights", "it/s]", "\r", "faiss.loader"):
        assert noise not in log, (noise, log)
    assert "teacher cb: start, 2 epoch" in log and "teacher cb epoch 2/2: 3/3 batch in" in log
    assert "val_accuracy" in log and "new 3-class head" in log
    assert len(log.splitlines()) <= 12, log
