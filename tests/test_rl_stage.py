"""The `rl` stage on tiny models: ours and trl's GRPO run end to end; disabled = the w/o-PPO ablation."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from retrikt import paths
from retrikt.classifier import Classifier
from retrikt.io import read_json
from retrikt.llm import attach_prompt
from retrikt.models import load_generator
from retrikt.params import parse_params
from retrikt.rl.rewards import RewardWeights
from retrikt.rl.stage import RolloutReward, balanced_conditions, label_sampler, rl
from retrikt.tasks import get_task
from retrikt.tracking import StageRun

from .conftest import REPO

ROWS = [{"premise": f"the cat sat on the mat {i}", "hypothesis": h, "idx": i, "label": y}
        for i, (h, y) in enumerate([("a cat is sitting", 0), ("the ground is dry", 1), ("it rained", 2)] * 4)]


def _params(**rl):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["rl"].update({"updates": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8,
                      "eval_samples": 3, "require_improvement": False, **rl})
    return parse_params(raw)


@pytest.fixture
def tiny_repo(in_tmp_repo, tiny_causal_dir, tiny_encoder_dir, one_thread):
    shutil.copytree(tiny_causal_dir, paths.base_model("generator"))
    task = get_task("cb")
    for split in ("train", "validation"):
        p = paths.split_file("cb", split)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    Classifier.from_base(tiny_encoder_dir, task, 32).save(paths.teacher("cb"))
    model, _ = load_generator(paths.base_model("generator"))
    attach_prompt(model, 4, "random", "", paths.base_model("generator")).save_pretrained(paths.prompt("cb"))
    return in_tmp_repo


def _run(params):
    with StageRun("rl", metrics_path=paths.metrics("cb", "rl"), task="cb",
                  plots={"rl_curve": paths.plot("cb", "rl_curve")}) as run:
        return rl(params, "cb", run)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_stage_trains_saves_adapter_and_reports_before_after(tiny_repo, algorithm):
    m = _run(_params(algorithm=algorithm))
    assert (paths.rl("cb") / "adapter_config.json").exists()
    for key in ("confidence", "self_bleu", "parse_rate", "rm_agreement"):
        assert f"{key}_before" in m and f"{key}_after" in m
    curve = read_json(paths.plot("cb", "rl_curve"))
    assert [r["update"] for r in curve] == [1, 2] and all("reward" in r for r in curve)
    assert read_json(paths.metrics("cb", "rl")) == m


def test_same_seed_same_metrics(tiny_repo):
    assert _run(_params()) == _run(_params())


def test_disabled_is_the_without_ppo_ablation(tiny_repo):
    m = _run(_params(enabled=False))
    assert m == {"enabled": 0}
    assert not (paths.rl("cb") / "adapter_config.json").exists()
    assert (paths.rl("cb") / "disabled.json").exists()


def test_reward_uses_the_conditioning_label(tiny_encoder_dir):
    task = get_task("cb")
    rm = Classifier.from_base(tiny_encoder_dir, task, 32)
    reward = RolloutReward(task, rm, RewardWeights(confidence=1, diversity=0, length=0, parse_penalty=1), (1, 100))
    good = task.serialise(ROWS[0])
    conds = balanced_conditions(task, 3)
    out = reward([good, good, "garbage"], conds)
    probs = rm.predict_proba([task.parse(good)])[0]
    assert out["reward"][0] == pytest.approx(probs[0], abs=1e-5)
    assert out["reward"][1] == pytest.approx(probs[1], abs=1e-5)
    assert out["reward"][2] == pytest.approx(-1.0)


def test_label_sampler_prior_and_uniform():
    task = get_task("cb")
    rows = [{"label": 0}] * 9 + [{"label": 1}]
    prior = label_sampler(task, rows, "prior", 0)(200)
    assert prior.count(task.condition(0)) > 150 and prior.count(task.condition(2)) == 0
    uniform = label_sampler(task, rows, "uniform", 0)(300)
    assert all(uniform.count(task.condition(y)) > 60 for y in range(3))


def test_a_prompt_that_lowers_the_reward_is_not_kept(tiny_repo, monkeypatch):
    import retrikt.rl.stage as stage

    scores = iter([1.0, 0.5])  # before, after
    monkeypatch.setattr(stage, "rollout_quality", lambda *a, **k: {"reward": next(scores), "confidence": 0.0})
    m = _run(_params(require_improvement=True))
    assert m["accepted"] == 0 and m["reward_before"] == 1.0 and m["reward_after"] == 0.5
    assert not (paths.rl("cb") / "adapter_config.json").exists()
    assert read_json(paths.rl("cb") / "retrikt_rl.json")["accepted"] is False
