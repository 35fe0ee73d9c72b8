"""Retrieval inference and `retrikt predict`: class probabilities, plus the evidence for retrieval students.

A student folder (``models/<task>/students/<method>-L<l>-s<seed>``) is a classifier folder whose
``retrikt_classifier.json`` names the ``method``. A ``retrikt`` student also carries ``store/``:
its own FAISS index over the store entries (``index.faiss``, ``ids.json``, ``meta.json``) and a
copy of ``entries.jsonl``, so the folder alone is enough to serve it. Its prediction for ``x`` is
``Σ_{i ≤ k} softmax(s/τ)_i · soft_label_i`` over the ``k`` entries most similar to ``x`` under the
student's embedding (:func:`retrieval_proba`); its classification head is not used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from retrikt import store
from retrikt.classifier import META, Classifier
from retrikt.io import DataError, MissingInputError, read_json, read_jsonl
from retrikt.tasks import Task, get_task

STORE_SUBDIR = "store"


def retrieval_proba(query_emb: np.ndarray, index, ids: np.ndarray, soft: np.ndarray, k: int,
                    tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(proba [Q, C], sims [Q, k], entry ids [Q, k])``: top-k search + :func:`retrieval_aggregate`.

    ``soft`` is indexed by entry id. Hits an approximate index could not fill (id -1) get weight 0.
    """
    import torch

    from retrikt.distill.losses import retrieval_aggregate

    sims, hits = store.search(index, query_emb, k, ids)
    labels = soft[np.clip(hits, 0, None)]
    proba = retrieval_aggregate(torch.from_numpy(sims), torch.from_numpy(labels), tau)
    return proba.numpy().astype(np.float32), sims, hits


@dataclass
class Student:
    """A trained student, ready to predict; ``index``/``ids``/``entries`` only for ``retrikt``."""

    clf: Classifier
    meta: dict
    index: object | None = None
    ids: np.ndarray | None = None
    entries: list[dict] | None = None
    soft: np.ndarray | None = None  # [N, C] soft labels, by entry id

    @property
    def method(self) -> str:
        return self.meta["method"]

    def proba(self, rows: Sequence[dict], k: int | None = None) -> tuple[np.ndarray, np.ndarray | None,
                                                                          np.ndarray | None]:
        """Class probabilities ``[Q, C]``, and for ``retrikt`` the similarities and ids of the top-k."""
        if self.index is None:
            return self.clf.predict_proba(rows), None, None
        r = self.meta["retrieval"]
        return retrieval_proba(self.clf.embed(rows), self.index, self.ids, self.soft, k or r["top_k"], r["tau"])


def load_student(folder: str | Path) -> Student:
    folder = Path(folder)
    meta = read_json(folder / META) if (folder / META).exists() else {}
    if "method" not in meta:
        raise MissingInputError(f"{folder}: not a student folder (no {META} naming a method)")
    clf = Classifier.load(folder)
    if meta.get("method") != "retrikt":
        return Student(clf, meta)
    index, ids, _ = store.load_index(folder / STORE_SUBDIR)
    entries = read_jsonl(folder / STORE_SUBDIR / "entries.jsonl")
    if sorted(e.get("id") for e in entries if isinstance(e.get("id"), int)) != list(range(len(entries))) \
            or not set(ids.tolist()) <= set(range(len(entries))):
        raise DataError(f"{folder / STORE_SUBDIR}: the index ids do not match the entries' ids 0..{len(entries) - 1}")
    return Student(clf, meta, index, ids, entries, store.soft_labels(entries))


def predict(task: str | Task, student_dir: str | Path, inputs: Sequence[dict], k: int | None = None) -> list[dict]:
    """Per input: ``label``, ``label_index``, ``proba`` (label -> p) and, for ``retrikt``, ``evidence``:
    the top-k store entries (``id``, ``similarity``, ``soft_label`` as label -> p, the entry's
    conditioning ``label`` and its input fields), most similar first."""
    task = get_task(task) if isinstance(task, str) else task
    student = load_student(student_dir)
    if student.clf.task.name != task.name:
        raise DataError(f"{student_dir}: a {student.clf.task.name} student, not {task.name}")
    if k is not None and k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    proba, sims, hits = student.proba(list(inputs), k)
    by_id = {e["id"]: e for e in student.entries or []}
    out = []
    for i, p in enumerate(proba):
        pred = {"label": task.labels[int(p.argmax())], "label_index": int(p.argmax()),
                "proba": {name: round(float(v), 6) for name, v in zip(task.labels, p)}}
        if hits is not None:
            pred["evidence"] = [
                {"id": int(h), "similarity": round(float(s), 6),
                 "soft_label": {n: round(float(v), 6) for n, v in zip(task.labels, by_id[h]["soft_label"])},
                 "label": task.labels[by_id[h]["label"]] if isinstance(by_id[h].get("label"), int) else None,
                 **{f: by_id[h][f] for f in task.input_fields}}
                for s, h in zip(sims[i], hits[i]) if h >= 0]
        out.append(pred)
    return out


def format_prediction(pred: dict, task: str | Task, width: int = 100) -> str:
    """A few human-readable lines: the label, the probabilities and the retrieved evidence."""
    task = get_task(task) if isinstance(task, str) else task
    probs = "  ".join(f"{n} {p:.3f}" for n, p in pred["proba"].items())
    lines = [f"prediction: {pred['label']}    ({probs})"]
    for rank, ev in enumerate(pred.get("evidence", []), 1):
        text = " | ".join(f"{f}: {ev[f]}" for f in task.text_fields)
        text = text if len(text) <= width else text[:width - 3] + "..."
        soft = " ".join(f"{p:.2f}" for p in ev["soft_label"].values())
        lines.append(f"  {rank:2d}. sim {ev['similarity']:.3f}  soft [{soft}]  #{ev['id']}  {text}")
    return "\n".join(lines)


def parse_cli_inputs(task: str | Task, fields: list[str] | None, jsonl: Path | None) -> list[dict]:
    """Inputs from ``field=value`` arguments (one example) or a JSONL file (one per line).

    Raises :class:`DataError` with a one-line message for a malformed argument, an unknown or
    missing field, or a value of the wrong type.
    """
    from retrikt.tasks import _INT_FIELDS

    task = get_task(task) if isinstance(task, str) else task
    names = ", ".join(task.input_fields)
    if bool(fields) == (jsonl is not None):
        raise DataError(f"give either field=value arguments or --jsonl (not both, not neither); "
                        f"{task.name} fields: {names}")
    if jsonl is not None:
        rows = read_jsonl(jsonl)
        where = [f"{jsonl}: input {i}" for i in range(1, len(rows) + 1)]
        if not rows:
            raise DataError(f"{jsonl}: no inputs")
    else:
        row: dict = {}
        for arg in fields:
            name, sep, value = arg.partition("=")
            if not sep:
                raise DataError(f"argument {arg!r}: expected field=value ({task.name} fields: {names})")
            if name not in task.input_fields:
                raise DataError(f"unknown field {name!r} for task {task.name} (fields: {names})")
            row[name] = int(value) if name in _INT_FIELDS and value.lstrip("-").isdigit() else value
        rows, where = [row], ["input"]
    out = []
    for row, at in zip(rows, where):
        missing = [f for f in task.input_fields if f not in row]
        if missing:
            raise DataError(f"{at}: missing field(s) {', '.join(missing)} for task {task.name} (fields: {names})")
        ex = {f: row[f] for f in task.input_fields}
        try:
            task.validate(ex)
        except ValueError as e:
            raise DataError(f"{at}: {e}") from None
        out.append(ex)
    return out


def to_json(preds: Sequence[dict]) -> str:
    """JSON Lines of predictions (``--json`` output)."""
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
