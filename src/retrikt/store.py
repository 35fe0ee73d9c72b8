"""The knowledge store and its FAISS index: load entries, build, save, load and search an index.

The generate stage writes ``data/store/<task>/entries.jsonl`` (rows ``{"id": 0..N-1, <input
fields>, "label", "soft_label": [C floats], "text"}``). Embeddings are L2-normalised, so every
index here is an inner-product index and its scores are cosine similarities.

An index folder holds ``index.faiss``, ``ids.json`` (row of the index -> entry id) and
``meta.json`` (which model embedded the entries: its folder and the sha256 of its weights, the
dimension, index kind and entry count). Folders are written atomically (:func:`retrikt.io.atomic_dir`).

Index kinds: ``flat`` (exact, ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``; ``nlist`` is clipped to
``N // 39`` so every centroid has FAISS's minimum of 39 training points, k-means seeded) and
``hnsw`` (``IndexHNSWFlat``, inner product; built on one thread, so the graph is reproducible).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from retrikt import paths
from retrikt.io import DataError, MissingInputError, atomic_dir, atomic_write_json, read_json, read_jsonl
from retrikt.models import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import faiss

INDEX_KINDS = ("flat", "ivf", "hnsw")
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained


def model_identity(folder: str | Path) -> dict:
    """Which classifier embedded the entries: its folder and the sha256 of ``model.safetensors``."""
    return {"model": str(folder), "model_sha256": sha256_file(Path(folder) / paths.WEIGHTS_FILE)}


def load_entries(task: str, path: str | Path | None = None) -> list[dict]:
    """Store entries in id order; checks ids are ``0..N-1`` and soft labels are ``C`` probabilities."""
    from retrikt.tasks import get_task

    path = Path(path) if path is not None else paths.store_entries(task)
    if not path.exists():
        raise MissingInputError(f"{path}: no store entries (run the generate stage first)")
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: the store is empty")
    n_labels = get_task(task).num_labels
    for i, row in enumerate(rows):
        if row.get("id") != i:
            raise DataError(f"{path}:{i + 1}: expected id {i}, got {row.get('id')!r}")
        soft = row.get("soft_label")
        if not isinstance(soft, list) or len(soft) != n_labels or abs(sum(soft) - 1.0) > 1e-3:
            raise DataError(f"{path}:{i + 1}: soft_label must be {n_labels} probabilities summing to 1")
    return rows


def soft_labels(entries: Sequence[dict]) -> np.ndarray:
    """``[N, C]`` float32 soft labels of the entries, in the given order."""
    return np.asarray([e["soft_label"] for e in entries], dtype=np.float32)


def build_index(embeddings: np.ndarray, kind: str = "flat", nlist: int = 64, hnsw_m: int = 32, seed: int = 0,
                *, nprobe: int | None = None, ef_search: int = 64) -> "faiss.Index":
    """An inner-product index over L2-normalised ``[N, H]`` float32 embeddings (row i = position i).

    ``ivf``: ``nlist`` is clipped to ``max(1, N // 39)``; k-means uses ``seed``; ``nprobe`` defaults
    to a quarter of the lists. ``hnsw``: ``hnsw_m`` links per node, ``ef_search`` at query time.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty [N, H] array, got shape {x.shape}")
    if not np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3):
        raise ValueError("embeddings must be L2-normalised (inner product = cosine)")
    n, dim = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        lists = max(1, min(nlist, n // MIN_POINTS_PER_CENTROID))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = nprobe or max(1, lists // 4)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # parallel insertion makes the graph depend on thread timing
        try:
            index.add(x)
        finally:
            faiss.omp_set_num_threads(threads)
        return index
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    index.add(x)
    return index


def index_params(index: "faiss.Index") -> dict:
    """The search-relevant settings of an index (for meta.json)."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        return {"kind": "ivf", "nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if isinstance(index, faiss.IndexHNSW):
        return {"kind": "hnsw", "ef_search": int(index.hnsw.efSearch)}
    return {"kind": "flat"}


def save_index(folder: str | Path, index: "faiss.Index", ids: Sequence[int], meta: dict,
               embeddings: np.ndarray | None = None) -> Path:
    """Write ``index.faiss``, ``ids.json``, ``meta.json`` (plus dim/count/kind) and, if given, the
    indexed vectors as ``embeddings.npy`` — all in one atomic folder replacement."""
    import faiss

    if len(ids) != index.ntotal:
        raise ValueError(f"{len(ids)} ids for an index of {index.ntotal} vectors")
    with atomic_dir(folder) as tmp:
        faiss.write_index(index, str(tmp / paths.INDEX_FILE))
        if embeddings is not None:
            np.save(tmp / paths.INDEX_EMBEDDINGS, np.asarray(embeddings, dtype=np.float32))
        atomic_write_json(tmp / paths.INDEX_IDS, [int(i) for i in ids])
        atomic_write_json(tmp / paths.INDEX_META, {**meta, **index_params(index), "dim": int(index.d),
                                              "count": int(index.ntotal)})
    return Path(folder)


def load_index(folder: str | Path) -> tuple["faiss.Index", np.ndarray, dict]:
    """``(index, ids, meta)`` as written by :func:`save_index`; ids is an int64 array."""
    import faiss

    folder = Path(folder)
    if not (folder / paths.INDEX_FILE).exists():
        raise MissingInputError(f"{folder}: no {paths.INDEX_FILE} (run the index stage first)")
    try:
        index = faiss.read_index(str(folder / paths.INDEX_FILE))
    except RuntimeError as e:  # FAISS's own message is a C++ stack of several lines
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        first = first.split("Error: ", 1)[-1][:160]  # FAISS: "Error in <signature> at <file>: Error: '<what>'"
        raise DataError(f"{folder / paths.INDEX_FILE}: not a readable FAISS index, truncated or corrupt? "
                        f"({first}); re-run the index stage") from None
    ids = read_json(folder / paths.INDEX_IDS, "run the index stage first")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise DataError(f"{folder / paths.INDEX_IDS}: expected a JSON list of entry ids (integers >= 0)")
    ids = np.asarray(ids, dtype=np.int64)
    meta = read_json(folder / paths.INDEX_META, "run the index stage first")
    if len(ids) != index.ntotal:
        raise DataError(f"{folder}: {paths.INDEX_IDS} has {len(ids)} ids, the index {index.ntotal} vectors")
    return index, ids, meta


def search(index: "faiss.Index", queries: np.ndarray, k: int,
           ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(scores [Q, k], ids [Q, k])`` by inner product, best first.

    ``k`` is clipped to the index size. Rows are mapped through ``ids`` when given. Approximate
    indexes may return fewer hits; missing ones have id -1 and score -inf.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, index.d)
    k = min(k, index.ntotal)
    scores, rows = index.search(q, k)
    missing = rows < 0
    if ids is not None:
        rows = np.where(missing, -1, ids[np.clip(rows, 0, None)])
    return np.where(missing, -np.inf, scores).astype(np.float32), rows.astype(np.int64)


def dir_bytes(folder: str | Path) -> int:
    """Bytes of the regular files under ``folder`` (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())



def load_embeddings(folder: str | Path) -> np.ndarray:
    """The ``embeddings.npy`` saved next to an index (row i = index row i)."""
    path = Path(folder) / paths.INDEX_EMBEDDINGS
    if not path.exists():
        raise MissingInputError(f"{path}: missing (run the index stage first)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # truncated or not an .npy file
        raise DataError(f"{path}: not a readable .npy array, truncated or corrupt? ({e}); "
                        "re-run the index stage") from None
