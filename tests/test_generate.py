"""`generate` stage: dedup / near-dup / leakage helpers (golden values), label drawing, and the stage
end to end in a temporary repository (controlled samples for exact counts; real tiny-model sampling
for determinism)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch

import retrikt.generate as gen_mod
from retrikt import paths
from retrikt.generate import GenerationError, dedupe, generate, jaccard, word_ngrams
from retrikt.io import read_json, read_jsonl, write_jsonl
from retrikt.llm import Samples, attach_prompt, draw_labels, label_prior, source_text, target_text
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
    bal = draw_labels(np.random.default_rng(0), 11, 3, "balanced", [0.9, 0.1, 0.0])
    assert Counter(bal) == {0: 4, 1: 4, 2: 3}  # remainder to the first labels
    assert bal == draw_labels(np.random.default_rng(0), 11, 3, "balanced", [0.9, 0.1, 0.0]) and bal != sorted(bal)
    prior = draw_labels(np.random.default_rng(1), 2000, 3, "prior", [0.7, 0.3, 0.0])
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
    "hello world, no fields here",                                     # 6 unfinished (cut by the budget)
    "premise: only a premise .",                                       # 7 missing_field
    _cb("it was a good film .", "the film was good ."),                # 8 kept
    _cb("the movie was great .", "the review is positive ."),          # 9 kept (ended at its last line)
    _cb("the dog sat .", "a dog is sitting .") + "</s>premise: junk",  # 10 kept (text after EOS ignored)
    _cb("a sample cut by the budget .", "it parses ."),                # 11 unfinished: never stored
    _cb("the bird sang .", "a bird made a sound .") + "\nlabel: 0",    # 12 extra_text after the last field
]
UNFINISHED, AT_LAST_LINE = (6, 11), (9,)


@pytest.fixture
def controlled_repo(tiny_causal_dir, tiny_encoder_dir, in_tmp_repo, monkeypatch):
    """A tmp repo with a tiny generator, prompt and teacher; sampling returns CONTROLLED in order
    (samples UNFINISHED flagged as cut off by max_new_tokens)."""
    lay_out_repo(tiny_causal_dir, tiny_encoder_dir)
    model, _ = load_generator(paths.base_model("generator"))
    attach_prompt(model, 2, "random", "", paths.base_model("generator")).save_pretrained(paths.prompt("cb"))
    calls: list[tuple[list[str], dict]] = []

    def fake_sample(model, tok, sources, **kw):
        calls.append((list(sources), kw))
        n = len(sources)
        ended = ["budget" if i in UNFINISHED else "lines" if i in AT_LAST_LINE else "eos" for i in range(n)]
        return Samples(CONTROLLED[:n], ended, tokens=10 * n)

    monkeypatch.setattr(gen_mod, "sample_full", fake_sample)
    return calls


def _run_generate(params, monkeypatch):
    with stage_run("generate", monkeypatch) as run:
        return generate(params, "cb", run), run


def test_generate_counts_dedupes_and_deleaks(controlled_repo, monkeypatch):
    params = make_params(generate={"num_samples": len(CONTROLLED), "near_dup_threshold": 0.5, "min_entries": 5})
    metrics, run = _run_generate(params, monkeypatch)
    ((sources, kw),) = controlled_repo
    assert kw["stop_lines"] == 2  # generate.end_at_last_line: CB examples have two lines
    assert kw["field_names"] == ("premise", "hypothesis") and metrics["field_names_forced"] == 1

    assert metrics["samples"] == 13 and metrics["complete_parsed"] == 9
    assert metrics["parse_rate"] == pytest.approx(9 / 13) and metrics["finished_rate"] == pytest.approx(11 / 13)
    assert metrics["eos_rate"] == pytest.approx(10 / 13) and metrics["cut_at_last_line"] == 1
    assert metrics["parse_failures"] == {"unfinished": 2, "missing_field": 1, "extra_text": 1, "unlocated_span": 0,
                                         "invalid": 0}
    assert (metrics["leaked_train"], metrics["leaked_validation"], metrics["leaked_removed"]) == (1, 1, 2)
    assert (metrics["exact_duplicates"], metrics["near_duplicates"]) == (1, 1)
    assert metrics["size"] == 5 and metrics["prompt"] == "prompt_tune" and metrics["teacher_filtered"] == 0
    assert sum(metrics["label_counts"].values()) == 5 and set(metrics["label_counts"]) == set(CB.labels)
    assert sum(metrics["teacher_label_counts"].values()) == 5
    assert 0.0 <= metrics["self_bleu"] <= 1.0 and 0.0 <= metrics["self_bleu_train"] <= 1.0
    assert metrics["self_bleu_rows"] == 5 and metrics["truncated_in_store"] == 0
    assert metrics["generated_tokens"] == 130 and set(run.timings) == {"generation_seconds", "tokens_per_second"}
    # max_new_tokens: auto, sized from the train rows and passed to the sampler
    assert metrics["max_new_tokens"] == kw["max_new_tokens"] > max(target_lengths_of(TRAIN))
    assert set(metrics["length_tokens"]) == {"p05", "median", "p95"} == set(metrics["length_tokens_train"])

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


def target_lengths_of(rows):
    from retrikt.llm import load_tokenizer, target_lengths

    return target_lengths(load_tokenizer(paths.base_model("generator")), CB, rows)


def test_generate_filter_by_teacher_and_rl_prompt(controlled_repo, monkeypatch):
    model, _ = load_generator(paths.base_model("generator"))
    attach_prompt(model, 2, "random", "", paths.base_model("generator")).save_pretrained(paths.rl("cb"))
    params = make_params(generate={"num_samples": 13, "near_dup_threshold": 0.5, "filter_by_teacher": True,
                                   "min_entries": 1})
    metrics, _ = _run_generate(params, monkeypatch)
    entries = read_jsonl(paths.store("cb") / "entries.jsonl")
    assert metrics["prompt"] == "rl"
    assert metrics["size"] + metrics["teacher_filtered"] == 5
    assert metrics["teacher_agreement"] == 1.0  # over the kept entries
    assert all(int(np.argmax(e["soft_label"])) == e["label"] for e in entries)

    off = make_params(generate={"num_samples": 13, "near_dup_threshold": 0.5, "min_entries": 1}, rl={"enabled": False})
    assert _run_generate(off, monkeypatch)[0]["prompt"] == "prompt_tune"


def test_generate_store_below_the_minimum_is_a_clear_error(controlled_repo, monkeypatch):
    def sample_full(model, tok, sources, **kw):
        return Samples(["garbage"] * len(sources), ["eos" if i > 1 else "budget" for i in range(len(sources))], 7)

    monkeypatch.setattr(gen_mod, "sample_full", sample_full)
    with pytest.raises(GenerationError, match=r"^generate: a store of 0 entries is below generate.min_entries \(2\): "
                                              r"0 of 7 samples complete and parsed, 2 unfinished at max_new_tokens "
                                              r"\d+, 0 copies of train/validation rows, 0 duplicates; raise "
                                              r"generate.num_samples or tune the prompt longer$"):
        _run_generate(make_params(generate={"num_samples": 7, "min_entries": 2}), monkeypatch)
    assert not (paths.store("cb") / "entries.jsonl").exists()


def test_generate_minimum_counts_the_clean_store(controlled_repo, monkeypatch):
    with pytest.raises(GenerationError, match="a store of 5 entries is below generate.min_entries \\(6\\)"):
        _run_generate(make_params(generate={"num_samples": 13, "near_dup_threshold": 0.5, "min_entries": 6}),
                      monkeypatch)


def test_oracle_store_is_real_spare_rows_without_their_labels(tiny_causal_dir, tiny_encoder_dir, in_tmp_repo,
                                                              monkeypatch):
    lay_out_repo(tiny_causal_dir, tiny_encoder_dir)
    spare = [{"premise": f"spare premise number {i} .", "hypothesis": f"spare hypothesis {i} .", "label": i % 3,
              "idx": 100 + i} for i in range(6)]
    spare.append({**TRAIN[0], "idx": 200})  # a copy of a training row: still de-leaked
    write_jsonl(paths.spare_file("cb"), spare)
    params = make_params(generate={"source": "oracle", "num_samples": 5, "min_entries": 1})
    metrics, run = _run_generate(params, monkeypatch)
    entries = read_jsonl(paths.store("cb") / "entries.jsonl")
    assert metrics["prompt"] == "oracle" and metrics["samples"] == 5 and run.timings == {}
    assert metrics["size"] + metrics["leaked_train"] == 5 and "teacher_agreement" not in metrics
    assert all(e["label"] is None and "idx" not in e for e in entries)
    spare_inputs = {(r["premise"], r["hypothesis"]) for r in spare}
    assert all((e["premise"], e["hypothesis"]) in spare_inputs for e in entries)
    write_jsonl(paths.spare_file("cb"), [])
    with pytest.raises(GenerationError, match="set data.train_limit"):
        _run_generate(params, monkeypatch)


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
    params = make_params(generate={"num_samples": 12, "batch_size": 5, "max_new_tokens": 40, "min_entries": 3,
                                   "dtype": "float32"})
    store = paths.store("cb") / "entries.jsonl"
    first, _ = _run_generate(params, monkeypatch)
    data = store.read_bytes()
    second, _ = _run_generate(params, monkeypatch)
    assert store.read_bytes() == data and first == second
    # the decode slots are an execution detail: another batch size writes the same store
    wide, _ = _run_generate(make_params(generate={**dataclasses.asdict(params.generate), "batch_size": 12}),
                            monkeypatch)
    assert store.read_bytes() == data and wide == first
    assert first["parse_rate"] > 0.5 and first["size"] >= 3
    assert [json.loads(line)["id"] for line in data.splitlines()] == list(range(first["size"]))
