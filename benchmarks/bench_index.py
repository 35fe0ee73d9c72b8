"""FAISS build and query timings for the store index kinds (not a test).

Random L2-normalised vectors stand in for entry embeddings (384 = all-MiniLM-L6-v2's width). For
each size × kind: build seconds, bytes of the written index, mean single-query search ms and
recall@k against exact search (flat). Uses :func:`retrikt.store.build_index`, so ``ivf`` clips
``nlist`` and ``hnsw`` builds on one thread, as the pipeline does.

    python benchmarks/bench_index.py --sizes 1000 10000 100000 --k 16 64 --out /tmp/bench_index.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from retrikt import store


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def query_ms(index, queries: np.ndarray, k: int) -> float:
    t0 = time.perf_counter()
    for q in queries:
        store.search(index, q[None], k)
    return 1000.0 * (time.perf_counter() - t0) / len(queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--kinds", nargs="+", default=list(store.INDEX_KINDS))
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--nlist", type=int, default=64)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        x = unit_vectors(n, args.dim, rng)
        queries = unit_vectors(args.queries, args.dim, rng)
        exact = {k: store.search(store.build_index(x, "flat"), queries, k)[1] for k in args.k}
        for kind in args.kinds:
            t0 = time.perf_counter()
            index = store.build_index(x, kind, args.nlist, args.hnsw_m, seed=0)
            build = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                store.save_index(Path(tmp) / "ix", index, range(n), {})
                size = os.path.getsize(Path(tmp) / "ix" / "index.faiss")
            row = {"n": n, "dim": args.dim, "kind": kind, **store.index_params(index),
                   "build_seconds": round(build, 3), "index_bytes": size}
            for k in args.k:
                hits = store.search(index, queries, k)[1]
                row[f"query_ms@{k}"] = round(query_ms(index, queries, k), 3)
                row[f"recall@{k}"] = round(float(np.mean([len(set(a) & set(e)) / k
                                                          for a, e in zip(hits, exact[k])])), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
