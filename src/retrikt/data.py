"""`prepare` stage: a task's train/validation splits -> ``data/processed/<task>/``.

Source, in order: ``data.mirror_dir`` (a local mirror in the HF ``datasets`` JSONL layout,
``<dir>/<task>/{train,validation}.jsonl``; relative paths are taken from the repository root), else
``$RETRIKT_DATA_DIR``, else the Hugging Face hub through ``datasets`` (online users only).

Low-resource option: ``data.train_limit`` keeps a stratified, seeded subsample of train (original
order kept). Writes the two splits, ``spare.jsonl`` (the train rows the limit left out: the source of
``generate.source: oracle``; empty without a limit) and a data card (counts, label distribution,
content hash of the two splits).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

from retrikt import paths
from retrikt.io import DataError, atomic_write_json, read_jsonl_numbered, write_jsonl
from retrikt.params import Params
from retrikt.tasks import Task, get_task

SPLITS = ("train", "validation")


def data_dir(params: Params) -> Path | None:
    """The mirror folder to read, or None for the hub."""
    if params.data.mirror_dir:
        return paths.user_path(params.data.mirror_dir)
    env = os.environ.get("RETRIKT_DATA_DIR")
    return paths.user_path(env) if env else None


def load_split(task: Task, split: str, mirror: Path | None) -> list[dict]:
    """Rows of one split, validated against the task schema; errors name the file and line."""
    if mirror is None:
        import datasets

        rows = [dict(r) for r in datasets.load_dataset(task.hf_path, task.hf_config, split=split)]
        where = f"{task.hf_path}/{task.hf_config}:{split}"
        numbered = list(enumerate(rows, 1))
    else:
        path = mirror / task.mirror_dir / f"{split}.jsonl"
        if not path.exists():
            raise DataError(f"{path}: not found (mirror {mirror} has no task '{task.name}')")
        numbered, where = read_jsonl_numbered(path), str(path)
        rows = [row for _, row in numbered]
    for line, row in numbered:
        try:
            task.validate(row)
            if "label" not in row:
                raise ValueError("missing field 'label'")
        except ValueError as e:
            raise DataError(f"{where}:{line}: {e}") from None
    return rows


def stratified_subsample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most ``limit`` rows, label proportions kept (largest remainder), original order kept."""
    if limit is None or limit >= len(rows):
        return list(rows)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r["label"]].append(i)
    labels = sorted(by_label)
    exact = {y: limit * len(by_label[y]) / len(rows) for y in labels}
    quota = {y: int(exact[y]) for y in labels}
    for y in sorted(labels, key=lambda y: (-(exact[y] - quota[y]), y))[: limit - sum(quota.values())]:
        quota[y] += 1
    rng = random.Random(seed)
    keep: list[int] = []
    for y in labels:
        idx = list(by_label[y])
        rng.shuffle(idx)
        keep.extend(idx[: quota[y]])
    return [rows[i] for i in sorted(keep)]


def content_hash(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def card(task: Task, splits: dict[str, list[dict]], files: list[Path], source: str) -> dict:
    out: dict = {"task": task.name, "source": source, "sha256": content_hash(*files)}
    for name, rows in splits.items():
        counts = Counter(r["label"] for r in rows)
        out[name] = {"rows": len(rows),
                     "labels": {task.labels[y]: counts.get(y, 0) for y in range(task.num_labels)}}
    return out


def prepare(params: Params, task_name: str, run=None) -> dict:
    """Run the stage for one task; returns the data card (also the stage's DVC metrics)."""
    task = get_task(task_name)
    mirror = data_dir(params)
    limits = {"train": params.data.train_limit, "validation": params.data.validation_limit}
    full = {s: load_split(task, s, mirror) for s in SPLITS}
    splits = {s: stratified_subsample(full[s], limits[s], params.seed) for s in SPLITS}
    for name in SPLITS:
        if not splits[name]:
            raise DataError(f"{task.name}: the {name} split has no rows")
    kept = {id(r) for r in splits["train"]}
    spare = [r for r in full["train"] if id(r) not in kept]  # train rows outside the low-resource subset
    files = [write_jsonl(paths.split_file(task.name, s), splits[s]) for s in SPLITS]
    write_jsonl(paths.spare_file(task.name), spare)
    info = card(task, splits, files, source=str(mirror) if mirror else f"hub:{task.hf_path}/{task.hf_config}")
    atomic_write_json(paths.processed(task.name) / paths.DATA_CARD, info)
    if run is not None:
        run.set_metrics({"train_rows": len(splits["train"]), "validation_rows": len(splits["validation"]),
                         "spare_rows": len(spare)})
    return info
