"""Serving a trained student: class probabilities, plus the retrieved evidence for a retrieval student.

Library module shared by the ``train_student`` stage (validation and serving latency), the ``predict``
command and the ``evaluate`` report (the retrieval panel).

A student folder (``models/<task>/students/<method>-L<l>-s<seed>``) is a classifier folder whose
``retrikt_classifier.json`` names the ``method``. A ``retrikt`` student also carries ``store/``
(:data:`retrikt.paths.STORE_SUBDIR`): its own FAISS index over the store entries (``index.faiss``,
``ids.json``, ``meta.json``) and a copy of ``entries.jsonl``, so the folder alone is enough to serve it. Its
prediction for ``x`` is ``Σ_{i ≤ k} softmax(s/τ)_i · soft_label_i`` over the ``k`` entries most similar
to ``x`` under the student's embedding (:func:`retrieval_proba`); its classification head is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from retrikt import paths, store
from retrikt.classifier import Classifier
from retrikt.io import DataError, MissingInputError, read_json, read_jsonl
from retrikt.tasks import Task, get_task

if TYPE_CHECKING:  # pragma: no cover
    import torch


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
    return proba.float().numpy(), sims, hits  # float(): under bf16 autocast the weighted sum is bf16


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


def load_student(folder: str | Path, device: "torch.device | str" = "cpu") -> Student:
    folder = Path(folder)
    meta_file = folder / paths.CLASSIFIER_META
    meta = read_json(meta_file) if meta_file.exists() else {}
    if "method" not in meta:
        raise MissingInputError(f"{folder}: not a student folder (no {paths.CLASSIFIER_META} naming a method)")
    clf = Classifier.load(folder, device)
    if meta.get("method") != "retrikt":
        return Student(clf, meta)
    index, ids, _ = store.load_index(folder / paths.STORE_SUBDIR)
    entries = read_jsonl(folder / paths.STORE_SUBDIR / paths.ENTRIES_FILE)
    if sorted(e.get("id") for e in entries if isinstance(e.get("id"), int)) != list(range(len(entries))) \
            or not set(ids.tolist()) <= set(range(len(entries))):
        raise DataError(f"{folder / paths.STORE_SUBDIR}: the index ids do not match the entries' ids "
                        f"0..{len(entries) - 1}")
    return Student(clf, meta, index, ids, entries, store.soft_labels(entries))


def predict(task: str | Task, student_dir: str | Path, inputs: Sequence[dict], k: int | None = None,
            device: "torch.device | str" = "cpu") -> list[dict]:
    """Per input: ``label``, ``label_index``, ``proba`` (label -> p) and, for ``retrikt``, ``evidence``:
    the top-k store entries (``id``, ``similarity``, ``soft_label`` as label -> p, the entry's
    conditioning ``label`` and its input fields), most similar first."""
    task = get_task(task) if isinstance(task, str) else task
    student = load_student(student_dir, device)
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
