"""`generate` stage: dedup / near-dup / leakage helpers (golden values), label drawing, and the stage
end to end in a temporary repository (controlled samples for exact counts; real tiny-model sampling
for determinism)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

import retrikt.generate as gen_mod
from retrikt import paths
from retrikt.generate import GenerationError, dedupe, draw_labels, generate, jaccard, label_prior, word_ngrams
from retrikt.generator import Samples, attach_prompt, source_text, target_text
from retrikt.io import read_json, read_jsonl
from retrikt.models import load_generator
from retrikt.tasks import get_task

from .conftest import fit_tiny_generator
from .test_prompt_tune import TRAIN, VALIDATION, lay_out_repo, make_params, stage_run

CB = get_task("cb")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash


# ------------------------------------------------------------------------------ helpers
def test_word_trigram_jaccard_golden():
    a, b = word_ngrams("the cat sat on the mat"), word_ngrams("The cat  sat on a mat")
    assert a == {("the", "cat", "sat"), ("cat", "sat", "on"), ("sat", "on", "the"), ("on", "the", "mat")}
    assert jaccard(a, b) == pytest.approx(2 / 6)  # shared: "the cat sat", "cat sat on"
    assert jaccard(a, a) == 1.0 and jaccard(set(), set()) == 0.0
    assert word_ngrams("two words") == {("two", "words")}


def test_dedupe_exact_near_and_keeps_first():
    long = "premise: the quick brown fox jumps over the lazy dog and then the dog sleeps all day"
    texts = [
        long,                                   # 0 kept
        "  PREMISE: the quick brown fox jumps over the lazy dog and then the dog sleeps all day ",  # exact
        long.replace("all day", "all night"),   # near: 14 of 16 distinct 3-grams shared
        "premise: it rained all day",           # kept
        "premise: it rained all day",           # exact
        "something completely different here",  # kept
    ]
    sim = jaccard(word_ngrams(texts[0]), word_ngrams(texts[2]))
    assert sim == pytest.approx(14 / 16)
    assert dedupe(texts, threshold=0.8) == ([0, 3, 5], 2, 1)
    assert dedupe(texts, threshold=0.9) == ([0, 2, 3, 5], 2, 0)  # below the threshold: kept
    assert dedupe([], 0.9) == ([], 0, 0)


def test_draw_labels_balanced_and_prior():
    bal = draw_labels(11, 3, True, [0.9, 0.1, 0.0], seed=0)
    assert Counter(bal) == {0: 4, 1: 4, 2: 3}  # remainder to the first labels
    assert bal == draw_labels(11, 3, True, [0.9, 0.1, 0.0], seed=0) and bal != sorted(bal)
    prior = draw_labels(2000, 3, False, [0.7, 0.3, 0.0], seed=1)
    counts = Counter(prior)
    assert counts[2] == 0 and abs(counts[0] / 2000 - 0.7) < 0.04
    assert label_prior([{"label": 0}, {"label": 0}, {"label": 2}, {"label": 0}], 3) == [0.75, 0.0, 0.25]


# ------------------------------------------------------------------------------ stage, controlled samples
def _cb(premise: str, hypothesis: str) -> str:
    return f"premise: {premise}\nhypothesis: {hypothesis}"


NEW_A = _cb("the cat sat on the mat all day long .", "the cat is tired .")
NEW_B = _cb("the quick brown fox jumps over the lazy dog , and the dog sleeps all day .", "the dog is asleep .")
CONTROLLED = [
    NEW_A,                                                             # 0 kept
    NEW_B,                                                             # 1 kept
    NEW_A.upper().replace("\n", "  \n "),                              # 2 exact duplicate of 0
    NEW_B.replace("asleep", "sleeping"),                               # 3 near duplicate of 1
    target_text(CB, TRAIN[2]),                                         # 4 copy of a train row
    "premise:   the cat sat all day .\nhypothesis: A cat is sitting .",  # 5 copy of a validation row
    "hello world, no fields here",                                     # 6 unparsable
    "premise: only a premise .",                                       # 7 unparsable (no hypothesis)
    _cb("it was a good film .", "the film was good ."),                # 8 kept
    _cb("the movie was great .", "the review is positive ."),          # 9 kept
    _cb("the dog sat .", "a dog is sitting .") + "</s>premise: junk",  # 10 kept (text after EOS ignored)
    "",                                                                # 11 unparsable
]


@pytest.fixture
def controlled_repo(tiny_causal_dir, tiny_encoder_dir, in_tmp_repo, monkeypatch):
    """A tmp repo with a tiny generator, prompt and teacher; sampling returns CONTROLLED in order
    (samples 1 and 6 flagged as cut off by max_new_tokens)."""
    lay_out_repo(tiny_causal_dir, tiny_encoder_dir)
    model, _ = load_generator(paths.base_model("generator"))
    attach_prompt(model, 2, "random", "", paths.base_model("generator")).save_pretrained(paths.prompt("cb"))
    calls: list[list[str]] = []

    def fake_sample(model, tok, sources, **kw):
        calls.append(list(sources))
        n = len(sources)
        return Samples(CONTROLLED[:n], [i not in (1, 6) for i in range(n)], tokens=10 * n)

    monkeypatch.setattr(gen_mod, "sample_full", fake_sample)
    return calls


def _run_generate(params, monkeypatch):
    with stage_run("generate", monkeypatch) as run:
        return generate(params, "cb", run), run


def test_generate_counts_dedupes_and_deleaks(controlled_repo, monkeypatch):
    params = make_params(generate={"num_samples": len(CONTROLLED), "near_dup_threshold": 0.5})
    metrics, run = _run_generate(params, monkeypatch)
    (sources,) = controlled_repo

    assert metrics["samples"] == 12 and metrics["parsed"] == 9 and metrics["parse_rate"] == pytest.approx(9 / 12)
    assert (metrics["leaked_train"], metrics["leaked_validation"], metrics["leaked_removed"]) == (1, 1, 2)
    assert (metrics["exact_duplicates"], metrics["near_duplicates"]) == (1, 1)
    assert metrics["exact_duplicate_rate"] == pytest.approx(1 / 9)
    assert metrics["size"] == 5 and metrics["prompt"] == "prompt_tune" and metrics["teacher_filtered"] == 0
    assert sum(metrics["label_counts"].values()) == 5 and set(metrics["label_counts"]) == set(CB.labels)
    assert 0.0 <= metrics["self_bleu"] <= 1.0 and metrics["self_bleu_entries"] == 5
    assert metrics["truncated_rate"] == pytest.approx(2 / 12) and metrics["truncated_in_store"] == 1
    assert metrics["generated_tokens"] == 120 and set(run.timings) == {"generation_seconds", "tokens_per_second"}

    entries = read_jsonl(paths.store("cb") / "entries.jsonl")
    assert [e["id"] for e in entries] == list(range(5))
    assert [e["text"] for e in entries] == [CONTROLLED[i] for i in (0, 1, 8, 9, 10)]
    assert entries[4]["hypothesis"] == "a dog is sitting ."
    for e, i in zip(entries, (0, 1, 8, 9, 10)):
        assert set(e) == {"id", "premise", "hypothesis", "label", "soft_label", "text"}
        assert sources[i] == source_text(CB, e["label"])  # the label the sample was conditioned on
        assert len(e["soft_label"]) == 3 and sum(e["soft_label"]) == pytest.approx(1.0, abs=1e-4)
    known = {" ".join(target_text(CB, r).lower().split()) for r in TRAIN + VALIDATION}
    assert not known & {" ".join(target_text(CB, e).lower().split()) for e in entries}
    assert Counter(e["label"] for e in entries) == Counter(
        {CB.labels.index(k): v for k, v in metrics["label_counts"].items() if v})

    assert read_json(paths.store("cb") / "stats.json") == metrics == read_json(paths.metrics("cb", "generate"))
    preview = (paths.store("cb") / "preview.md").read_text()
    assert "the cat sat on the mat all day long" in preview


def test_generate_filter_by_teacher_and_ppo_prompt(controlled_repo, monkeypatch):
    model, _ = load_generator(paths.base_model("generator"))
    attach_prompt(model, 2, "random", "", paths.base_model("generator")).save_pretrained(paths.ppo("cb"))
    params = make_params(generate={"num_samples": 12, "near_dup_threshold": 0.5, "filter_by_teacher": True})
    metrics, _ = _run_generate(params, monkeypatch)
    entries = read_jsonl(paths.store("cb") / "entries.jsonl")
    assert metrics["prompt"] == "ppo"
    assert metrics["size"] + metrics["teacher_filtered"] == 5
    assert metrics["teacher_agreement"] == pytest.approx(metrics["size"] / 5)
    assert all(int(np.argmax(e["soft_label"])) == e["label"] for e in entries)

    off = make_params(generate={"num_samples": 12, "near_dup_threshold": 0.5}, rl={"enabled": False})
    assert _run_generate(off, monkeypatch)[0]["prompt"] == "prompt_tune"


def test_generate_empty_store_is_a_clear_error(controlled_repo, monkeypatch):
    monkeypatch.setattr(gen_mod, "sample_full",
                        lambda model, tok, sources, **kw: Samples(["garbage"] * len(sources), [True] * len(sources), 7))
    with pytest.raises(GenerationError, match=r"^generate: 0 of 7 samples survived parsing/dedup \(0 parsed, 0 copies of "
                                              r"train/validation rows\); raise "
                                              r"generate.num_samples or train the prompt longer$"):
        _run_generate(make_params(generate={"num_samples": 7}), monkeypatch)
    assert not (paths.store("cb") / "entries.jsonl").exists()


def test_generate_without_a_prompt_says_which_stage(tiny_causal_dir, in_tmp_repo, monkeypatch):
    lay_out_repo(tiny_causal_dir)
    with pytest.raises(FileNotFoundError, match="run the prompt_tune stage first"):
        _run_generate(make_params(generate={"num_samples": 3}), monkeypatch)


# ------------------------------------------------------------------------------ stage, real tiny sampling
GEN_ROWS = [  # what the tiny generator is fitted to write: two examples per label, none in the splits
    {"premise": "the cat sat on the mat .", "hypothesis": "the dog sleeps .", "label": 0},
    {"premise": "the dog sat on the mat .", "hypothesis": "a dog is sitting .", "label": 0},
    {"premise": "it rained all day .", "hypothesis": "the ground is dry .", "label": 1},
    {"premise": "it was a great film .", "hypothesis": "the film was terrible .", "label": 1},
    {"premise": "the fox jumps over the lazy dog .", "hypothesis": "a cat is sitting .", "label": 2},
    {"premise": "the quick brown fox jumps .", "hypothesis": "the fox is lazy .", "label": 2},
]


@pytest.fixture(scope="module")
def fitted_generator(tiny_causal_dir, tmp_path_factory):
    """The tiny causal LM fitted (all weights, a few seconds) to write GEN_ROWS, so samples parse."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the autouse fixture runs
    out = fit_tiny_generator(tiny_causal_dir, CB, GEN_ROWS, tmp_path_factory.mktemp("fitted-generator"), 96, 100)
    torch.set_num_threads(threads)
    return out


def test_generate_is_deterministic_with_real_sampling(fitted_generator, tiny_encoder_dir, in_tmp_repo,
                                                      monkeypatch):
    lay_out_repo(fitted_generator, tiny_encoder_dir)
    model, _ = load_generator(paths.base_model("generator"))
    attach_prompt(model, 2, "text", "the", paths.base_model("generator")).save_pretrained(paths.prompt("cb"))
    params = make_params(generate={"num_samples": 12, "batch_size": 5, "max_new_tokens": 40})
    store = paths.store("cb") / "entries.jsonl"
    first, _ = _run_generate(params, monkeypatch)
    data = store.read_bytes()
    second, _ = _run_generate(params, monkeypatch)
    assert store.read_bytes() == data and first == second
    assert first["parse_rate"] > 0.5 and first["size"] >= 3
    assert [json.loads(line)["id"] for line in data.splitlines()] == list(range(first["size"]))
