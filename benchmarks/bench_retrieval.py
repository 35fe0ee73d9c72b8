"""Serving cost of a retrieval student against the plain student forward, and the store index at scale.

Not a test: a benchmark. Run it alone on the machine (``flock /tmp/retrikt-cpu.lock ...`` here).

**What is timed, A/B in one process.** The same untrained L=2 student (the first 2 layers of
``models/base/encoder`` with a head; weights do not change the cost) serves CB validation/train rows
two ways, through the pipeline's own code: *plain* = ``Classifier.predict_proba`` (tokenise, forward,
softmax) and *retrieval* = ``retrieval_proba(Classifier.embed(rows), index, ...)`` (tokenise, forward,
mean-pool, L2-normalise, FAISS top-16, soft-label aggregation), as ``retrikt predict`` serves a
``retrikt`` student. Batches of 1 and of 32; after warm-up the two are called alternately (ABAB, then
BABA), each call timed on its own; p50/p95 over the calls, ratio = retrieval p50 / plain p50. Torch
and FAISS run at ``--threads`` (default 2).

**The store.** Real embeddings first: every text of the GLUE/SuperGLUE mirror (``data.mirror_dir``:
the classifier inputs of each registry task, rendered as the classifier sees them, plus each distinct
sentence of every text field, STS-B included) — about 125k distinct texts — embedded by
``models/base/encoder`` (mean-pooled last layer, L2-normalised: ``retrikt.classifier.mean_pool``, the
index stage's pooling). Cached under ``.cache/bench_retrieval/`` in 4,096-row parts keyed by the
encoder's and the mirror's sha256, so a rerun embeds nothing and an interrupted one resumes. A seeded
shuffle fixes the order: the first ``--queries`` texts are held-out queries (never in the store), the
rest fill the store in that order. Beyond the real texts, synthetic points are perturbations of real
ones: ``normalize(x_parent + s·ε)`` with ε drawn from the real embeddings' covariance (so the noise
lies in the directions the data varies in), and ``s`` set so that the median cosine between a point
and its parent equals the median cosine of a real point to its nearest real neighbour.

**Per configuration** (store size × index): build seconds, index bytes (serialised), process RSS
after the build, recall@16 of the held-out queries against exact search, search-only p50 (batch 1,
held-out queries), and end-to-end p50/p95 at batch 1 and 32 with the ratio to the plain forward.
Approximate indexes are tuned per size: the query knob (IVF ``nprobe``, HNSW ``efSearch``, plus
``k_factor`` for PQ + refine) is swept and the smallest value reaching ``--target-recall`` is used
(the sweep is printed too); if none reaches it, the largest is used and the row says so.

Index kinds: ``flat`` (exact; ``store.build_index``), ``ivf`` (``IndexIVFFlat``, ``store.build_index``
with nlist ≈ √N rounded to a power of 2), ``ivf_sq8`` (IVF + 8-bit scalar quantiser), ``ivf_pq_rf``
(IVF + 4-bit fast-scan PQ with d/4 sub-quantisers, re-ranked exactly: ``RFlat``), ``hnsw``
(``IndexHNSWFlat``, M = ``--hnsw-m``, efConstruction ``--ef-construction``) and ``hnsw_sq8``. HNSW is
built here on ``--threads`` threads; the pipeline's ``store.build_index`` builds it on one (a
reproducible graph) — at the default store sizes that is milliseconds.

    python benchmarks/bench_retrieval.py                 # every size and kind (~10 min warm)
    python benchmarks/bench_retrieval.py --quick         # 10k/100k, flat/ivf/hnsw, the first 4,096 real
                                                         # texts + synthetic, fewer A/B calls (~2 min cold)
    python benchmarks/bench_retrieval.py --sizes 1000000 --kinds ivf_sq8 hnsw --out /tmp/r.json --plot /tmp/r.png
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench_retrieval"
PART = 4096  # rows per cached embedding part (--quick embeds one)
K = 16  # retrieved entries (student.retrieval_top_k)
TAU = 0.1  # student.retrieval_tau
KINDS = ("flat", "ivf", "ivf_sq8", "ivf_pq_rf", "hnsw", "hnsw_sq8")
SIZES = (1_000, 10_000, 100_000, 1_000_000)
NPROBE = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
K_FACTOR = (2, 4, 8)
SENTENCE_FIELDS = ("sentence", "sentence1", "sentence2", "premise", "hypothesis", "choice1", "choice2", "text")


# ----------------------------------------------------------------------------- the real texts --- #
def mirror_items(mirror: Path) -> list[tuple[str, str | None]]:
    """Distinct ``(text_a, text_b)`` classifier inputs of the mirror, in a fixed (sorted) order."""
    from retrikt.io import read_jsonl
    from retrikt.tasks import TASKS, normalise_ws

    items: set[tuple[str, str | None]] = set()
    for folder in sorted(p for p in mirror.iterdir() if p.is_dir()):
        task = TASKS.get(folder.name)
        for split in ("train", "validation"):
            path = folder / f"{split}.jsonl"
            if not path.exists():
                continue
            for row in read_jsonl(path):
                if task is not None:
                    items.add(task.render(row))
                for f in SENTENCE_FIELDS:
                    if isinstance(row.get(f), str) and row[f].strip():
                        items.add((normalise_ws(row[f]), None))
    return sorted(items, key=lambda p: (p[0], p[1] or ""))


def _fingerprint(encoder: Path, mirror: Path, items: list) -> str:
    from retrikt.models import sha256_file

    h = hashlib.sha256()
    h.update(sha256_file(encoder / "model.safetensors").encode())
    h.update(json.dumps(items[:1000] + [len(items)]).encode())
    manifest = mirror / "MANIFEST.json"
    if manifest.exists():
        h.update(manifest.read_bytes())
    h.update(f"mean-pool-l2/max_length=128/part={PART}".encode())
    return h.hexdigest()[:16]


def embed_parts(items: list, order: np.ndarray, n_needed: int, encoder: Path, folder: Path,
                batch_size: int = 128) -> np.ndarray:
    """Embeddings ``[n_needed, H]`` of ``items[order[:n_needed]]``, computed part by part and cached."""
    import torch
    import transformers

    from retrikt.classifier import mean_pool

    folder.mkdir(parents=True, exist_ok=True)
    n_parts = math.ceil(n_needed / PART)
    missing = [p for p in range(n_parts) if not (folder / f"part-{p:04d}.npy").exists()]
    if missing:
        tok = transformers.AutoTokenizer.from_pretrained(encoder)
        model = transformers.AutoModel.from_pretrained(encoder, dtype="float32").eval()
        t0, done = time.perf_counter(), 0
        for p in missing:
            rows = [items[i] for i in order[p * PART:(p + 1) * PART]]
            out = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
            # singles and pairs apart (the tokenizer wants one or the other), each sorted by length
            for pair in (False, True):
                sel = [i for i, r in enumerate(rows) if (r[1] is not None) == pair]
                sel.sort(key=lambda i: len(rows[i][0]) + len(rows[i][1] or ""))
                for j in range(0, len(sel), batch_size):
                    chunk = sel[j:j + batch_size]
                    a = [rows[i][0] for i in chunk]
                    b = [rows[i][1] for i in chunk] if pair else None
                    enc = tok(a, b, padding=True, truncation=True, max_length=128, return_tensors="pt")
                    with torch.no_grad():
                        h = model(**enc).last_hidden_state
                    out[chunk] = torch.nn.functional.normalize(mean_pool(h, enc["attention_mask"]), dim=-1).numpy()
            tmp = folder / f".part-{p:04d}.tmp.npy"
            np.save(tmp, out)
            os.replace(tmp, folder / f"part-{p:04d}.npy")
            done += len(rows)
            print(f"  embedded part {p + 1}/{n_parts} ({done / (time.perf_counter() - t0):.0f} texts/s)",
                  file=sys.stderr, flush=True)
    return np.concatenate([np.load(folder / f"part-{p:04d}.npy") for p in range(n_parts)])[:n_needed]


def synthetic(real: np.ndarray, n: int, seed: int, nn_cos: float) -> np.ndarray:
    """``n`` perturbations of random real rows, renormalised, at parent cosine ≈ ``nn_cos`` (median)."""
    rng = np.random.default_rng(seed)
    centred = real - real.mean(0)
    cov = centred.T @ centred / len(real)
    w, v = np.linalg.eigh(cov.astype(np.float64))
    shape = (v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32)  # ε = z @ shape ~ N(0, cov)
    # |x + sε|² ≈ 1 + s² tr(cov)  ->  cos(x, x + sε) ≈ 1 / sqrt(1 + s² tr(cov))
    scale = math.sqrt((1.0 / nn_cos ** 2 - 1.0) / float(np.trace(cov)))
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        parents = rng.integers(len(real), size=m)
        x = real[parents] + scale * (rng.standard_normal((m, real.shape[1]), dtype=np.float32) @ shape)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def median_nn_cos(x: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    import faiss

    idx = faiss.IndexFlatIP(x.shape[1])
    idx.add(x)
    rows = np.random.default_rng(seed).choice(len(x), size=min(sample, len(x)), replace=False)
    sims, _ = idx.search(x[rows], 2)
    return float(np.median(sims[:, 1]))


# ------------------------------------------------------------------------------------ indexes --- #
def pow2_sqrt(n: int) -> int:
    return 2 ** round(math.log2(math.sqrt(n)))


def build(kind: str, x: np.ndarray, args) -> tuple[object, dict]:
    """An index of ``kind`` over ``x`` and its build-time settings."""
    import faiss

    from retrikt import store

    n, d = x.shape
    nlist = args.nlist or pow2_sqrt(n)
    if kind == "flat":
        return store.build_index(x, "flat"), {}
    if kind == "ivf":
        index = store.build_index(x, "ivf", nlist=nlist, seed=0)
        return index, {"nlist": int(index.nlist)}
    if kind in ("ivf_sq8", "ivf_pq_rf"):
        nlist = max(1, min(nlist, n // store.MIN_POINTS_PER_CENTROID))
        spec = f"IVF{nlist},SQ8" if kind == "ivf_sq8" else f"IVF{nlist},PQ{d // 4}x4fs,RFlat"
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.seed = 0
        index.train(x)
        index.add(x)
        return index, {"nlist": nlist, "factory": spec}
    if kind in ("hnsw", "hnsw_sq8"):
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
        index.hnsw.efConstruction = args.ef_construction
        index.add(x)
        return index, {"M": args.hnsw_m, "efConstruction": args.ef_construction}
    raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")


def knobs(kind: str, index) -> list[dict]:
    """The query-time settings to sweep for ``kind``, cheapest first."""
    import faiss

    if kind == "flat":
        return [{}]
    if kind.startswith("ivf"):
        nlist = faiss.extract_index_ivf(index).nlist
        probes = [p for p in NPROBE if p < nlist] + [nlist]  # ... up to every list (exact)
        if kind == "ivf_pq_rf":
            return [{"nprobe": p, "k_factor": f} for p in probes for f in K_FACTOR]
        return [{"nprobe": p} for p in probes]
    return [{"efSearch": e} for e in EF_SEARCH if e >= K]


def set_knob(index, knob: dict) -> None:
    import faiss

    if "nprobe" in knob:
        faiss.extract_index_ivf(index).nprobe = knob["nprobe"]
    if "k_factor" in knob:
        faiss.downcast_index(index).k_factor = knob["k_factor"]
    if "efSearch" in knob:
        faiss.downcast_index(index).hnsw.efSearch = knob["efSearch"]


def recall(hits: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / len(e) for a, e in zip(hits, exact)]))


def search_p50_ms(index, queries: np.ndarray, k: int = K) -> float:
    from retrikt import store

    for q in queries[:10]:
        store.search(index, q[None], k)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        store.search(index, q[None], k)
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


# ------------------------------------------------------------------------------------- serving --- #
def ab(plain, retrieval, batches: list, reps: int, warmup: int) -> dict:
    """Alternate ``plain(b)`` and ``retrieval(b)`` over ``batches`` × ``reps``; per-call times in ms."""
    for b in batches[:warmup]:
        plain(b)
        retrieval(b)
    t = {"plain": [], "retrieval": []}
    for r in range(reps):
        for i, b in enumerate(batches):
            order = (("plain", plain), ("retrieval", retrieval))
            for name, fn in (order if (r + i) % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                fn(b)
                t[name].append(1000.0 * (time.perf_counter() - t0))
    out = {}
    for name, v in t.items():
        out[f"{name}_p50_ms"] = float(np.percentile(v, 50))
        out[f"{name}_p95_ms"] = float(np.percentile(v, 95))
    out["ratio"] = out["retrieval_p50_ms"] / out["plain_p50_ms"]
    return out


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


# ------------------------------------------------------------------------------------- report --- #
def table(rows: list[dict]) -> str:
    head = ("| entries | index | settings | build s | index MB | RSS MB | recall@16 | search p50 ms | "
            "b1 p50 / p95 ms | b1 ratio | b32 p50 / p95 ms | b32 ratio |")
    lines = [head, "|" + "---:|" * 2 + "---|" + "---:|" * 9]
    for r in rows:
        s = ", ".join(f"{k} {v}" for k, v in {**r["build"], **r["knob"]}.items() if k != "factory")
        lines.append(
            f"| {r['entries']:,} | {r['kind']} | {s or '–'} | {r['build_seconds']:.2f} | "
            f"{r['index_bytes'] / 2 ** 20:.1f} | {r['rss_mb']:.0f} | {r['recall@16']:.3f}"
            f"{'' if r['recall_ok'] else ' (<target)'} | {r['search_p50_ms']:.3f} | "
            f"{r['b1']['retrieval_p50_ms']:.2f} / {r['b1']['retrieval_p95_ms']:.2f} | {r['b1']['ratio']:.2f}× | "
            + (f"{r['b32']['retrieval_p50_ms']:.1f} / {r['b32']['retrieval_p95_ms']:.1f} | {r['b32']['ratio']:.2f}× |"
               if r.get("b32") else "– | – |"))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    sizes = sorted({r["entries"] for r in rows})
    panels = [(None, "FAISS search only, batch 1: p50 ms (log)"),
              ("b1", "end to end, batch 1: retrieval p50 / plain forward p50"),
              ("b32", "end to end, batch 32: retrieval p50 / plain forward p50")]
    for ax, (key, label) in zip(axes, panels):
        for kind in kinds:
            rs = sorted((r for r in rows if r["kind"] == kind and (key is None or r.get(key))),
                        key=lambda r: r["entries"])
            if not rs:
                continue
            ys = [r["search_p50_ms"] if key is None else r[key]["ratio"] for r in rs]
            line, = ax.plot([r["entries"] for r in rs], ys, marker="o", label=kind)
            for r, y in zip(rs, ys):  # hollow marker: recall@16 below the target
                if not r["recall_ok"]:
                    ax.plot([r["entries"]], [y], marker="o", ms=11, mfc="none", color=line.get_color())
        if key is None:
            ax.axhline(5.0, color="grey", ls=":", lw=1, label="5 ms")
            ax.set_yscale("log")
            ax.set_ylabel("ms")
        else:
            ax.axhline(1.0, color="black", ls="--", lw=1, label="plain forward")
            ax.axhline(1.3, color="grey", ls=":", lw=1, label="1.3×")
            ax.set_ylabel("× plain forward")
            plain = [r[key]["plain_p50_ms"] for r in rows if r.get(key)]
            ax.text(0.02, 0.97, f"plain forward p50 ≈ {float(np.median(plain)):.1f} ms", transform=ax.transAxes,
                    va="top", fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" if n < 1000 else f"{n // 1000}k" if n < 10 ** 6 else f"{n / 10 ** 6:g}M"
                              for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("store entries")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left" if key is None else "center left")
    fig.suptitle(title + " (ringed: recall@16 below target)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main --- #
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="10k/100k, flat/ivf/hnsw, 4,096 real texts, fewer calls (~2 min, cold or warm)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS threads (default 2)")
    ap.add_argument("--queries", type=int, default=None, help="held-out query texts (default 500; quick 200)")
    ap.add_argument("--reps", type=int, default=None, help="A/B rounds over the batch-1 inputs (default 4; quick 2)")
    ap.add_argument("--real", type=int, default=None,
                    help="real texts to embed, queries included (default: every mirror text; quick 4096); "
                         "the store beyond them is synthetic")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default ≈ √N, a power of 2)")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--no-b32", action="store_true", help="skip the batch-32 A/B")
    ap.add_argument("--mirror", type=Path, default=REPO.parent / "shared" / "data" / "glue")
    ap.add_argument("--encoder", type=Path, default=REPO / "models" / "base" / "encoder")
    ap.add_argument("--embed-only", action="store_true", help="only fill the embedding cache")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="no measuring: table and plot from earlier --out files (merged)")
    ap.add_argument("--out", type=Path, default=None, help="JSON rows")
    ap.add_argument("--markdown", type=Path, default=None, help="the table as Markdown")
    ap.add_argument("--plot", type=Path, default=None, help="PNG: latency vs store size per index kind")
    args = ap.parse_args(argv)
    args.sizes = args.sizes or ([10_000, 100_000] if args.quick else list(SIZES))
    args.kinds = args.kinds or (["flat", "ivf", "hnsw"] if args.quick else list(KINDS))
    args.queries = args.queries or (200 if args.quick else 500)
    args.reps = args.reps or (2 if args.quick else 4)
    args.real = args.real or (PART if args.quick else None)
    if args.real is not None and args.real <= args.queries:
        ap.error(f"--real {args.real} leaves no store row after {args.queries} held-out queries")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        runs = [json.loads(p.read_text()) for p in args.from_json]
        rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (r["entries"], KINDS.index(r["kind"])))
        meta = {**runs[0]["meta"], "seconds": sum(run["meta"]["seconds"] for run in runs)}
        return report(rows, meta, args)
    for p, what in ((args.mirror, "the GLUE mirror"), (args.encoder / "model.safetensors", "the encoder")):
        if not p.exists():
            sys.exit(f"bench_retrieval: {p}: {what} is missing (resolve_model / data.mirror_dir)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss
    import torch

    from retrikt import store
    from retrikt.classifier import Classifier
    from retrikt.io import read_jsonl
    from retrikt.retrieval import retrieval_proba
    from retrikt.tasks import get_task

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t_start = time.perf_counter()

    items = mirror_items(args.mirror)
    order = np.random.default_rng(0).permutation(len(items))
    n_real = min(len(items), args.queries + max(args.sizes), args.real or len(items))
    folder = CACHE / _fingerprint(args.encoder, args.mirror, items)
    emb = embed_parts(items, order, n_real, args.encoder, folder)
    queries, pool = emb[:args.queries], emb[args.queries:]
    nn_cos = median_nn_cos(pool)
    print(f"# {len(items):,} distinct mirror texts; {len(pool):,} real store rows, {len(queries)} held-out "
          f"queries; median nearest-neighbour cosine {nn_cos:.3f} ({time.perf_counter() - t_start:.0f} s)",
          flush=True)
    if args.embed_only:
        return
    extra = max(0, max(args.sizes) - len(pool))
    synth_cos = None
    if extra:
        n_real_pool = len(pool)
        pool = np.concatenate([pool, synthetic(pool, extra, seed=1, nn_cos=nn_cos)])
        # nearest neighbour of synthetic rows in the whole store (real + synthetic), as for real rows above
        idx = faiss.IndexFlatIP(pool.shape[1])
        idx.add(pool)
        sample = n_real_pool + np.random.default_rng(2).choice(extra, size=min(1000, extra), replace=False)
        synth_cos = float(np.median(idx.search(pool[sample], 2)[0][:, 1]))
        del idx
        print(f"# + {extra:,} synthetic rows (perturbed real rows); median nearest-neighbour cosine of a "
              f"synthetic row in the {len(pool):,}-row store {synth_cos:.3f}", flush=True)

    task = get_task("cb")
    student = Classifier.from_base(args.encoder, task, 128, num_layers=2)
    student.model.eval()
    cb = read_jsonl(args.mirror / "cb" / "validation.jsonl") + read_jsonl(args.mirror / "cb" / "train.jsonl")
    b1 = [[r] for r in cb[:32 if args.quick else 64]]
    b32 = [cb[i:i + 32] for i in range(0, 32 * (3 if args.quick else 6), 32)]
    rng = np.random.default_rng(0)

    rows = []
    for n in sorted(args.sizes):
        x = np.ascontiguousarray(pool[:n])
        soft = rng.dirichlet(np.ones(task.num_labels), size=n).astype(np.float32)
        ids = np.arange(n)
        exact = store.search(store.build_index(x, "flat"), queries, K)[1]
        for kind in args.kinds:
            gc.collect()
            t0 = time.perf_counter()
            index, built = build(kind, x, args)
            build_s = time.perf_counter() - t0
            sweep, chosen = [], None
            for knob in knobs(kind, index):
                set_knob(index, knob)
                rec = recall(store.search(index, queries, K)[1], exact)
                sweep.append({**knob, "recall@16": round(rec, 4)})
                if rec >= args.target_recall:
                    chosen = knob
                    break
            chosen = chosen if chosen is not None else knobs(kind, index)[-1]
            set_knob(index, chosen)
            rec = recall(store.search(index, queries, K)[1], exact)
            row = {"entries": n, "real_entries": min(n, len(emb) - args.queries), "kind": kind, "build": built,
                   "knob": chosen, "build_seconds": build_s, "index_bytes": index_bytes(index), "rss_mb": rss_mb(),
                   "recall@16": rec, "recall_ok": rec >= args.target_recall,
                   "search_p50_ms": search_p50_ms(index, queries[:200]), "sweep": sweep}

            def serve_plain(rs):
                return student.predict_proba(rs)

            def serve_retrieval(rs, index=index, ids=ids, soft=soft):
                return retrieval_proba(student.embed(rs), index, ids, soft, K, TAU)

            row["b1"] = ab(serve_plain, serve_retrieval, b1, args.reps, warmup=8)
            if not args.no_b32:
                row["b32"] = ab(serve_plain, serve_retrieval, b32, 1 if args.quick else 2, warmup=2)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sweep"} | {"sweep": sweep[-3:]}), flush=True)
            del index
    meta = {"threads": args.threads, "cpu": _cpu(), "torch": torch.__version__, "faiss": faiss.__version__,
            "mirror_texts": len(items), "real_texts": n_real, "queries": args.queries, "median_nn_cos": nn_cos,
            "synthetic_median_nn_cos": synth_cos, "seconds": time.perf_counter() - t_start}
    report(rows, meta, args)


def report(rows: list[dict], meta: dict, args) -> None:
    md = table(rows)
    print(md)
    print(f"# {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, faiss {meta['faiss']}; "
          f"{meta['seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(md + "\n")
    if args.plot:
        plot(rows, args.plot, f"retrieval student (L=2) vs plain forward — {meta['cpu']}, {meta['threads']} threads")


def _cpu() -> str:
    """The CPU's model name, with its family/model and whether it has AVX-512 bf16 and AMX."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return (f"{fields.get('model name', '?')} "
            f"(family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; "
            f"AVX-512 bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, AMX {'yes' if 'amx_tile' in flags else 'no'})")


if __name__ == "__main__":
    main()
