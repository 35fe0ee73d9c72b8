"""`index` stage: embed every store entry with the reward model and build its FAISS index.

Reads ``data/store/<task>/entries.jsonl`` and the teacher (``models/<task>/teacher``); writes
``data/index/<task>/`` = ``index.faiss``, ``ids.json``, ``meta.json`` (the embedding model's
folder and weights sha256, the entries' sha256, kind, dim, count) and ``embeddings.npy`` (the
reward model's entry embeddings, which the retrieval student's training targets are built from).

Metrics: ``entries``, ``dim``, ``index_bytes`` (the folder on disk), for approximate kinds
``recall_at_k`` against exact search, and ``rm_retrieval`` — the task's metrics of the reward model
*used as the retriever*: its own embedding of each validation input, its top ``student.retrieval_top_k``
entries of this index, their soft labels aggregated at ``student.retrieval_tau`` — exactly how a
``retrikt`` student predicts, with the reward model's embeddings in place of the student's. A student
trained to imitate the reward model's similarities approaches this, so it is the store's ceiling for
retrieval (a diagnostic: nothing downstream reads it). Timings (``run.set_timings``): ``embed_seconds``,
``build_seconds``, ``query_ms`` (mean single-query FAISS search over the validation examples,
``k = student.retrieval_candidates``).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from retrikt import paths, store
from retrikt.classifier import Classifier
from retrikt.device import resolve_device
from retrikt.io import read_jsonl
from retrikt.models import sha256_file
from retrikt.params import Params
from retrikt.progress import bar
from retrikt.retrieval import retrieval_proba
from retrikt.tasks import get_task

log = logging.getLogger(__name__)


def mean_query_ms(index, queries: np.ndarray, k: int) -> float:
    """Mean wall time of one-query searches, in milliseconds."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        store.search(index, q[None], k)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.mean(times)) if times else 0.0


def recall_at_k(index, embeddings: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k that ``index`` returns."""
    _, exact = store.search(store.build_index(embeddings, "flat"), queries, k)
    _, approx = store.search(index, queries, k)
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def index(params: Params, task_name: str, run) -> dict:
    task, ip = get_task(task_name), params.index
    entries = store.load_entries(task.name)
    teacher_dir = paths.teacher(task.name)
    teacher = Classifier.load(teacher_dir, resolve_device(params.device))

    t0 = time.perf_counter()
    emb = teacher.embed(entries, desc=f"index {task.name}: embed the store")
    embed_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with bar(total=len(entries), desc=f"index {task.name}: build {ip.type}", unit="entry") as b:
        idx = store.build_index(emb, ip.type, ip.nlist, ip.hnsw_m, params.seed)
        b.update(len(entries))
    build_seconds = time.perf_counter() - t0

    out_dir = paths.index(task.name)
    meta = {"task": task.name, **store.model_identity(teacher_dir),
            "entries_sha256": sha256_file(paths.store_entries(task.name))}
    store.save_index(out_dir, idx, [e["id"] for e in entries], meta, embeddings=emb)
    log.info("indexed %d store entries (%s, dim %d) into %s", idx.ntotal, ip.type, idx.d, out_dir)

    validation = read_jsonl(paths.split_file(task.name, "validation"))
    queries = teacher.embed(validation)
    k = min(params.student.retrieval_candidates, idx.ntotal)
    metrics = {"entries": int(idx.ntotal), "dim": int(idx.d), "index_bytes": store.dir_bytes(out_dir)}
    sp = params.student
    proba = retrieval_proba(queries, idx, np.asarray([e["id"] for e in entries]), store.soft_labels(entries),
                            min(sp.retrieval_top_k, idx.ntotal), sp.retrieval_tau)[0]
    metrics["rm_retrieval"] = task.compute_metrics([r["label"] for r in validation], proba.argmax(1).tolist())
    if ip.type != "flat":
        metrics["recall_at_k"] = recall_at_k(idx, emb, queries, k)
    timings = {"embed_seconds": embed_seconds, "build_seconds": build_seconds,
               "query_ms": mean_query_ms(idx, queries, k)}
    run.set_metrics(metrics)
    run.set_timings(timings)
    return {**metrics, **timings}
