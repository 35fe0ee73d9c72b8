"""Tests for the task registry (retrikt.tasks): registry, serialise/parse round trips, metrics."""

from __future__ import annotations

import json
import os
import re
from itertools import islice
from pathlib import Path

import pytest

from retrikt.tasks import TASKS, Task, get_task, normalise_ws

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ALL = ("cb", "copa", "rte", "mrpc", "cola", "sst2", "wsc", "boolq", "wic", "superglue_rte")
MIRRORED = ("cb", "copa", "rte", "superglue_rte", "mrpc", "cola", "sst2", "wsc")
TRAIN_ROWS = 300


def data_dir() -> Path:
    env = os.environ.get("RETRIKT_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/glue"


def read_rows(path: Path, limit: int | None = None) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, limit) if line.strip()]


def expected_inputs(task: Task, ex: dict) -> dict:
    return {f: normalise_ws(ex[f]) if isinstance(ex[f], str) else ex[f] for f in task.input_fields}


def round_trip_failures(task: Task, rows: list[dict]) -> list[int]:
    bad = []
    for ex in rows:
        task.validate(ex)
        text = task.serialise(ex)
        assert all(re.match(r"^[a-z0-9_]+: \S", line) for line in text.split("\n"))  # "field: value" lines
        if task.parse(text) != expected_inputs(task, ex):
            bad.append(ex["idx"])
    return bad


# -- registry -----------------------------------------------------------------------------------
def test_registry_complete_and_consistent():
    assert set(TASKS) == set(ALL)
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
        assert task.num_labels == len(task.labels) >= 2
        assert task.input_fields == task.text_fields + task.extra_fields
        assert task.hf_path in ("glue", "super_glue")
    assert TASKS["cb"].labels == ("entailment", "contradiction", "neutral")
    assert TASKS["superglue_rte"].hf_config == "rte" and TASKS["superglue_rte"].mirror_dir == "superglue_rte"
    primary = {n: t.metrics[0] for n, t in TASKS.items()}
    assert primary["cb"] == "accuracy" and TASKS["cb"].metrics == ("accuracy", "macro_f1")
    assert primary["mrpc"] == "f1" and primary["cola"] == "mcc" and primary["sst2"] == "accuracy"


def test_get_task_unknown_lists_known():
    with pytest.raises(KeyError) as err:
        get_task("foo")
    assert err.value.args[0] == "unknown task 'foo'; known tasks: " + ", ".join(sorted(ALL))


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MIRRORED)
def test_round_trip_mirror(name):
    folder = data_dir() / TASKS[name].mirror_dir
    if not (folder / "validation.jsonl").exists():
        pytest.skip(f"GLUE mirror not found at {folder}")
    val = read_rows(folder / "validation.jsonl")
    train = read_rows(folder / "train.jsonl", TRAIN_ROWS)
    assert len(val) > 50 and len(train) >= 250
    task = get_task(name)
    assert round_trip_failures(task, val) == []
    assert round_trip_failures(task, train) == []


@pytest.mark.parametrize("name", ["boolq", "wic"])
def test_round_trip_fixtures(name):
    rows = read_rows(FIXTURES / f"{name}.jsonl")
    assert len(rows) >= 8
    assert round_trip_failures(get_task(name), rows) == []


def test_serialise_formats():
    cb = get_task("cb")
    assert cb.serialise({"premise": " A  b\nc ", "hypothesis": "d", "label": 0}) == "premise: A b c\nhypothesis: d"
    copa = get_task("copa")
    ex = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
          "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1}
    assert copa.serialise(ex).splitlines() == [
        "premise: The man turned on the faucet.", "question: effect",
        "choice1: The toilet filled with water.", "choice2: Water flowed from the spout."]
    assert copa.render(ex) == ("The man turned on the faucet. What happened as a result?",
                               "choice1: The toilet filled with water. choice2: Water flowed from the spout.")
    assert copa.render({**ex, "question": "cause"})[0].endswith("What was the cause?")
    assert get_task("sst2").render({"sentence": "fine . "}) == ("fine .", None)


def test_wsc_marking():
    wsc = get_task("wsc")
    ex = {"text": "Mark told Pete many lies about himself , which Pete included in his book .",
          "span1_index": 0, "span2_index": 12, "span1_text": "Mark", "span2_text": "his", "label": 0}
    text = "*Mark* told Pete many lies about himself , which Pete included in [his] book ."
    assert wsc.serialise(ex) == f"text: {text}\ncandidate: Mark\npronoun: his"
    assert wsc.render(ex) == (text, 'Does "his" refer to "Mark"?')
    assert wsc.parse(wsc.serialise(ex)) == expected_inputs(wsc, ex)
    assert wsc.parse(f"text: {text}") == expected_inputs(wsc, ex)  # span lines optional when marks are fine
    # span text differing from the surface (case) travels on its own line
    ex2 = {**ex, "span1_text": "mark"}
    assert wsc.parse(wsc.serialise(ex2))["span1_text"] == "mark"
    # nested spans sharing a first word; span inside a word ("Emma's")
    nested = {"text": "their mothers said so .", "span1_index": 0, "span2_index": 0,
              "span1_text": "their mothers", "span2_text": "their"}
    assert wsc.serialise(nested).startswith("text: *[their] mothers* said so .\n")
    assert wsc.parse(wsc.serialise(nested)) == nested
    inner = {"text": "Emma's mother had died long ago , and her place", "span1_index": 0, "span2_index": 8,
             "span1_text": "Emma", "span2_text": "her"}
    assert wsc.serialise(inner).startswith("text: *Emma*'s mother")
    assert wsc.parse(wsc.serialise(inner)) == inner
    for bad in ("text: no marks here", "text: *Mark* and *Pete* [he]", "text: *Mark* ]he[ went"):
        assert wsc.read(bad) == (None, "unlocated_span")


def test_wsc_spans_are_located_when_the_marks_are_broken():
    wsc = get_task("wsc")
    located = wsc.read("text: Mark told *Pete about [his book .\ncandidate: pete\npronoun: his")
    assert located == ({"text": "Mark told Pete about his book .", "span1_index": 2, "span1_text": "pete",
                        "span2_index": 4, "span2_text": "his"}, "ok")
    # ambiguous (the span occurs twice) or absent: counted, not guessed
    assert wsc.read("text: Pete told Pete about his book .\ncandidate: Pete\npronoun: his") == \
        (None, "unlocated_span")
    assert wsc.read("text: Mark told Pete .\ncandidate: Anna\npronoun: his") == (None, "unlocated_span")


def test_wic_marking_and_offsets():
    wic = get_task("wic")
    ex = {"word": "bank", "sentence1": "I went to the bank .", "sentence2": "The river  bank was muddy.",
          "start1": 14, "end1": 18, "start2": 11, "end2": 15, "label": 1}
    assert wic.serialise(ex) == "word: bank\nsentence1: I went to the *bank* .\nsentence2: The river *bank* was muddy."
    assert wic.render(ex) == ("bank: I went to the *bank* .", "The river *bank* was muddy.")
    # offsets refer to the whitespace-normalised sentence
    assert wic.parse(wic.serialise(ex)) == {**expected_inputs(wic, ex), "start2": 10, "end2": 14}
    assert wic.parse("word: bank\nsentence1: the * bank * .\nsentence2: *banks*")["end1"] == 8
    # unusable marks: the one whole-word occurrence of the word gives the offsets, else unlocated_span
    assert wic.parse("word: bank\nsentence1: the bank .\nsentence2: *bank*")["start1"] == 4
    assert wic.parse("word: bank\nsentence1: the ** bank\nsentence2: *bank*")["end1"] == 8
    assert wic.read("word: bank\nsentence1: a bank by the bank\nsentence2: *bank*") == (None, "unlocated_span")
    assert wic.read("word: bank\nsentence1: the banks .\nsentence2: *bank*") == (None, "unlocated_span")


# -- parse robustness ---------------------------------------------------------------------------
@pytest.mark.parametrize("garbage", ["", "   ", "hello world", "premise:\nhypothesis: x", "premise: x",
                                     "hypothesis: x\nfoo: y", "premise x\nhypothesis y"])
def test_parse_garbage_is_none(garbage):
    assert get_task("cb").parse(garbage) is None


def test_parse_tolerates_whitespace_and_case_but_not_extra_text():
    cb = get_task("cb")
    want = {"premise": "A dog ran.", "hypothesis": "An animal moved."}
    for text in ("\n  premise:   A dog ran.  \n hypothesis: An animal moved.\n\n",
                 "Premise: A dog ran.\nHYPOTHESIS: An animal moved.",
                 "premise: A dog ran.\nhypothesis: An animal moved.</s><pad><pad>",  # an EOS written out ends it
                 "premise: A dog ran.\nhypothesis: An animal moved. <|endoftext|>label: 1"):
        assert cb.read(text) == (want, "ok")
    for text in ("premise: A dog ran.\nhypothesis: An animal moved.\npremise: another one",  # text after the end
                 "premise: A dog ran.\nhypothesis: An animal moved.\nblah blah",
                 "premise: A dog ran.\nsome junk\nhypothesis: An animal moved.",            # junk between fields
                 "hypothesis: An animal moved.\npremise: A dog ran.",                         # out of order
                 "premise: A dog ran.\npremise: A dog ran.\nhypothesis: An animal moved."):  # repeated
        assert cb.read(text) == (None, "extra_text")
    for text in ("premise: Premise: A dog ran.\nhypothesis: An animal moved.",               # its own name again
                 "premise: A dog ran. hypothesis: A dog.\nhypothesis: An animal moved."):   # another field inline
        assert cb.read(text) == (None, "extra_text")
    # a field name without its colon, or with a space before it (SST-2 has "same sentence :"), is just a word
    assert cb.read("premise: The premise was : odd.\nhypothesis: A hypothesis premise.")[1] == "ok"
    wsc = get_task("wsc")  # the WSC probe's samples: the whole example written on the text line
    assert wsc.read("text: text: Mark told *Pete* that [he] was late. candidate: Pete pronoun: he\n"
                    "candidate: Pete\npronoun: he") == (None, "extra_text")
    assert cb.read("premise: A dog ran.") == (None, "missing_field")
    assert cb.read("premise: A dog ran.\nhypothesis:   ") == (None, "missing_field")
    copa = get_task("copa")
    assert copa.parse("premise: p\nquestion: Cause\nchoice1: a\nchoice2: b")["question"] == "cause"
    assert copa.read("premise: p\nquestion: why\nchoice1: a\nchoice2: b") == (None, "invalid")
    assert copa.read("premise: p\nquestion: cause\nchoice1: a\nchoice2: b\n###") == (None, "extra_text")


# -- conditioning -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_condition_differs_per_label(name):
    task = get_task(name)
    texts = [task.condition(i) for i in range(task.num_labels)]
    assert len(set(texts)) == task.num_labels
    assert all(t.startswith(f"Task: {task.description}.") and t.endswith(".\n") for t in texts)
    with pytest.raises(ValueError):
        task.condition(task.num_labels)


def test_condition_text():
    assert get_task("cb").condition(1) == "Task: natural language inference (CommitmentBank). Label: contradiction.\n"
    assert "not entailment" in get_task("rte").condition(1)


# -- metrics ------------------------------------------------------------------------------------
def test_metrics_binary_golden():
    y_true, y_pred = [0, 1, 1, 0], [0, 1, 0, 0]
    # TP=1 FP=0 FN=1 TN=2: acc 3/4; F1(1)=2*1*.5/1.5=2/3; F1(0)=2*(2/3)*1/(5/3)=0.8; MCC=2/sqrt(1*2*2*3)
    assert get_task("mrpc").compute_metrics(y_true, y_pred) == pytest.approx({"f1": 2 / 3, "accuracy": 0.75})
    assert get_task("cola").compute_metrics(y_true, y_pred) == pytest.approx(
        {"mcc": 0.5773502691896258, "accuracy": 0.75})
    assert get_task("sst2").compute_metrics(y_true, y_pred) == {"accuracy": 0.75}
    res = get_task("cola").compute_metrics(y_true, y_pred)
    assert all(type(v) is float for v in res.values())


def test_metrics_three_class_golden():
    # class F1s: 0 -> 1, 1 -> 0 (never right), 2 -> P=1/2 R=1/2 -> 1/2; macro = 1/2
    res = get_task("cb").compute_metrics([0, 1, 2, 2], [0, 2, 2, 1])
    assert list(res) == ["accuracy", "macro_f1"]
    assert res == pytest.approx({"accuracy": 0.5, "macro_f1": 0.5})
    # a class absent from both arrays still counts (as 0) in the macro average
    assert get_task("cb").compute_metrics([0, 1], [0, 1])["macro_f1"] == pytest.approx(2 / 3)


def test_metrics_reject_bad_lengths():
    with pytest.raises(ValueError):
        get_task("sst2").compute_metrics([0, 1], [0])
    with pytest.raises(ValueError):
        get_task("sst2").compute_metrics([], [])
    with pytest.raises(ValueError, match="class ids"):
        get_task("sst2").compute_metrics([0, 1], [0, 2])


@pytest.mark.parametrize("name", ["cb", "mrpc", "cola"])
def test_metrics_match_sklearn_and_resamples_match_single_calls(name):
    """sklearn is the reference; metric_on_rows (the bootstrap's) equals compute_metrics per subset."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    task = get_task(name)
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, task.num_labels, 40), rng.integers(0, task.num_labels, 40)
    ref = {"accuracy": lambda: accuracy_score(y, p), "f1": lambda: f1_score(y, p, zero_division=0),
           "macro_f1": lambda: f1_score(y, p, labels=list(range(task.num_labels)), average="macro",
                                        zero_division=0),
           "mcc": lambda: matthews_corrcoef(y, p)}
    got = task.compute_metrics(y, p)
    assert got == pytest.approx({m: ref[m]() for m in task.metrics}, abs=1e-12)
    rows = rng.integers(0, 40, size=(5, 40))
    for metric in task.metrics:
        single = [task.compute_metrics(y[r], p[r])[metric] for r in rows]
        assert task.metric_on_rows(y, p, rows, metric) == pytest.approx(single, abs=1e-12)
    assert get_task("cola").compute_metrics([1, 1], [1, 1])["mcc"] == 0.0  # undefined -> 0, as sklearn


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ex, message", [
    ({"hypothesis": "h", "label": 0}, "missing field 'premise'"),
    ({"premise": "p", "hypothesis": 3}, "field 'hypothesis' must be str"),
    ({"premise": "p", "hypothesis": "  "}, "empty field 'hypothesis'"),
    ({"premise": "p", "hypothesis": "h", "label": 3}, "bad label 3"),
    ({"premise": "p", "hypothesis": "h", "label": "neutral"}, "bad label 'neutral'"),
    ({"premise": "p", "hypothesis": "h", "label": True}, "bad label True"),
])
def test_validate_errors(ex, message):
    with pytest.raises(ValueError, match=message):
        get_task("cb").validate(ex)


def test_validate_task_specific():
    get_task("cb").validate({"premise": "p", "hypothesis": "h", "label": 2})
    get_task("cb").validate({"premise": "p", "hypothesis": "h"})  # unlabelled is fine
    with pytest.raises(ValueError, match="question must be"):
        get_task("copa").validate({"premise": "p", "choice1": "a", "choice2": "b", "question": "why"})
    wsc = {"text": "a b c", "span1_index": 0, "span2_index": 3, "span1_text": "a", "span2_text": "c"}
    with pytest.raises(ValueError, match="span2_index=3"):
        get_task("wsc").validate(wsc)
    with pytest.raises(ValueError, match="span1_index' must be int"):
        get_task("wsc").validate({**wsc, "span1_index": "0"})
    wic = {"word": "w", "sentence1": "a w", "sentence2": "w b", "start1": 2, "end1": 3, "start2": 0, "end2": 9}
    with pytest.raises(ValueError, match="sentence2"):
        get_task("wic").validate(wic)
