"""Reading what the other stages wrote, for the report (the file layout is :mod:`retrikt.paths`).

Required: each configured student's metrics file (missing -> MissingInputError naming it). Everything
else is optional and, when absent, listed in the report's "missing inputs": the teacher's metrics,
predictions files, curves, the generate/rl/index/prompt_tune metrics, the train split (majority
class, store view), the store entries and the retrieval student folder (retrieval panel). A file that
exists but is malformed is an error (:class:`retrikt.io.DataError`, one line naming it). Predictions of
one task must cover the same validation rows (paired tests need them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from retrikt import paths
from retrikt.io import DataError, MissingInputError, read_json, read_jsonl
from retrikt.report.stats import is_number
from retrikt.tasks import Task


def clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, floats rounded to 6 decimals, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), 6) if np.isfinite(obj) else None
    return obj


@dataclass(frozen=True)
class Predictions:
    """One model's validation predictions (``paths.predictions``)."""

    path: Path
    idx: list
    labels: np.ndarray
    preds: np.ndarray


def load_predictions(path: Path, num_labels: int) -> Predictions:
    """Read and check a predictions file; DataError naming the file when it is malformed."""
    obj = read_json(path)
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), list) for k in ("idx", "label", "pred")):
        raise DataError(f"{path}: expected an object with 'idx', 'label' and 'pred' lists")
    if not obj["idx"] or not len(obj["idx"]) == len(obj["label"]) == len(obj["pred"]):
        raise DataError(f"{path}: 'idx', 'label' and 'pred' must be non-empty and of equal length")
    arrays = []
    for key in ("label", "pred"):
        arr = np.asarray(obj[key])
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= num_labels:
            raise DataError(f"{path}: '{key}' must be a list of class ids in 0..{num_labels - 1}")
        arrays.append(arr.astype(np.int64))
    return Predictions(path, list(obj["idx"]), arrays[0], arrays[1])


class TaskReader:
    """Reads one task's files: records missing optional inputs, checks predictions are paired."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.missing: list[str] = []
        self.warnings: list[str] = []
        self.reference: Predictions | None = None

    def _absent(self, path: Path) -> bool:
        if path.exists():
            return False
        self.missing.append(path.as_posix())
        return True

    def optional(self, path: Path) -> Any | None:
        return None if self._absent(path) else read_json(path)

    def metrics(self, path: Path, required: bool) -> dict[str, Any] | None:
        """A metrics file holding every task metric (its timings merged in); missing -> MissingInputError
        if required, else None."""
        if required and not path.exists():
            raise MissingInputError(f"{path}: missing student metrics (a configured method, size and seed); "
                                    "run its train_student stage first")
        obj = self.optional(path)
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a JSON object")
        timings = paths.timings(path)  # wall-clock costs live in the parallel reports/timings/ tree
        if timings.exists():
            obj = {**read_json(timings), **obj}
        for key in self.task.metrics:
            if not is_number(obj.get(key)):
                raise DataError(f"{path}: missing or non-numeric metric '{key}'")
        return obj

    def predictions(self, name: str) -> Predictions | None:
        path = paths.predictions(self.task.name, name)
        if self._absent(path):
            return None
        pred = load_predictions(path, self.task.num_labels)
        ref = self.reference
        if ref is None:
            self.reference = pred
        elif pred.idx != ref.idx or not np.array_equal(pred.labels, ref.labels):
            raise DataError(f"{path}: validation rows (idx/label) differ from {ref.path}; "
                            "paired tests need the same rows")
        return pred

    def check_agreement(self, pred: Predictions, metrics: Mapping[str, Any], what: str) -> None:
        """Warn when the metrics file disagrees with the metrics recomputed from the predictions."""
        recomputed = self.task.compute_metrics(pred.labels, pred.preds)
        for key in self.task.metrics:
            if abs(recomputed[key] - float(metrics[key])) > 1e-6:
                self.warnings.append(f"{what}: {key} is {float(metrics[key]):.6f} in the metrics file but "
                                     f"{recomputed[key]:.6f} from {pred.path.as_posix()}")

    def curve(self, name: str) -> list[dict] | None:
        """A DVC plot file (a JSON list of row objects)."""
        path = paths.plot(self.task.name, name)
        rows = self.optional(path)
        if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
            raise DataError(f"{path}: expected a JSON list of objects")
        return rows

    def rows(self, split: str) -> list[dict] | None:
        """The prepared ``split`` of the task (``data/processed/<task>/<split>.jsonl``), labels checked."""
        path = paths.split_file(self.task.name, split)
        if self._absent(path):
            return None
        rows = read_jsonl(path)
        for i, r in enumerate(rows, 1):
            if not (isinstance(r.get("label"), int) and 0 <= r["label"] < self.task.num_labels):
                raise DataError(f"{path}:{i}: 'label' must be a class id in 0..{self.task.num_labels - 1}")
        return rows

    def store_entries(self) -> list[dict] | None:
        """The knowledge store (``data/store/<task>/entries.jsonl``), checked by :func:`store.load_entries`."""
        from retrikt import store

        path = paths.store_entries(self.task.name)
        return None if self._absent(path) else store.load_entries(self.task.name, path)

    def retrieval(self, folder: Path, inputs: Sequence[dict], k: int, device="cpu") -> list[dict] | None:
        """:func:`retrikt.retrieval.predict` of the retrieval student in ``folder`` on ``inputs`` (top ``k``
        evidence each), or None when the folder is absent."""
        if self._absent(folder):
            return None
        from retrikt.retrieval import predict

        return predict(self.task, folder, [{f: r[f] for f in self.task.input_fields} for r in inputs], k, device)
