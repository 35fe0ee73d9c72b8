"""`train_student`: every method learns a tiny keyword task; retrieval golden behaviour; determinism.

The data set is CB-shaped and learnable by a tiny encoder: the hypothesis contains a keyword that
fixes the label (yes/true -> 0, no/false -> 1, movie/film -> 2; all in conftest's CORPUS). The
teacher is a tiny 4-layer classifier trained on it first; students are its first 2 layers.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from retrikt import paths, store
from retrikt.classifier import Classifier, train_classifier
from retrikt.distill import losses
from retrikt.distill.objectives import adkd, mgskd, same_tokenization, teacher_candidates
from retrikt.distill.train import train_student
from retrikt.index import index as index_stage
from retrikt.io import read_json, read_jsonl, write_jsonl
from retrikt.methods import METHODS
from retrikt.params import Params, parse_params
from retrikt.retrieval import load_student
from retrikt.tasks import get_task
from retrikt.tracking import StageRun

from .conftest import REPO

TASK = "cb"
KEYWORDS = (("yes", "true"), ("no", "false"), ("movie", "film"))
FILLER = "the cat sat on mat dog fox quick brown lazy day ground rained sleeps jumps over".split()
STUDENT = dict(epochs=20, store_epochs=15, lr=1e-3, batch_size=8, max_length=32, retrieval_candidates=16,
               retrieval_top_k=4, retrieval_tau=0.1, dtype="float32")
TIMING_KEYS = ("train_seconds", "setup_seconds", "epoch_seconds", "latency_ms", "forward_latency_ms",
               "latency_ratio")


def keyword_rows(n: int, rng: random.Random) -> list[dict]:
    """``n`` CB-shaped rows, labels balanced, label given by a keyword of the hypothesis."""
    rows = []
    for i in range(n):
        label = i % 3
        premise = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3)))
        hypothesis = f"{rng.choice(FILLER)} {rng.choice(KEYWORDS[label])} {rng.choice(KEYWORDS[label])}"
        rows.append({"premise": premise, "hypothesis": hypothesis, "idx": i, "label": label})
    return rows


def make_tiny_repo(encoder_dir: Path, n_train: int = 60, n_val: int = 30, n_store: int = 24, **student) -> Params:
    """Lay out a repo in the cwd: data, base encoder, trained teacher, store, index.

    Returns the params; ``student`` overrides the tiny student settings.
    """
    import yaml

    rng = random.Random(0)
    train = keyword_rows(n_train, rng)
    write_jsonl(paths.split_file(TASK, "train"), train)
    write_jsonl(paths.split_file(TASK, "validation"), keyword_rows(n_val, rng))
    paths.base_model("encoder").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(encoder_dir, paths.base_model("encoder"))

    task = get_task(TASK)
    torch.manual_seed(0)
    teacher = Classifier.from_base(encoder_dir, task, max_length=32)
    train_classifier(teacher, train, train, epochs=20, lr=2e-3, batch_size=8, seed=0, weight_decay=0.01,
                     warmup_ratio=0.1)
    teacher.save(paths.teacher(TASK))

    entries = [{k: r[k] for k in ("premise", "hypothesis", "label")} for r in keyword_rows(n_store, rng)]
    soft = teacher.predict_proba(entries)
    write_jsonl(paths.store_entries(TASK), [
        {"id": i, **e, "soft_label": [float(p) for p in s / s.sum()], "text": ""}
        for i, (e, s) in enumerate(zip(entries, soft.astype(np.float64)))])

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["student"].update({**STUDENT, **student})
    params = parse_params(raw)
    with StageRun("index", metrics_path=paths.metrics(TASK, "index"), task=TASK) as run:
        index_stage(params, TASK, run)
    return params


def run_student(params, method: str, layers: int = 2, seed: int = 0) -> dict:
    name = f"{method}-L{layers}-s{seed}"
    with StageRun("train_student", metrics_path=paths.student_metrics(TASK, method, layers, seed), task=TASK,
                  plots={"student_curve": paths.plot(TASK, f"student_curve_{name}")}) as run:
        return train_student(params, TASK, run, method=method, layers=layers, seed=seed)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("student-repo")
    old, env, threads = os.getcwd(), os.environ.get("RETRIKT_MLFLOW"), torch.get_num_threads()
    os.chdir(root)
    os.environ["RETRIKT_MLFLOW"] = "0"
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    try:
        params = make_tiny_repo(tiny_encoder_dir)
        yield root, params
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("RETRIKT_MLFLOW", None)
        else:
            os.environ["RETRIKT_MLFLOW"] = env


@pytest.fixture
def repo(tiny_repo, monkeypatch):
    root, params = tiny_repo
    monkeypatch.chdir(root)
    monkeypatch.setenv("RETRIKT_MLFLOW", "0")
    return params


def test_teacher_learns_the_keyword_task(repo):
    proba = Classifier.load(paths.teacher(TASK)).predict_proba(
        [r for r in store.load_entries(TASK)])
    labels = [e["label"] for e in store.load_entries(TASK)]
    assert (proba.argmax(1) == np.array(labels)).mean() > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_every_method_beats_chance_and_writes_outputs(repo, method):
    m = run_student(repo, method)
    assert m["accuracy"] > 0.6, m  # chance is 1/3
    assert {"accuracy", "macro_f1", "parameters", "model_bytes", "store_bytes", *TIMING_KEYS} <= set(m)
    assert (m["store_bytes"] > 0) == (method in ("retrikt", "retrikt_kd"))
    folder = paths.student(TASK, method, 2, 0)
    assert read_json(folder / "retrikt_classifier.json")["method"] == method
    assert (folder / paths.STORE_SUBDIR / paths.INDEX_FILE).exists() if method == "retrikt" else True
    preds = read_json(paths.predictions(TASK, f"{method}-L2-s0"))
    assert len(preds["proba"]) == 30 and np.allclose(np.sum(preds["proba"], 1), 1, atol=1e-4)
    curve = read_json(paths.plot(TASK, f"student_curve_{method}-L2-s0"))
    epochs = repo.student.store_epochs if method in ("retrikt", "retrikt_kd") else repo.student.epochs
    assert [r["epoch"] for r in curve] == list(range(1, epochs + 1))  # store methods: student.store_epochs
    assert {"train_loss", "val_accuracy"} <= set(curve[0])
    assert read_json(paths.student_metrics(TASK, method, 2, 0))["accuracy"] == m["accuracy"]


def test_candidates_are_the_reward_models_top_k():
    rng = np.random.default_rng(0)
    entries = rng.normal(size=(40, 16)).astype(np.float32)
    entries /= np.linalg.norm(entries, axis=1, keepdims=True)
    queries = np.concatenate([entries[:3], rng.normal(size=(2, 16)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cand = teacher_candidates(queries, entries, 6, exclude=[{0}, {1}, {2}, set(), set()])
    for q, row, ex in zip(queries, cand, [{0}, {1}, {2}, set(), set()]):
        ranked = [i for i in np.argsort(-(entries @ q), kind="stable") if i not in ex]
        assert row.tolist() == ranked[:6]
    assert 0 not in cand[0] and 1 not in cand[1]


def test_retrikt_inference_is_the_aggregate_over_the_student_top_k(repo):
    if not paths.student(TASK, "retrikt", 2, 0).exists():
        run_student(repo, "retrikt")
    student = load_student(paths.student(TASK, "retrikt", 2, 0))
    rows = [{k: r[k] for k in ("premise", "hypothesis")} for r in keyword_rows(5, random.Random(7))]
    proba, sims, hits = student.proba(rows)
    q = student.clf.embed(rows)
    e = student.clf.embed(student.entries)
    k, tau = repo.student.retrieval_top_k, repo.student.retrieval_tau
    top = np.argsort(-(q @ e.T), axis=1, kind="stable")[:, :k]
    assert hits.tolist() == top.tolist()
    want = losses.retrieval_aggregate(torch.from_numpy(np.take_along_axis(q @ e.T, top, 1)),
                                 torch.from_numpy(student.soft[top]), tau).numpy()
    assert np.allclose(proba, want, atol=1e-5)
    pred = read_json(paths.predictions(TASK, "retrikt-L2-s0"))
    assert np.isclose(read_json(paths.student_metrics(TASK, "retrikt", 2, 0))["accuracy"],
                      np.mean(np.array(pred["pred"]) == np.array(pred["label"])))


def test_retrikt_with_the_extra_ce_term(repo):
    import dataclasses

    params = dataclasses.replace(repo, student=dataclasses.replace(repo.student, retrieval_ce_weight=0.5))
    assert run_student(params, "retrikt", seed=1)["accuracy"] > 0.6


@pytest.mark.parametrize("queries,grad", [("train", True), ("train", False), ("train+store", True),
                                           ("train+store", False)])
def test_retrieval_queries_and_candidate_side(repo, queries, grad):
    """Store entries as extra queries never see themselves among their candidates; the candidate side is
    the student's own (fresh with gradient, or the epoch's cached embeddings); every variant learns."""
    import dataclasses

    from retrikt.distill.objectives import Retrieval

    sp = dataclasses.replace(repo.student, retrieval_queries=queries, retrieval_candidate_grad=grad)
    params = dataclasses.replace(repo, student=sp)
    task = get_task(TASK)
    train, entries = read_jsonl(paths.split_file(TASK, "train")), store.load_entries(TASK)
    student = Classifier.from_base(paths.base_model("encoder"), task, sp.max_length, num_layers=2)
    r = Retrieval(student, Classifier.load(paths.teacher(TASK)), train, entries, params)
    n_store = len(entries) if queries == "train+store" else 0
    assert len(r.queries) == r.objective().n_items == len(train) + n_store
    assert r.candidates.shape == (len(r.queries), sp.retrieval_candidates)
    for j in range(n_store):
        assert j not in r.candidates[len(train) + j]
    loss = r.loss([0, 1, 2, len(r.queries) - 2, len(r.queries) - 1])  # train rows and (if any) store queries
    loss.backward()
    grads = [p.grad for p in student.model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and (r.entry_emb is None) == grad
    if not grad:  # the epoch's index pass refreshes the candidate side
        before = r.entry_emb.clone()
        with torch.no_grad():
            next(student.model.parameters()).add_(0.01)
        r.predict(read_jsonl(paths.split_file(TASK, "validation"))[:3])
        assert not torch.equal(before, r.entry_emb)
    assert run_student(params, "retrikt", seed=11)["accuracy"] > 0.6


def test_two_entry_store_with_store_queries_trains_on_the_train_rows(repo):
    """train+store queries need >= 3 entries (an entry is never its own candidate); with 2 the entries
    are not queries (was: 'needs at least 2 candidate store entries per query, got 1')."""
    from retrikt.distill.objectives import Retrieval

    params = dataclasses.replace(repo, student=dataclasses.replace(repo.student, retrieval_queries="train+store",
                                                                    retrieval_candidates=2, retrieval_top_k=2))
    task = get_task(TASK)
    train, entries = read_jsonl(paths.split_file(TASK, "train")), store.load_entries(TASK)
    student = Classifier.from_base(paths.base_model("encoder"), task, 32, num_layers=2)
    teacher = Classifier.load(paths.teacher(TASK))
    with pytest.MonkeyPatch.context() as mp:
        from retrikt.distill import objectives

        mp.setattr(objectives, "_reward_model_entry_embeddings", lambda _task, n: teacher.embed(entries[:n]))
        r = Retrieval(student, teacher, train, entries[:2], params)
        assert len(r.queries) == len(train) and r.candidates.shape == (len(train), 2)
        assert torch.isfinite(r.loss([0, 1, 2]))
        assert len(Retrieval(student, teacher, train, entries[:3], params).queries) == len(train) + 3


def test_retrieval_negatives_are_random_entries_masked_where_they_clash(repo):
    """Each step adds R uniform store entries to a query's top-K; one that is already a candidate, the
    query itself or an identical entry is masked out of both distributions; the draws are seeded."""
    import dataclasses

    from retrikt.distill.objectives import Retrieval

    sp = dataclasses.replace(repo.student, retrieval_queries="train+store", retrieval_negatives=40)
    params = dataclasses.replace(repo, student=sp)
    task = get_task(TASK)
    train, entries = read_jsonl(paths.split_file(TASK, "train")), store.load_entries(TASK)
    teacher = Classifier.load(paths.teacher(TASK))

    def build(seed):
        torch.manual_seed(seed)
        student = Classifier.from_base(paths.base_model("encoder"), task, sp.max_length, num_layers=2)
        return student, Retrieval(student, teacher, train, entries, params)

    student, r = build(0)
    idx = [0, 1, len(train), len(r.queries) - 1]  # two train rows, two store entries as queries
    cand, mask = r._draw_negatives(idx, r.candidates[idx])
    k = sp.retrieval_candidates
    assert cand.shape == mask.shape == (len(idx), k + 40) and mask[:, :k].all()
    for row, q in enumerate(idx):
        top = set(cand[row, :k].tolist())
        own = {q - len(train)} if q >= len(train) else set()
        for j in range(k, k + 40):
            clash = int(cand[row, j]) in top or int(cand[row, j]) in own
            assert bool(mask[row, j]) == (not clash)
    assert (~mask).any()  # a small store: some draws clash
    _, r2 = build(0)
    assert np.array_equal(r2._draw_negatives(idx, r2.candidates[idx])[0], cand)  # same seed, same draws
    _, r3 = build(1)
    assert not np.array_equal(r3._draw_negatives(idx, r3.candidates[idx])[0], cand)
    loss = r.loss(idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in student.model.parameters()
                                        if p.grad is not None)


@pytest.mark.parametrize("method", ["retrikt", "adkd"])
def test_same_seed_same_metrics(repo, method):
    a, b = run_student(repo, method, seed=3), run_student(repo, method, seed=3)
    drop = lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}  # noqa: E731
    assert drop(a) == drop(b)


def test_bf16_trained_retrieval_student_saves_a_float32_index(repo):
    """Trained under bf16 autocast, the last epoch's index holds bf16-rounded embeddings; serving
    (`retrikt predict`, load_student) embeds queries in float32, so the saved index must be the
    float32 embedding of every entry by the saved student, and the reported metric must be its."""
    params = dataclasses.replace(repo, student=dataclasses.replace(repo.student, dtype="bfloat16", store_epochs=1))
    m = run_student(params, "retrikt", seed=5)
    s = load_student(paths.student(TASK, "retrikt", 2, 5))
    entries = read_jsonl(paths.store_entries(TASK))
    saved = s.index.reconstruct_n(0, s.index.ntotal)
    fp32 = s.clf.embed(entries)
    np.testing.assert_allclose(saved, fp32, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.abs(s.clf.embed(entries) - fp32).max() > 1e-5  # bf16 would have shown (10x the tolerance)
    val = read_jsonl(paths.split_file(TASK, "validation"))
    pred = s.proba(val)[0].argmax(1).tolist()
    assert get_task(TASK).compute_metrics([r["label"] for r in val], pred)["accuracy"] == m["accuracy"]


def test_stale_index_is_refused(repo, tmp_path):
    entries = paths.store_entries(TASK)
    original = entries.read_bytes()
    try:
        entries.write_bytes(original.replace(b'"text": ""', b'"text": "x"'))
        with pytest.raises(Exception, match="re-run `retrikt index cb`"):
            run_student(repo, "retrikt", seed=9)
    finally:
        entries.write_bytes(original)


def test_same_tokenization_tells_teachers_apart(tiny_encoder_dir, tiny_causal_dir):
    """mgskd / adkd read the student's ids in the teacher only when both tokenize alike; another teacher
    goes through retrikt.distill.align (tests/test_align.py)."""
    task = get_task(TASK)
    student = Classifier.from_base(tiny_encoder_dir, task, max_length=32, num_layers=2)
    other = Classifier.from_base(tiny_causal_dir, task, max_length=32)
    rows = keyword_rows(4, random.Random(0))
    assert same_tokenization(student, Classifier.from_base(tiny_encoder_dir, task, max_length=32), rows)
    assert not same_tokenization(student, other, rows)


def test_cached_teacher_passes_equal_live_ones(repo):
    """mgskd / adkd compute the teacher side once per example; the loss equals the live computation."""
    task, sp = get_task(TASK), repo.student
    teacher = Classifier.load(paths.teacher(TASK))
    teacher.model.requires_grad_(False)
    student = Classifier.from_base(paths.base_model("encoder"), task, max_length=32, num_layers=2)
    student.model.eval()  # no dropout: both sides deterministic
    rows = keyword_rows(12, random.Random(5))
    idx = [7, 2, 11, 0, 5]  # a batch padded differently from the cached chunk
    batch = [rows[i] for i in idx]
    y = torch.tensor([r["label"] for r in batch])

    s_out, enc = student.forward(batch, hidden=True)
    with torch.no_grad():
        t_out = teacher.model(**enc, output_hidden_states=True)
    heads = 32  # gcd(64, 32, 32)
    want = (losses.kd_ce_loss(s_out.logits, t_out.logits, y, sp.kd_alpha, sp.kd_temperature).total
            + losses.mgskd_loss(s_out.hidden_states, t_out.hidden_states, enc["attention_mask"], n_heads=heads,
                           w_sample=sp.mgskd_sample_weight, w_token=sp.mgskd_token_weight).total)
    assert torch.isclose(mgskd(student, teacher, rows, None, repo).loss(idx), want, rtol=1e-4, atol=1e-5)

    objective = adkd(student, teacher, rows, None, repo)
    got = objective.loss(idx)
    seen = {}

    def leaf(_m, _i, out):
        seen["t"] = out.detach().requires_grad_()
        return seen["t"]

    hooks = [teacher.model.bert.embeddings.register_forward_hook(leaf),
             student.model.bert.embeddings.register_forward_hook(lambda _m, _i, out: seen.__setitem__("s", out))]
    mask = enc["attention_mask"]
    with torch.enable_grad():
        t_logits = teacher.model(**enc).logits
    a_t = losses.attribution(t_logits, seen["t"], mask, top_k=sp.adkd_top_k)  # C = 3: one view per class
    s_logits = student.model(**enc).logits
    a_s = losses.attribution(s_logits, seen["s"], mask, create_graph=True)
    for h in hooks:
        h.remove()
    want = losses.adkd_loss(s_logits, t_logits.detach(), y, a_s, a_t, mask, alpha=sp.kd_alpha,
                       temperature=sp.kd_temperature, beta=sp.adkd_beta).total
    assert torch.isclose(got, want, rtol=1e-4, atol=1e-5)
    assert student.model.bert.embeddings._forward_hooks  # the objective reads the student's embeddings ...
    objective.release()  # ... until training is over
    assert not student.model.bert.embeddings._forward_hooks and not teacher.model.bert.embeddings._forward_hooks
