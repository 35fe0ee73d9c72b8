"""`rl` stage: RL-tune the step-1 soft prompt so generated knowledge is correct and diverse.

Policy: frozen generator + the step-1 prompt (trainable) + a value head; reference: the step-1 prompt,
frozen. A label is drawn per rollout (uniform or the train prior) and the policy writes a sample
conditioned on it. Reward = w_confidence · p_RM(label | parsed sample) + w_div · (1 − self-BLEU vs the batch)
− w_len · length penalty (bounds from the train split's length percentiles) − parse penalty; the
per-token KL to the reference is handled by the algorithm (ours: in the reward; trl: in the loss).

``rl.algorithm``: ``ppo`` (ours, :mod:`retrikt.rl.ppo`, causal and seq2seq) or trl's ``grpo``/``rloo``
(causal only) with the same reward function. ``rl.enabled: false`` is the paper's "w/o PPO" ablation:
the stage then writes only ``disabled.json`` and `generate` falls back to the step-1 prompt. With
``rl.require_improvement`` (default) the RL prompt is kept only if it raised the mean reward of the
evaluation rollouts; otherwise ``accepted: 0`` is recorded and `generate` uses the step-1 prompt.

Before/after: the same seeded, label-balanced evaluation rollouts are drawn from the step-1 prompt and
from the tuned one; the reward model's mean confidence and self-BLEU of both go to the metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import torch

from retrikt import paths
from retrikt.classifier import Classifier
from retrikt.device import resolve_device, resolve_dtype
from retrikt.io import atomic_dir, atomic_write_json, read_jsonl
from retrikt.llm import draw_labels, label_prior, length_budget, load_with_prompt, sample_full, source_text
from retrikt.params import Params
from retrikt.progress import bar
from retrikt.rl.rewards import RewardWeights, compute_rewards, corpus_self_bleu, length_bounds
from retrikt.tasks import Task, get_task

log = logging.getLogger(__name__)


def label_sampler(task: Task, train: Sequence[dict], how: str, seed: int):
    """``draw(n) -> list of conditioning texts``: labels uniform or from the train prior, seeded."""
    rng, prior = np.random.default_rng(seed), label_prior(train, task.num_labels)

    def draw(n: int) -> list[str]:
        return [source_text(task, y) for y in draw_labels(rng, n, task.num_labels, how, prior)]

    return draw


def balanced_conditions(task: Task, n: int) -> list[str]:
    return [source_text(task, i % task.num_labels) for i in range(n)]


class RolloutReward:
    """The reward function shared by every algorithm: ``(texts, conditions, finished) -> {"reward": [...], ...}``;
    a response that did not end with EOS (``finished`` False) scores as unparsable."""

    def __init__(self, task: Task, reward_model: Classifier, weights: RewardWeights, bounds: tuple[float, float]):
        self.task, self.rm, self.weights, self.bounds = task, reward_model, weights, bounds
        self.cond2label = {source_text(task, y): y for y in range(task.num_labels)}

    def __call__(self, texts: list[str], conditions: list[str], finished: list[bool] | None = None) -> dict[str, Any]:
        labels = [self.cond2label[c] for c in conditions]
        probs: list[np.ndarray] = []

        def prob_fn(examples):
            p = self.rm.predict_proba(examples)
            probs.append(p)
            return p

        out = compute_rewards(texts, labels, self.task.parse, prob_fn, self.weights, self.bounds, complete=finished)
        parsed = [y for y, f in zip(labels, out["parse_fail"]) if not f]
        if probs and parsed:
            out["rm_agreement"] = float(np.mean(probs[0].argmax(1) == np.asarray(parsed)))
        else:
            out["rm_agreement"] = 0.0
        out["self_bleu"] = corpus_self_bleu(texts)
        return out


def structure(task: Task, rp) -> dict:
    """The sampler's structure settings for this task: end at the last line, force the field names."""
    return {"stop_lines": len(task.line_names) if rp.end_at_last_line else None,
            "field_names": task.line_names if rp.force_field_names else None}


def rollout_quality(model, tok, reward: RolloutReward, conditions: list[str], rp, seed: int,
                    phase: str = "evaluation") -> dict[str, float]:
    """Reward-model confidence, agreement, parse rate and self-BLEU of seeded evaluation rollouts."""
    with bar(total=len(conditions), desc=f"rl {reward.task.name}: {phase} rollouts", unit="rollout") as b:
        drawn = sample_full(model, tok, conditions, max_new_tokens=rp.max_new_tokens, temperature=rp.temperature,
                            top_p=rp.top_p, batch_size=len(conditions), seed=seed, dtype=rp.dtype,
                            on_done=lambda _: b.update(1), **structure(reward.task, rp))
    r = reward(drawn.texts, conditions, drawn.finished)
    return {"confidence": r["mean_confidence"], "rm_agreement": r["rm_agreement"], "self_bleu": r["self_bleu"],
            "parse_rate": 1.0 - r["mean_parse_fail"], "finished_rate": float(np.mean(drawn.finished)),
            "reward": r["mean_reward"]}


def _train_ours(model, tok, reward, draw, rp, seed: int, run) -> None:
    from retrikt.rl.ppo import PPOConfig, SoftPromptPPO

    cfg = PPOConfig(rp, seed)
    trainer = SoftPromptPPO(model, tok, cfg, reward, **structure(reward.task, rp))

    def log_update(i: int, stats: dict) -> None:
        keep = ("reward", "confidence", "diversity", "length_penalty", "parse_fail", "kl", "kl_coef", "self_bleu",
                "rm_agreement", "entropy", "clip_frac", "policy_loss", "value_loss", "response_length")
        run.add_plot_row("rl_curve", {"update": i + 1, **{k: float(stats[k]) for k in keep if k in stats}},
                         step_key="update")
        updates.update(1)
        updates.set_postfix(reward=stats["reward"], kl=stats["kl"], parse_fail=stats.get("parse_fail", 0.0))
        log.debug("rl update %d: %s", i + 1, {k: round(float(v), 4) for k, v in stats.items()})

    # an update takes ~30 s on a laptop: off a terminal, a line every 5 rather than silence for minutes
    with bar(total=rp.updates, desc=f"rl {reward.task.name}: updates", unit="update", log_every=5) as updates:
        trainer.train(draw, rp.updates, log_update)


def _train_trl(model, tok, reward, draw, rp, seed: int, run) -> None:
    from retrikt.rl.trl_algos import TrlConfig, train_with_trl

    with tempfile.TemporaryDirectory(prefix="retrikt-trl-") as out:
        cfg = TrlConfig(rp, seed, output_dir=out)
        pool = draw(max(rp.batch_size, 4 * len(reward.cond2label)))
        logs = train_with_trl(rp.algorithm, model, tok, pool, reward, cfg)
    for i, row in enumerate(logs, 1):
        run.add_plot_row("rl_curve", {"update": i, **{k: v for k, v in row.items() if k != "step"}},
                         step_key="update")


def rl(params: Params, task_name: str, run) -> dict:
    task, rp = get_task(task_name), params.rl
    out_dir = paths.rl(task.name)
    if not rp.enabled:
        with atomic_dir(out_dir) as tmp:
            atomic_write_json(tmp / paths.RL_DISABLED,
                              {"reason": "rl.enabled is false: generate uses the step-1 prompt"})
        run.set_metrics({"enabled": 0})
        return {"enabled": 0}

    t0 = time.perf_counter()
    train = read_jsonl(paths.split_file(task.name, "train"))
    device = resolve_device(params.device)
    rp = dataclasses.replace(rp, dtype=resolve_dtype(rp.dtype, device))  # `auto` -> what this device runs natively
    rm = Classifier.load(paths.teacher(task.name), device)
    bounds = length_bounds([len(task.serialise(r).split()) for r in train], rp.len_low_pct, rp.len_high_pct)
    weights = RewardWeights(confidence=rp.w_confidence, diversity=rp.w_div, length=rp.w_len,
                            parse_penalty=rp.parse_penalty)
    reward = RolloutReward(task, rm, weights, bounds)
    # PEFT refuses is_trainable for saved prompt adapters: load frozen, then unfreeze the prompt only
    model, tok = load_with_prompt(paths.base_model("generator"), paths.prompt(task.name), device=device)
    model.get_base_model().to(getattr(torch, rp.dtype))  # the frozen generator computes in rl.dtype ...
    model.prompt_encoder.float()  # ... the prompt trains (and is saved) in float32
    model.prompt_encoder[model.active_adapter].requires_grad_(True)
    rp = dataclasses.replace(rp, max_new_tokens=length_budget(rp.max_new_tokens, tok, task, train))
    eval_conditions = balanced_conditions(task, rp.eval_samples)

    before = rollout_quality(model, tok, reward, eval_conditions, rp, params.seed + 1, "before")
    draw = label_sampler(task, train, rp.label_sampling, params.seed)
    (_train_ours if rp.algorithm == "ppo" else _train_trl)(model, tok, reward, draw, rp, params.seed, run)
    after = rollout_quality(model, tok, reward, eval_conditions, rp, params.seed + 1, "after")

    # keep the RL prompt only if it improved the seeded evaluation reward (rl.require_improvement);
    # otherwise say so in the metrics and let `generate` fall back to the step-1 prompt
    accepted = after["reward"] > before["reward"] or not rp.require_improvement
    with atomic_dir(out_dir) as tmp:
        info = {"task": task.name, "algorithm": rp.algorithm, "updates": rp.updates, "length_bounds": list(bounds),
                "accepted": accepted}
        if accepted:
            model.save_pretrained(tmp)
        else:
            info["reason"] = "the RL prompt lowered the evaluation reward; generate uses the step-1 prompt"
            log.warning("rl: %s (%.4f -> %.4f)", info["reason"], before["reward"], after["reward"])
        atomic_write_json(tmp / paths.RL_META, info)
    metrics = {"enabled": 1, "accepted": int(accepted), "updates": rp.updates, "rollouts": rp.updates * rp.batch_size,
               "eval_rollouts": rp.eval_samples, "max_new_tokens": rp.max_new_tokens, "length_min": bounds[0],
               "length_max": bounds[1],
               **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}}
    run.set_metrics(metrics)
    run.set_timings({"seconds": round(time.perf_counter() - t0, 1)})
    return metrics
