"""``rl.algorithm`` alternatives to our PPO: trl's GRPO and RLOO on the same soft prompt and reward.

Starting point. Pass the step-1 model as a ``PeftModel`` (e.g. ``PeftModel.from_pretrained(base,
step1_dir, is_trainable=True)``). trl accepts a PeftModel as is (it refuses a PeftModel *plus* a
``peft_config``) and, when ``beta > 0``, adds a frozen copy of the loaded adapter named ``"ref"``
and computes the reference log-probs with it, so the KL term is to the step-1 prompt exactly as in
our PPO. The prompt is trained in place: ``model.save_pretrained`` afterwards saves it. A plain
``PreTrainedModel`` is wrapped here with a fresh ``PromptTuningConfig`` prompt first (rather than
via trl's ``peft_config``, whose reference would be the generator *without* a prompt), so its
reference is that initial prompt; the trained wrapper is then not returned, so use it for
experiments only.

Limits: trl's GRPO / RLOO trainers support causal LMs only (their docs: "Only causal language
models are supported"), so seq2seq generators must use :class:`retrikt.rl.ppo.SoftPromptPPO`.
Both algorithms are critic-free (group-relative / leave-one-out baselines over
``num_generations`` samples per condition) and put the KL in the loss, not in the reward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from retrikt.models import ensure_pad_token
from retrikt.params import RLParams
from retrikt.rl.ppo import RewardFn

ALGORITHMS = ("grpo", "rloo")


@dataclass(frozen=True)
class TrlConfig:
    """What :func:`train_with_trl` maps onto ``GRPOConfig`` / ``RLOOConfig``: the ``rl`` params themselves
    (params.yaml holds every value; nothing is copied or defaulted here), the run's seed and trl's
    scratch folder. ``num_virtual_tokens`` is needed only to wrap a plain model in a fresh prompt;
    ``extra`` overrides any trl field.

    Mapping: lr -> learning_rate, updates -> max_steps, batch_size -> per_device_train_batch_size
    (completions per step), num_generations (group size), max_new_tokens -> max_completion_length,
    temperature, top_p, kl_coef -> beta (KL to the step-1 prompt), clip -> epsilon, max_grad_norm.
    One optimisation pass per generated batch (trl's num_iterations = 1), fp32.
    """

    rl: RLParams
    seed: int
    output_dir: str
    num_virtual_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_trl_reward(reward_fn: RewardFn) -> Callable[..., list[float]]:
    """Adapt ``reward_fn(texts, conditions) -> {"reward": [...]}`` to trl's
    ``reward_func(prompts, completions, **kwargs) -> list[float]`` (plain-text, non-chat format)."""

    def retrikt_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        out = reward_fn([c.strip() for c in completions], list(prompts))
        return [float(r) for r in out["reward"]]

    return retrikt_reward


def train_with_trl(
    algorithm: str,
    model_or_peft_model: Any,
    tokenizer: Any,
    conditions: list[str],
    reward_fn: RewardFn,
    cfg: TrlConfig,
) -> list[dict[str, float]]:
    """Train the soft prompt with trl's ``"grpo"`` or ``"rloo"``; returns one log dict per step.

    ``conditions`` is the prompt pool (one dataset row each; trl samples ``num_generations``
    completions per drawn row). Each log has at least ``step`` and ``reward`` (+ ``kl`` when
    ``beta > 0``, ``entropy``, completion lengths, ... as trl reports them). A ``PeftModel`` is
    trained in place, on the CPU if it is there, else on ``cuda:0`` (the Trainer's choice). Sets
    ``tokenizer.pad_token`` to EOS when missing.
    """
    from datasets import Dataset
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown trl algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if getattr(model_or_peft_model.config, "is_encoder_decoder", False):
        raise ValueError("trl GRPO/RLOO support causal generators only; use SoftPromptPPO for seq2seq")
    if algorithm == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

    rl = cfg.rl
    fields = dict(
        output_dir=cfg.output_dir, learning_rate=rl.lr, max_steps=rl.updates,
        per_device_train_batch_size=rl.batch_size, num_generations=rl.num_generations,
        num_iterations=1, max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature, top_p=rl.top_p, beta=rl.kl_coef, epsilon=rl.clip,
        max_grad_norm=rl.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed, bf16=False,
        disable_dropout=True, logging_steps=1, save_strategy="no", report_to=[],
        lr_scheduler_type="constant", warmup_steps=0,
        # the Trainer moves the model to a visible GPU (cuda:0) unless told otherwise: train where it is
        use_cpu=model_or_peft_model.device.type == "cpu",
    )
    # trl turns checkpointing on by default; transformers 5 renamed the flag
    names = {f.name for f in dataclasses.fields(Config)}
    fields["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
    args = Config(**{**fields, **cfg.extra})
    model = model_or_peft_model
    if not isinstance(model, PeftModel):
        if cfg.num_virtual_tokens is None:
            raise ValueError("a plain model needs TrlConfig.num_virtual_tokens for its fresh prompt")
        fresh = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
        model = get_peft_model(model, fresh)
    if not model.active_peft_config.is_prompt_learning:
        raise ValueError("expected a prompt-tuning PeftModel (the step-1 soft prompt)")
    model.prompt_encoder[model.active_adapter].requires_grad_(True)  # also if loaded with is_trainable=False
    ensure_pad_token(tokenizer)
    # a step draws batch_size / num_generations distinct rows; tile a small pool so one step fits
    per_step = max(1, rl.batch_size // rl.num_generations)
    pool = list(conditions) * -(-per_step // max(1, len(conditions)))
    trainer = Trainer(
        model=model, reward_funcs=make_trl_reward(reward_fn), args=args,
        train_dataset=Dataset.from_dict({"prompt": pool}), processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return [{**{k: float(v) for k, v in h.items() if isinstance(v, (int, float))}, "step": h["step"]} for h in logs]
