"""Store entries and FAISS indexes: build / save / load / search for every kind; the `index` stage."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from retrikt import paths, store
from retrikt.classifier import Classifier
from retrikt.index import index as index_stage
from retrikt.io import DataError, read_json, read_jsonl, write_jsonl
from retrikt.models import sha256_file
from retrikt.tasks import get_task
from retrikt.tracking import StageRun


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", store.INDEX_KINDS)
def test_build_save_load_search(kind, tmp_path):
    x = unit_vectors(300)
    ids = list(range(1000, 1300))
    index = store.build_index(x, kind, nlist=16, hnsw_m=8, seed=0)
    assert index.ntotal == 300 and index.d == 16
    store.save_index(tmp_path / "ix", index, ids, {"model": "m"}, embeddings=x)
    loaded, got_ids, meta = store.load_index(tmp_path / "ix")
    assert got_ids.tolist() == ids
    assert meta["kind"] == kind and meta["count"] == 300 and meta["dim"] == 16 and meta["model"] == "m"
    assert np.array_equal(store.load_embeddings(tmp_path / "ix"), x)
    scores, hits = store.search(loaded, x[:20], 5, got_ids)
    assert scores.shape == hits.shape == (20, 5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    found_self = np.mean(hits[:, 0] == np.arange(1000, 1020))
    assert found_self == 1.0 if kind == "flat" else found_self >= 0.9
    if kind == "flat":
        assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
        exact = np.argsort(-(x[:20] @ x.T), axis=1, kind="stable")[:, :5] + 1000
        assert np.array_equal(hits, exact)


def test_ivf_clips_nlist_and_is_deterministic():
    x = unit_vectors(100)
    a, b = (store.build_index(x, "ivf", nlist=64, seed=3) for _ in range(2))
    assert a.nlist == 100 // store.MIN_POINTS_PER_CENTROID
    assert np.array_equal(store.search(a, x, 10)[1], store.search(b, x, 10)[1])


def test_hnsw_is_deterministic():
    x = unit_vectors(500)
    a, b = (store.build_index(x, "hnsw", hnsw_m=8) for _ in range(2))
    assert np.array_equal(store.search(a, x, 10)[1], store.search(b, x, 10)[1])


def test_search_clips_k_and_rejects_bad_input():
    x = unit_vectors(4)
    scores, hits = store.search(store.build_index(x), x[:1], 10)
    assert hits.shape == (1, 4) and sorted(hits[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="L2-normalised"):
        store.build_index(x * 2)
    with pytest.raises(ValueError, match="unknown index kind"):
        store.build_index(x, "lsh")


def test_save_is_atomic(tmp_path, monkeypatch):
    import faiss

    x = unit_vectors(10)
    store.save_index(tmp_path / "ix", store.build_index(x), list(range(10)), {"v": 1})

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError):
        store.save_index(tmp_path / "ix", store.build_index(x[:5]), list(range(5)), {"v": 2})
    _, ids, meta = store.load_index(tmp_path / "ix")  # the previous folder is intact
    assert meta["v"] == 1 and len(ids) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]  # no temporary leftovers
    with pytest.raises(ValueError, match="ids"):
        store.save_index(tmp_path / "other", store.build_index(x), [1, 2], {})


def _entry(i: int, label: int, soft: list[float]) -> dict:
    return {"id": i, "premise": f"the cat sat on the mat {i}", "hypothesis": "a cat is sitting .",
            "label": label, "soft_label": soft, "text": ""}


def test_load_entries_checks_ids_and_soft_labels(in_tmp_repo):
    write_jsonl(paths.store_entries("cb"), [_entry(0, 0, [0.8, 0.1, 0.1]), _entry(1, 1, [0.1, 0.8, 0.1])])
    entries = store.load_entries("cb")
    assert np.allclose(store.soft_labels(entries), [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    write_jsonl(paths.store_entries("cb"), [_entry(1, 0, [0.8, 0.1, 0.1])])
    with pytest.raises(DataError, match="expected id 0"):
        store.load_entries("cb")
    write_jsonl(paths.store_entries("cb"), [_entry(0, 0, [0.5, 0.5])])
    with pytest.raises(DataError, match="3 probabilities"):
        store.load_entries("cb")
    os.remove(paths.store_entries("cb"))
    with pytest.raises(FileNotFoundError, match="generate"):
        store.load_entries("cb")


def test_index_stage(in_tmp_repo, tiny_encoder_dir, monkeypatch, params_for_index):
    monkeypatch.setenv("RETRIKT_MLFLOW", "0")
    Classifier.from_base(tiny_encoder_dir, get_task("cb"), max_length=32).save(paths.teacher("cb"))
    entries = [_entry(i, i % 3, [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]][i % 3]) for i in range(9)]
    write_jsonl(paths.store_entries("cb"), entries)
    write_jsonl(paths.split_file("cb", "validation"), [{**_entry(0, 0, []), "idx": 0}, {**_entry(1, 1, []), "idx": 1}])
    with StageRun("index", metrics_path=paths.metrics("cb", "index"), task="cb") as run:
        metrics = index_stage(params_for_index, "cb", run)
    folder = paths.index("cb")
    index, ids, meta = store.load_index(folder)
    assert ids.tolist() == list(range(9)) and index.ntotal == 9
    assert meta["model_sha256"] == sha256_file(paths.teacher("cb") / "model.safetensors")
    assert meta["entries_sha256"] == sha256_file(paths.store_entries("cb"))
    emb = store.load_embeddings(folder)
    assert emb.shape == (9, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.allclose(emb, Classifier.load(paths.teacher("cb")).embed(entries), atol=1e-5)
    assert metrics["entries"] == 9 and metrics["dim"] == 32 and metrics["index_bytes"] > 0
    assert metrics["query_ms"] >= 0 and metrics["build_seconds"] >= 0
    # the reward model as the retriever, recomputed here in numpy: top-k by cosine, softmax(s/tau)-weighted soft labels
    sp, val = params_for_index.student, read_jsonl(paths.split_file("cb", "validation"))
    sims = Classifier.load(paths.teacher("cb")).embed(val) @ emb.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :sp.retrieval_top_k]
    w = np.exp(np.take_along_axis(sims, top, 1) / sp.retrieval_tau)
    proba = np.einsum("qk,qkc->qc", w / w.sum(1, keepdims=True), store.soft_labels(entries)[top])
    want = float(np.mean(proba.argmax(1) == np.array([r["label"] for r in val])))
    assert math.isclose(metrics["rm_retrieval"]["accuracy"], want)
    assert read_json(paths.metrics("cb", "index")) == {k: metrics[k] for k in ("entries", "dim", "index_bytes",
                                                                                "rm_retrieval")}


@pytest.fixture
def params_for_index():
    import yaml

    from retrikt.params import parse_params

    from .conftest import REPO

    return parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
