"""evaluate stage: statistics checked by hand, the paired bootstrap, report files, figures, determinism.

Synthetic inputs for cb (3 classes, 30 validation rows) x L2/L4 x seeds 0/1 x 6 methods + teacher.
A model's predictions are gold except on its first k rows (predicted as the next class), so its
accuracy is 1 - k/30 and every number below can be worked out by hand. The train split has 10
contradiction, 6 entailment and 4 neutral rows (majority class: contradiction), the store 6 entries.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from retrikt import paths
from retrikt.evaluate import build_results, evaluate
from retrikt.io import atomic_write_json, read_json, write_jsonl
from retrikt.params import parse_params
from retrikt.paths import HEADLINE_METRICS as METRICS_JSON, RESULTS_JSON, RESULTS_MD
from retrikt.report.markdown import render_markdown
from retrikt.report.stats import (
    Comparison,
    gap_closed,
    majority_class,
    mean_std,
    paired_bootstrap,
    pooled_bootstrap,
    rl_before_after,
    sign_test,
)
from retrikt.tasks import get_task

from .conftest import REPO

N = 30
GOLD = [i % 3 for i in range(N)]
CB = get_task("cb")
# wrong rows k per (layers, method) for seeds 0 and 1
WRONG = {
    2: {"finetune": (15, 12), "vanilla_kd": (12, 12), "mgskd": (9, 6), "adkd": (10, 9), "retrikt_kd": (12, 9),
        "retrikt": (3, 0)},
    # L4: every baseline is wrong everywhere, RetriKT right everywhere -> delta = 1 in every resample
    4: {"finetune": (N, N), "vanilla_kd": (N, N), "mgskd": (N, N), "adkd": (N, N), "retrikt_kd": (N, N),
        "retrikt": (0, 0)},
}
LATENCY = (1.0, 2.0)
RATIO = {"retrikt": (1.3, 1.1)}  # A/B serving / plain forward per seed; every other method 1.05
TRAIN_LABELS = [1] * 10 + [0] * 6 + [2] * 4


class FakeRun:
    """Records what evaluate hands to the tracking object."""

    def __init__(self) -> None:
        self.metrics: dict = {}
        self.artifacts: list[str] = []
        self.summary: dict = {}

    def set_metrics(self, metrics: dict) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append(str(path))

    def set_pipeline_summary(self, metrics, tags=None, description=None, artifacts=None) -> None:
        self.summary = {"metrics": metrics, "tags": tags, "description": description, "artifacts": artifacts}


RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def _params(seeds=(0, 1), student: dict | None = None, rl_enabled: bool = True):
    """params.yaml with 2 seeds (and optionally other student sizes/methods, RL off)."""
    raw = copy.deepcopy(RAW)
    raw["seeds"] = list(seeds)
    raw["student"].update({"layers": [2, 4], **(student or {})})  # the inputs below cover both sizes
    raw["rl"]["enabled"] = rl_enabled
    return parse_params(raw)


def _preds(k: int) -> list[int]:
    return [(g + 1) % 3 if i < k else g for i, g in enumerate(GOLD)]


def _write_model(task: str, name: str, pred: list[int], metrics_path, extra: dict) -> None:
    atomic_write_json(paths.predictions(task, name), {
        "idx": list(range(N)), "label": GOLD, "pred": pred, "proba": [[1.0 if c == p else 0.0 for c in range(3)]
                                                                      for p in pred]})
    atomic_write_json(metrics_path, {**CB.compute_metrics(GOLD, pred), **extra})


def _write_inputs() -> None:
    """Every input file of the synthetic cb run, under the current directory."""
    _write_model("cb", "teacher", _preds(3), paths.metrics("cb", "teacher"), {"parameters": 22_000_000})
    for layers, by_method in WRONG.items():
        for method, ks in by_method.items():
            for seed, k in zip((0, 1), ks):
                extra = {"parameters": 1000 * layers, "train_seconds": 10.0 + seed, "latency_ms": LATENCY[seed],
                         "forward_latency_ms": 0.5, "latency_ratio": RATIO.get(method, (1.05, 1.05))[seed],
                         "store_bytes": {"retrikt": 4096, "retrikt_kd": 1024}.get(method, 0),
                         "model_bytes": 4000 * layers}
                _write_model("cb", f"{method}-L{layers}-s{seed}", _preds(k),
                             paths.student_metrics("cb", method, layers, seed), extra)
    atomic_write_json(paths.metrics("cb", "generate"), {
        "size": 180, "parse_rate": 0.94, "duplicate_rate": 0.02, "near_duplicate_rate": 0.05, "self_bleu": 0.31,
        "teacher_agreement": 0.8, "per_label": {"entailment": 60, "contradiction": 60, "neutral": 60}})
    atomic_write_json(paths.metrics("cb", "rl"), {"before_confidence": 0.5, "after_confidence": 0.7,
                                                   "before_self_bleu": 0.4, "after_self_bleu": 0.3, "updates": 6})
    atomic_write_json(paths.plot("cb", "teacher_curve"),
                      [{"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.5 + 0.1 * e} for e in (1, 2, 3)])
    atomic_write_json(paths.plot("cb", "rl_curve"),
                      [{"update": u, "reward": 0.1 * u, "confidence": 0.5, "diversity": 0.2, "kl": 0.01 * u}
                       for u in (1, 2, 3)])
    atomic_write_json(paths.plot("cb", "student_curve-retrikt-L2-s0"),
                      [{"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.6 + 0.1 * e} for e in (1, 2)])
    train = [{"premise": f"a premise with {i} words " * (1 + i % 3), "hypothesis": "a hypothesis", "idx": i,
              "label": y} for i, y in enumerate(TRAIN_LABELS)]
    write_jsonl(paths.split_file("cb", "train"), train)
    write_jsonl(paths.split_file("cb", "validation"),
                [{"premise": f"validation premise {i}", "hypothesis": "h", "idx": i, "label": y}
                 for i, y in enumerate(GOLD)])
    soft = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]]
    write_jsonl(paths.store("cb") / "entries.jsonl",
                [{"id": i, "premise": "generated premise " * (i + 1), "hypothesis": "generated", "label": i % 3,
                  "soft_label": p, "text": ""} for i, p in enumerate(soft)])


@dataclass
class Report:
    root: Path
    metrics: dict
    run: FakeRun
    results: dict
    md: str


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Report:
    """One full evaluate run (all 6 methods x L2/L4 x 2 seeds), shared by the read-only tests."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _write_inputs()
        run = FakeRun()
        metrics = evaluate(_params(), run)
    return Report(root, metrics, run, read_json(root / RESULTS_JSON), (root / RESULTS_MD).read_text())


@pytest.fixture
def synthetic(in_tmp_repo) -> Path:
    """Fresh inputs in an empty directory, for tests that change them."""
    _write_inputs()
    return in_tmp_repo


# fewer figures, faster
SMALL = {"student": {"layers": [2], "baselines": ["finetune", "mgskd"], "store_methods": ["retrikt"]}}


def test_report_numbers_by_hand(report):
    res, metrics, run = report.results, report.metrics, report.run
    cb = res["tasks"]["cb"]
    l2 = cb["students"]["L2"]
    # finetune accuracies 15/30 = 0.5 and 18/30 = 0.6: mean 0.55, sample std |0.6 - 0.5| / sqrt(2)
    acc = l2["rows"]["finetune"]["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.55) and acc["std"] == pytest.approx(0.1 / math.sqrt(2), abs=1e-6)
    assert acc["values"] == [0.5, 0.6] and acc["n"] == 2
    lat = l2["rows"]["finetune"]["cost"]["latency_ms"]
    assert lat["mean"] == 1.5 and lat["std"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert l2["rows"]["retrikt"]["cost"]["store_bytes"] == {"mean": 4096, "std": 0.0, "n": 2}
    assert l2["rows"]["teacher"]["metrics"]["accuracy"] == {"mean": 0.9, "std": None, "n": 1, "values": [0.9]}
    # best baseline among the task-data baselines only: mgskd (0.7, 0.8 -> 0.75) beats adkd (0.6667, 0.7);
    # retrikt_kd (0.65) is not a baseline but has its own comparison
    assert res["baselines"] == ["finetune", "vanilla_kd", "mgskd", "adkd"]
    assert l2["best_baseline"] == "mgskd"
    comp = l2["comparison"]
    assert comp["delta"] == pytest.approx(0.95 - 0.75)
    bs = comp["bootstrap"]
    assert bs["estimate"] == pytest.approx(comp["delta"])
    assert bs["ci"][0] < comp["delta"] < bs["ci"][1] and bs["ci"][0] > 0
    assert bs["p_value"] < 0.01 and bs["samples"] == 1000 and bs["examples"] == N
    kd = l2["vs_retrikt_kd"]
    assert kd["baseline"] == "retrikt_kd" and kd["delta"] == pytest.approx(0.95 - 0.65)
    assert kd["bootstrap"]["ci"][0] < kd["delta"] < kd["bootstrap"]["ci"][1]
    # majority class of train: contradiction (10 of 20) -> 1/3 of the balanced validation rows;
    # macro-F1: contradiction's F1 = 2*10/(10+30) = 0.5, the two others 0
    assert cb["majority"] == {"class": 1, "label": "contradiction",
                              "metrics": {"accuracy": pytest.approx(1 / 3, abs=1e-6),
                                          "macro_f1": pytest.approx(1 / 6, abs=1e-6)}}
    # gap closed: (0.95 - 0.55) / (0.9 - 0.55) for retrikt, 0 for finetune, none for the teacher
    assert l2["rows"]["retrikt"]["gap_closed"] == pytest.approx(0.4 / 0.35, abs=1e-6)
    assert l2["rows"]["finetune"]["gap_closed"] == 0.0 and l2["rows"]["teacher"]["gap_closed"] is None
    # serving cost: ratio (1.3, 1.1) -> 1.2 x the median forward 0.5 ms; retrikt reads its store, retrikt_kd not
    serving = {c["model"]: c for c in l2["serving"]}
    assert serving["retrikt"]["latency_ratio"] == pytest.approx(1.2)
    assert serving["retrikt"]["serving_ms"] == pytest.approx(0.6)
    assert serving["retrikt"]["serving_bytes"] == 8000 + 4096
    assert serving["retrikt_kd"]["serving_bytes"] == 8000 and serving["teacher"]["serving_ms"] is None
    # L4: all baselines tie at 0 -> the first listed (finetune); delta = 1 on every resample
    l4 = cb["students"]["L4"]
    assert l4["best_baseline"] == "finetune"
    assert l4["comparison"]["bootstrap"]["ci"] == [1.0, 1.0]
    assert l4["comparison"]["bootstrap"]["p_value"] == pytest.approx(2 / 1001, abs=1e-6)
    # store and RL, nothing inconsistent, missing curves listed
    assert cb["store"]["parse_rate"] == 0.94 and cb["rl"]["before"] == {"confidence": 0.5, "self_bleu": 0.4}
    assert cb["warnings"] == []
    assert "reports/plots/cb/prompt_tune_curve.json" not in cb["missing"]  # not read
    assert "reports/plots/cb/student_curve-mgskd-L4-s1.json" in cb["missing"]
    assert "reports/metrics/cb/index.json" in cb["missing"]
    assert "models/cb/students/retrikt-L2-s0" in cb["missing"]  # the retrieval panel's student
    # compact metrics.json == return value == what MLflow got (flattened), for the stage and the parent run
    assert read_json(report.root / METRICS_JSON) == metrics
    assert metrics["cb"]["teacher"] == 0.9 and metrics["cb"]["store_size"] == 180
    assert metrics["cb"]["majority"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["cb"]["L2"]["best_baseline"] == 0.75 and metrics["cb"]["L2"]["retrikt"] == 0.95
    assert metrics["cb"]["L4"]["delta_vs_best"] == 1.0
    assert metrics["cb"]["L2"]["delta_vs_kd"] == pytest.approx(0.3)
    assert run.metrics["cb.L2.delta_vs_best"] == pytest.approx(0.2)
    assert all(isinstance(v, (int, float)) for v in run.metrics.values())
    assert len(run.metrics) == 3 + 2 * 10  # the dvc exp show columns: one task, two sizes
    assert run.summary["metrics"] == run.metrics
    assert run.summary["tags"] == {"cb.L2.best_baseline": "mgskd", "cb.L4.best_baseline": "finetune"}
    assert "| cb | L2 | 0.950 | mgskd 0.750 | +0.200 [" in run.summary["description"]
    assert str(RESULTS_MD) in run.artifacts and str(paths.FIGURES) in run.artifacts


def test_markdown_and_figures(report):
    md = report.md
    for model in ("teacher", "finetune", "vanilla_kd", "mgskd", "adkd", "retrikt_kd", "retrikt"):
        assert f"| {model} |" in md
    assert "| finetune | 0.5500 ± 0.0707 | " in md and "| majority class (contradiction) | 0.3333 |" in md
    assert "| retrikt | 0.9500 ± 0.0707 | " in md and " | 1.143 |" in md  # gap closed
    assert "| RetriKT − best baseline (mgskd) | **+0.2000** | [" in md
    assert "| RetriKT − RetriKT-KD (same store) | **+0.3000** | [" in md
    assert "| parse_rate | 0.9400 |" in md and "| confidence | 0.5000 | 0.7000 | +0.2000 |" in md
    assert "| retrikt | 0.9500 | 2,000 | 1.20 | 0.60 | 7.8 KiB | 4.0 KiB | 11.8 KiB | 10.5 |" in md
    assert "| retrikt_kd | 0.6500 | 2,000 | 1.05 | 0.53 | 7.8 KiB | 0 B | 7.8 KiB | 10.5 |" in md
    assert "![forest](figures/forest.png)" in md and "![store](figures/cb/store.png)" in md
    figs = report.results["tasks"]["cb"]["figures"]
    names = {p.rsplit("/", 1)[1] for p in figs}
    assert names == {"methods.png", "cost.png", "confusion.png", "store.png", "rl.png", "learning_curves.png"}
    assert report.results["figures"] == ["reports/figures/forest.png"]
    for p in [*figs, *report.results["figures"]]:
        data = (report.root / p).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[-8:-4] == b"IEND"


def test_identical_inputs_give_identical_outputs(synthetic):
    evaluate(_params(**SMALL), FakeRun())
    outputs = [RESULTS_JSON, RESULTS_MD, METRICS_JSON, *sorted(paths.FIGURES.rglob("*.png"))]
    first = [p.read_bytes() for p in outputs]
    evaluate(_params(**SMALL), FakeRun())
    assert [p.read_bytes() for p in outputs] == first


def test_missing_student_metrics_is_one_line_naming_the_file(synthetic):
    missing = paths.student_metrics("cb", "adkd", 4, 1)
    missing.unlink()
    with pytest.raises(FileNotFoundError) as err:
        evaluate(_params(), FakeRun())
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    assert not RESULTS_JSON.exists() and not paths.FIGURES.exists()  # inputs are checked before any output


def test_single_seed_no_rl_and_missing_predictions(synthetic):
    paths.predictions("cb", "mgskd-L2-s0").unlink()
    results = build_results(_params(seeds=[0], rl_enabled=False, **SMALL), figures=False)
    cb = results["tasks"]["cb"]
    l2 = cb["students"]["L2"]
    assert l2["rows"]["finetune"]["metrics"]["accuracy"] == {"mean": 0.5, "std": None, "n": 1, "values": [0.5]}
    assert l2["best_baseline"] == "mgskd" and l2["comparison"]["bootstrap"] is None
    assert l2["vs_retrikt_kd"] is None  # not configured
    assert "reports/predictions/cb/mgskd-L2-s0.json" in cb["missing"]
    assert cb["rl"] is None and "reports/metrics/cb/rl.json" not in cb["missing"]
    md = render_markdown(results)
    assert "| finetune | 0.5000 | " in md and "RL disabled" in md and cb["figures"] == []
    assert "| RetriKT − best baseline (mgskd) | +0.2000 | – (predictions missing) | – |" in md


def test_old_timings_without_ab_ratio_show_no_latency(synthetic):
    for f in paths.METRICS.rglob("students/*.json"):
        obj = read_json(f)
        obj.pop("latency_ratio")
        atomic_write_json(f, obj)
    results = build_results(_params(**SMALL), figures=False)
    serving = results["tasks"]["cb"]["students"]["L2"]["serving"]
    assert all(c["latency_ratio"] is None and c["serving_ms"] is None for c in serving)
    assert {c["model"]: c["serving_bytes"] for c in serving}["retrikt"] == 8000 + 4096


def test_no_gap_unless_the_teacher_beats_finetune():
    assert gap_closed(0.7, 0.6, 0.6) is None and gap_closed(0.7, None, 0.6) is None
    assert gap_closed(0.8, 0.6, 0.7) is None  # the teacher below fine-tuning: nothing to close
    assert gap_closed(0.65, 0.7, 0.6) == pytest.approx(0.5)
    assert majority_class([2, 0, 0, 2], 3) == 0  # a tie goes to the lowest class id


def test_mismatched_validation_rows_are_an_error(synthetic):
    path = paths.predictions("cb", "retrikt-L2-s1")
    obj = read_json(path)
    obj["idx"] = obj["idx"][::-1]
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="retrikt-L2-s1.json: validation rows"):
        evaluate(_params(), FakeRun())


# --- statistics, directly ------------------------------------------------------------------------ #
def test_mean_std():
    assert mean_std([0.5, 0.6, 0.7]) == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "n": 3}
    assert mean_std([3]) == {"mean": 3, "std": None, "n": 1}


def _boot(y, a, b, samples=1000, seed=0):
    return paired_bootstrap(CB, np.array(y), [np.array(x) for x in a], [np.array(x) for x in b], "accuracy",
                            samples=samples, confidence=0.95, rng=np.random.default_rng(seed))


def test_bootstrap_degenerate_and_identical_cases():
    y = np.array(GOLD)
    wrong = (y + 1) % 3
    win = _boot(y, [y, y], [wrong, wrong])
    assert (win.estimate, win.ci_low, win.ci_high) == (1.0, 1.0, 1.0) and win.p_value == pytest.approx(2 / 1001)
    same = _boot(y, [_preds(5), _preds(9)], [_preds(5), _preds(9)])
    assert (same.estimate, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_two_examples_by_hand():
    # A is right on both rows, B only on row 0. A resample of 2 rows has delta = (#row-1 draws)/2:
    # 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> CI [0, 1], P(d* <= 0) = 1/4, p ~ 2 * 1/4.
    res = _boot([0, 1], [[0, 1]], [[0, 0]], samples=4000)
    assert res.estimate == 0.5 and (res.ci_low, res.ci_high) == (0.0, 1.0)
    assert res.p_value == pytest.approx(0.5, abs=0.05)
    # averaging over seeds: B's second seed is right on row 1 only -> B scores 0.5 on every resample
    res = _boot([0, 1], [[0, 1]], [[0, 0], [1, 1]], samples=2000)
    assert res.estimate == 0.5 and (res.ci_low, res.ci_high) == (0.5, 0.5) and res.p_value == pytest.approx(2 / 2001)


def _part(y, a, b):
    return Comparison(CB, np.array(y), [np.array(x) for x in a], [np.array(x) for x in b], "accuracy")


def test_pooled_bootstrap_one_task_is_the_paired_bootstrap():
    y = np.array(GOLD)
    a, b = [_preds(3), _preds(7)], [_preds(12), _preds(10)]
    one = pooled_bootstrap([_part(y, a, b)], samples=500, confidence=0.95, rng=np.random.default_rng(4))
    assert one == _boot(y, a, b, samples=500, seed=4)


def test_pooled_bootstrap_by_hand():
    # task 1: A right everywhere, B wrong everywhere -> delta 1 on every resample; task 2: A = B -> 0.
    # The equal-weight mean is 0.5 on every resample: CI [0.5, 0.5], no resample <= 0 -> p = 2 / (B + 1).
    y = np.array(GOLD)
    wrong = (y + 1) % 3
    parts = [_part(y, [y], [wrong]), _part([0, 1, 2, 0], [[0, 1, 1, 0]], [[0, 1, 1, 0]])]
    res = pooled_bootstrap(parts, samples=999, confidence=0.95, rng=np.random.default_rng(0))
    assert (res.estimate, res.ci_low, res.ci_high) == (0.5, 0.5, 0.5)
    assert res.p_value == pytest.approx(2 / 1000) and res.examples == len(GOLD) + 4
    # a task whose sign flips: 1 and -1 average to 0 -> the pooled estimate is 0, p = 1
    flip = [_part(y, [y], [wrong]), _part(y, [wrong], [y])]
    res = pooled_bootstrap(flip, samples=200, confidence=0.95, rng=np.random.default_rng(0))
    assert (res.estimate, res.ci_low, res.ci_high, res.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        pooled_bootstrap([], samples=10, confidence=0.95, rng=np.random.default_rng(0))


def test_sign_test_by_hand():
    # 4 of 4 tasks won: P(X <= 0) = 1/16, two-sided 2/16
    assert sign_test([0.1, 0.2, 0.05, 0.3]) == {"positive": 4, "negative": 0, "ties": 0, "p_value": 0.125}
    # 2 won, 1 lost, 1 tie (dropped): n = 3, 2 * P(X <= 1) = 2 * (1 + 3) / 8 = 1
    assert sign_test([0.1, -0.2, 0.3, 0.0]) == {"positive": 2, "negative": 1, "ties": 1, "p_value": 1.0}
    assert sign_test([-0.1] * 6)["p_value"] == 2 / 64
    assert sign_test([])["p_value"] == 1.0


def test_rl_before_after_forms():
    got = rl_before_after({"before_conf": 0.1, "conf_after": 0.2, "before": {"self_bleu": 0.3},
                            "after": {"self_bleu": 0.2}, "updates": 6})
    assert got == {"before": {"conf": 0.1, "self_bleu": 0.3}, "after": {"conf": 0.2, "self_bleu": 0.2}}


def test_the_reward_model_retrieval_ceiling_row(report):
    """With the index stage's ``rm_retrieval`` the report shows it beside the majority class, per size."""
    assert "as the retriever" not in report.md  # no index metrics in the synthetic run
    results = copy.deepcopy(report.results)
    results["tasks"]["cb"]["index"] = {"entries": 6, "rm_retrieval": {"accuracy": 0.875, "f1_macro": 0.5}}
    md = render_markdown(results)
    assert md.count("| reward model as the retriever (RetriKT's ceiling) | 0.8750 |") == 2  # L2 and L4
