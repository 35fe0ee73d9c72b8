"""Golden tests of the PPO maths and learning / smoke tests of SoftPromptPPO on tiny offline models.

The tiny builders here are reused by tests/test_rl_trl.py.
"""

import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PromptTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from retrikt.params import RLParams, parse_params
from retrikt.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    SoftPromptPPO,
    entropy_from_logits,
    gae,
    kl_penalty_rewards,
    ppo_policy_loss,
    value_loss,
)

RL: RLParams = parse_params(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())).rl


def rl_params(**settings) -> RLParams:
    """params.yaml's `rl` section with a test's own settings on top (the code has no defaults). The
    dtype is pinned to bfloat16 (what these tests were written against) rather than params.yaml's
    `auto`, so that a test samples the same texts on every machine."""
    return dataclasses.replace(RL, **{"dtype": "bfloat16", **settings})


def ppo_config(seed: int = 0, **settings) -> PPOConfig:
    return PPOConfig(rl_params(**settings), seed)


WORDS = "good bad movie film great awful the a is was plot actor review positive negative label text".split()


# ------------------------------------------------------------------------------ tiny builders
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS: [PAD]=0, [BOS]=1 (prepended), [EOS]=2, [UNK]=3."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def tiny_causal(vocab_size: int, seed: int = 0, init: float = 0.2) -> LlamaForCausalLM:
    """2-layer Llama; a larger init range than default so a soft prompt can move the output."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=init,
    )
    return LlamaForCausalLM(cfg)


def tiny_causal_peft(vocab_size: int, seed: int = 0, n_virtual: int = 4):
    model = tiny_causal(vocab_size, seed)
    return get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual))


def tiny_t5_peft(vocab_size: int, seed: int = 0, n_virtual: int = 4):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )
    peft_cfg = PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=n_virtual)
    return get_peft_model(T5ForConditionalGeneration(cfg), peft_cfg)


def good_fraction(texts: list[str], conditions: list[str] | None = None, finished=None) -> dict:
    """Trivially learnable reward: fraction of generated words equal to "good"."""
    words = [t.split() for t in texts]
    rewards = [sum(w == "good" for w in ws) / max(1, len(ws)) for ws in words]
    return {"reward": rewards, "words": [len(w) for w in words]}


CONDITIONS = ["label positive text", "label negative", "review"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash


# ------------------------------------------------------------------------------- golden maths
def test_gae_golden():
    rewards = torch.tensor([[0.1, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=1 (last valid, next state terminal): delta = 1.0 - 0.2 = 0.8 -> A1 = 0.8
    # t=0: delta = 0.1 + 0.9*0.2 - 0.5 = -0.22 -> A0 = -0.22 + 0.9*0.8*0.8 = 0.356
    torch.testing.assert_close(adv, torch.tensor([[0.356, 0.8, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.856, 1.0, 0.0]]))


def test_gae_gamma_lam_one_is_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    values = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, adv)


def test_ppo_policy_loss_golden():
    logprobs = torch.tensor([[math.log(1.5), math.log(0.9), 3.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_frac = ppo_policy_loss(logprobs, old, adv, mask, clip=0.2)
    # token 0: ratio 1.5, A=1 -> max(-1.5, -1.2) = -1.2 (clipped); token 1: ratio 0.9, A=-1 -> 0.9
    assert loss.item() == pytest.approx((-1.2 + 0.9) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def test_value_loss_golden():
    values = torch.tensor([[1.0, 0.0, 7.0]])
    old = torch.zeros(1, 3)
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: clipped value 0.2 -> max((1-2)^2, (0.2-2)^2) = 3.24; token 1: 1.0 -> 0.5 * (3.24 + 1) / 2
    assert value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(1.06)


def test_kl_penalty_and_entropy_golden():
    # -0.1 * (-1.0 - -1.5) = -0.05; the second token is masked
    r = kl_penalty_rewards(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.tensor([[1.0, 0.0]]), 0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0]]))
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1e9, -1e9]]])
    both = entropy_from_logits(logits, torch.tensor([[1.0, 1.0]]))
    assert both.item() == pytest.approx((math.log(4) + math.log(2)) / 2)
    assert entropy_from_logits(logits, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(math.log(2))


def test_kl_controllers():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 100)  # error clipped to +0.2 -> x (1 + 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(0.1 * 1.002)
    ctl.update(4.5, 1000)  # error 4.5/6 - 1 = -0.25 -> -0.2 -> x 0.98
    assert ctl.value == pytest.approx(0.1 * 1.002 * 0.98)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3


# ------------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_sampling_matches_scoring(kind):
    """Every sampled token is what the sampler's rule draws from the full float32 forward PPO scores
    with (same uniforms, same nucleus), and left padding (causal batches) changes nothing."""
    from retrikt.sampling import nucleus_draw, uniforms

    tok = tiny_tokenizer()
    model = tiny_causal_peft(len(tok)) if kind == "causal" else tiny_t5_peft(len(tok))
    tr = SoftPromptPPO(model, tok, ppo_config(max_new_tokens=5, temperature=0.7, top_p=0.9, dtype="float32"),
                       good_fraction)
    ro = tr.generate(CONDITIONS)
    seed = tr.rollout_seed()
    logits, _ = tr._forward(tr.prompt_weight, ro)  # temperature-scaled
    drawn = 0
    for i in range(len(CONDITIONS)):
        for t in range(int(ro.r_mask[i].sum())):
            u = torch.from_numpy(uniforms(seed, [i], [t]))
            assert int(nucleus_draw(logits[i, t:t + 1], u, 1.0, 0.9)[0]) == int(ro.r_ids[i, t])
            drawn += 1
    assert drawn > len(CONDITIONS)
    if kind == "causal":  # PEFT's own forward on an unpadded row agrees with ours
        i = max(range(len(CONDITIONS)), key=lambda j: int(ro.q_mask[j].sum()))
        n = int(ro.r_mask[i].sum())
        ids = torch.cat([ro.q_ids[i], ro.r_ids[i, :n]])[None]
        peft_logits = model(input_ids=ids).logits[0, -n - 1 : -1] / 0.7
        torch.testing.assert_close(logits[i, :n], peft_logits, atol=1e-4, rtol=1e-4)


def test_ppo_learns_causal_prompt():
    tok = tiny_tokenizer()
    cfg = ppo_config(lr=0.1, batch_size=16, mini_batch_size=8, ppo_epochs=4, max_new_tokens=6, kl_coef=0.0, top_p=1.0,
                     vf_coef=0.5, seed=0)
    tr = SoftPromptPPO(tiny_causal_peft(len(tok)), tok, cfg, good_fraction)
    ref = tr.ref_prompt.clone()
    seen = []
    t0 = time.time()
    hist = tr.train(lambda n: [CONDITIONS[i % 3] for i in range(n)], 30, callback=lambda i, s: seen.append(i))
    first, last = sum(h["reward"] for h in hist[:5]) / 5, sum(h["reward"] for h in hist[-5:]) / 5
    print(f"ours causal: first5={first:.3f} last5={last:.3f} ({time.time() - t0:.1f}s)")
    assert last > first + 0.2, (first, last)
    assert seen == list(range(30))
    assert torch.equal(tr.ref_prompt, ref) and not torch.equal(tr.prompt_weight.detach(), ref)
    assert hist[-1]["kl"] > 0  # drifted away from the (frozen) step-1 prompt
    assert {"reward", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "policy_loss", "words"} <= set(hist[0])
    assert all(math.isfinite(v) for h in hist for v in h.values())


def test_only_prompt_and_value_head_train():
    tok = tiny_tokenizer()
    model = tiny_causal_peft(len(tok))
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    cfg = ppo_config(
        lr=0.1, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
        kl_coef=0.2, adaptive_kl=True, target_kl=0.01, kl_horizon=10,
    )
    tr = SoftPromptPPO(model, tok, cfg, lambda texts, conds, done: {"reward": [float(len(t)) for t in texts]})
    tr.step(CONDITIONS[:2] * 2)
    stats = tr.step(CONDITIONS[:2] * 2)
    for k, v in model.get_base_model().state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert stats["kl_coef"] != 0.2  # adaptive controller moved
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]


def test_same_seed_same_stats():
    tok = tiny_tokenizer()
    cfg = ppo_config(lr=0.1, batch_size=6, mini_batch_size=3, ppo_epochs=2, max_new_tokens=5, seed=7)
    runs = [
        SoftPromptPPO(tiny_causal_peft(len(tok)), tok, cfg, good_fraction).train(lambda n: CONDITIONS * 2, 2)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_seq2seq_smoke():
    tok = tiny_tokenizer()
    cfg = ppo_config(lr=0.1, batch_size=6, mini_batch_size=3, ppo_epochs=2, max_new_tokens=5, top_p=0.9, seed=1)
    # a reward that varies between responses (length in words): "good" may never be sampled in 3 updates,
    # and with every reward 0 (and a zero-initialised value head) PPO has nothing to move the prompt by
    tr = SoftPromptPPO(tiny_t5_peft(len(tok)), tok, cfg, lambda texts, conds, done: {
        "reward": [float(len(t.split())) for t in texts]})
    hist = tr.train(lambda n: CONDITIONS * (n // 3), 3)
    assert len(hist) == 3 and all(math.isfinite(v) for h in hist for v in h.values())
    assert not torch.equal(tr.prompt_weight.detach(), tr.ref_prompt)


def test_ppo_with_compute_rewards():
    """The stage's wiring: conditions map to labels, compute_rewards scores the decoded texts."""
    import numpy as np

    from retrikt.rl.rewards import RewardWeights, compute_rewards

    tok = tiny_tokenizer()
    label_of = {"label positive text": 1, "label negative": 0, "review": 0}

    def reward_fn(texts, conditions, finished=None):
        parse = lambda t: {"text": t} if t else None  # noqa: E731
        probs = lambda ex: np.tile([0.3, 0.7], (len(ex), 1))  # noqa: E731
        return compute_rewards(texts, [label_of[c] for c in conditions], parse, probs, RewardWeights(), (2, 4))

    cfg = ppo_config(batch_size=6, mini_batch_size=3, max_new_tokens=5)
    tr = SoftPromptPPO(tiny_causal_peft(len(tok)), tok, cfg, reward_fn)
    stats = tr.step(CONDITIONS * 2)
    assert {"confidence", "diversity", "length_penalty", "parse_fail", "mean_confidence"} <= set(stats)
    assert 0.0 <= stats["confidence"] <= 0.7


def test_forced_field_names_are_context_not_actions(tiny_causal_dir):
    """With structured decoding the sampler writes each line's field name: those tokens are attended to
    but left out of what the policy is trained and penalised on."""
    from retrikt.llm import attach_prompt, source_text
    from retrikt.models import load_generator
    from retrikt.sampling import field_name_tokens
    from retrikt.tasks import get_task

    cb = get_task("cb")
    model, tok = load_generator(tiny_causal_dir)
    pm = attach_prompt(model, 3, "random", "", tiny_causal_dir)
    names = ("premise", "hypothesis")
    tr = SoftPromptPPO(pm, tok, ppo_config(max_new_tokens=12, dtype="float32", batch_size=4, mini_batch_size=2),
                       lambda texts, conds, done: {"reward": [1.0] * len(texts)}, stop_lines=2, field_names=names)
    conds = [source_text(cb, i % 3) for i in range(4)]
    ro = tr.generate(conds)
    first = field_name_tokens(tok, names)[0]
    for i in range(4):
        assert ro.r_ids[i, :len(first)].tolist() == first
        assert ro.r_mask[i, :len(first)].all() and not ro.act_mask[i, :len(first)].any()
    assert (ro.act_mask <= ro.r_mask).all() and ro.act_mask.sum() > 0
    stats = tr.step(conds)
    assert math.isfinite(stats["policy_loss"]) and math.isfinite(stats["kl"])


def test_first_minibatch_ratio_is_exactly_one_and_padding_is_not_computed(monkeypatch):
    """The old log-probs come from the same minibatch forwards as the first training steps (ratio 1 to
    the bit), and a forward only computes up to its rows' longest response."""
    import retrikt.rl.ppo as ppo_mod

    tok = tiny_tokenizer()
    cfg = ppo_config(lr=0.1, batch_size=6, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8, kl_coef=0.1, seed=0)
    tr = SoftPromptPPO(tiny_causal_peft(len(tok)), tok, cfg, good_fraction)
    ratios, widths = [], []
    real_loss, real_forward = ppo_mod.ppo_policy_loss, tr._forward

    def spy_loss(logp, old, adv, mask, clip):
        ratios.append(((logp - old) * mask).abs().max().item())
        return real_loss(logp, old, adv, mask, clip)

    def spy_forward(prompt, ro, idx=slice(None)):
        out = real_forward(prompt, ro, idx)
        widths.append((out[0].shape[1], int(ro.r_mask[idx].sum(1).max())))
        return out

    monkeypatch.setattr(ppo_mod, "ppo_policy_loss", spy_loss)
    monkeypatch.setattr(tr, "_forward", spy_forward)
    tr.step([CONDITIONS[i % 3] for i in range(6)])
    assert ratios[0] == 0.0  # exp(0) = 1: the first step sees the behaviour policy itself
    assert max(ratios[3:]) > 0  # later steps see the moved prompt
    assert all(w == longest for w, longest in widths)
