"""trl GRPO / RLOO on a tiny offline causal model with a soft prompt and our reward function."""

import time

import pytest
import torch

from retrikt.rl.trl_algos import TrlConfig, make_trl_reward, train_with_trl
from tests.test_rl_ppo import CONDITIONS, good_fraction, rl_params, tiny_causal_peft, tiny_t5_peft, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash


def test_reward_adapter_signature():
    seen = []

    def reward_fn(texts, conditions):
        seen.append((texts, conditions))
        return {"reward": [1, 0.5], "extra": [0, 0]}

    f = make_trl_reward(reward_fn)
    out = f(prompts=["p1", "p2"], completions=[" good ", "bad"], completion_ids=[[1], [2]], trainer_state=None)
    assert out == [1.0, 0.5]
    assert seen == [(["good", "bad"], ["p1", "p2"])]


def test_trl_rejects_seq2seq_and_unknown(tmp_path):
    tok = tiny_tokenizer()
    cfg = TrlConfig(rl_params(), 0, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="causal"):
        train_with_trl("grpo", tiny_t5_peft(len(tok)), tok, CONDITIONS, good_fraction, cfg)
    with pytest.raises(ValueError, match="unknown"):
        train_with_trl("ppo", tiny_causal_peft(len(tok)), tok, CONDITIONS, good_fraction, cfg)


def _run(algorithm, steps, lr, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_peft(len(tok))  # stands for the loaded step-1 PeftModel
    start = model.prompt_encoder["default"].embedding.weight.detach().clone()
    rl = rl_params(lr=lr, updates=steps, batch_size=16, num_generations=4, max_new_tokens=6, kl_coef=0.05,
                   temperature=1.0, top_p=1.0, clip=0.2, max_grad_norm=1.0)
    cfg = TrlConfig(rl, 0, output_dir=str(tmp_path))
    t0 = time.time()
    logs = train_with_trl(algorithm, model, tok, CONDITIONS, good_fraction, cfg)
    return model, start, logs, time.time() - t0


def test_grpo_learns(tmp_path):
    model, start, logs, secs = _run("grpo", 30, 0.3, tmp_path)
    rewards = [h["reward"] for h in logs]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"trl grpo: first5={first:.3f} last5={last:.3f} ({secs:.1f}s)")
    assert len(logs) == 30 and [h["step"] for h in logs] == list(range(1, 31))
    assert last > first + 0.15, (first, last)
    assert "kl" in logs[-1] and logs[-1]["kl"] > 0
    # the reference is a frozen copy ("ref") of the starting prompt; the "default" prompt moved
    assert torch.equal(model.prompt_encoder["ref"].embedding.weight, start)
    assert not torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), start)


def test_rloo_smoke(tmp_path):
    _, _, logs, _ = _run("rloo", 2, 0.1, tmp_path)
    assert len(logs) == 2 and all("reward" in h and "kl" in h for h in logs)
