"""PPO for a soft prompt (RetriKT step 2): only the prompt embeddings and a value head are trained.

The generator (causal or seq2seq Hugging Face model) is wrapped with PEFT prompt tuning and stays
frozen. Every log-prob PPO uses goes through one function, :meth:`SoftPromptPPO._context`, that
prepends the virtual-token embeddings to the embedded condition exactly like PEFT does (causal:
before the whole input; seq2seq: before the encoder input; PEFT prompt tuning never feeds the
decoder), with the base model in its own dtype (``rl.dtype``; log-probs in float32). Rollouts are
drawn by the project's sampler (:mod:`retrikt.sampling`, seeded per call); the "old" log-probs are
then recomputed by the same forward as the training ones: the rows of each first-epoch minibatch
together, cut to their longest response (padding columns are never computed), so the first PPO
ratio is exactly 1.
With structured decoding (forced field names) the written names are context, not actions: they are
left out of the KL penalty, the policy loss and the entropy. (Where the sampler ruled out EOS, the
policy's log-prob is still that of the unconstrained distribution: a small, documented mismatch.)

Reference policy: the same frozen base model with a frozen copy of the initial (step-1) prompt
tensor swapped in; no second model is kept.
Value head: ``Linear(hidden_size, 1)`` over the generator's last hidden state (the decoder's for
seq2seq) at the position that predicts each response token, on detached features, so the value
loss trains the head only and never moves the prompt.
Rewards per token: ``-kl_coef * (logp - ref_logp)`` at every response token plus the scalar
score at the last response token (the EOS if one was sampled), then GAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrikt.params import RLParams

RewardFn = Callable[[list[str], list[str]], dict[str, Any]]
"""``reward_fn(texts, conditions, finished) -> {"reward": [float] * n, **optional components to log}``;
``finished[i]`` says whether response i ended by itself (EOS or its last line), not by the token budget
(None: unknown)."""


# --------------------------------------------------------------------------------------- math
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over ``dim`` or everything)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance over the masked positions (masked ones -> 0)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over token sequences ``[B, T]``.

    ``mask`` marks the response tokens, a left-aligned prefix of each row: the state after the
    last valid token is terminal (value 0). Returns ``(advantages, returns = advantages + values)``,
    both 0 at masked positions and detached.
    """
    rewards, values = rewards * mask, values * mask
    last = torch.zeros_like(rewards[:, 0])
    advs = []
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        advs.append(last)
    adv = torch.stack(advs[::-1], dim=1) * mask
    return adv.detach(), (adv + values).detach()


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate ``mean(max(-A r, -A clip(r, 1-c, 1+c)))`` over masked tokens; also the clip fraction."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    return loss, masked_mean((pg2 > pg1).float(), mask).detach()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_value: float
) -> torch.Tensor:
    """Clipped value loss ``0.5 * mean(max((v - R)^2, (old + clip(v - old, -c, c) - R)^2))``."""
    clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalty_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, coef: float
) -> torch.Tensor:
    """Per-token reward ``-coef * (logp - ref_logp)`` (sampled-token KL estimate), 0 where masked."""
    return -coef * (logprobs - ref_logprobs) * mask


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens of the entropy of ``softmax(logits)`` (logits ``[B, T, V]``)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient (Ziegler et al., 2019): steer the per-sequence KL towards ``target``."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon


# ------------------------------------------------------------------------------------ trainer
@dataclass(frozen=True)
class PPOConfig:
    """What :class:`SoftPromptPPO` reads: the ``rl`` params themselves (params.yaml holds every value;
    nothing is copied or defaulted here) and the run's seed. ``rl.value_lr`` null means ``rl.lr``."""

    rl: RLParams
    seed: int


@dataclass
class Rollout:
    """One batch of sampled responses and what PPO needs about them (all ``[B, T]`` but queries)."""

    q_ids: torch.Tensor
    q_mask: torch.Tensor
    r_ids: torch.Tensor
    r_mask: torch.Tensor
    texts: list[str]
    finished: list[bool] | None = None  # whether each response ended by itself (EOS or its last line)
    act_mask: torch.Tensor | None = None  # r_mask without the tokens the sampler wrote (field names)
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip (left) padding: virtual tokens at 0..V-1, real tokens after."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class SoftPromptPPO:
    """PPO on the soft prompt of a PEFT prompt-tuning model (causal or seq2seq generator).

    ``model`` is a ``PeftModelForCausalLM`` / ``PeftModelForSeq2SeqLM`` whose active adapter is a
    prompt-tuning prompt (the step-1 prompt); it is trained in place, so ``model.save_pretrained``
    saves the RL-tuned prompt. ``reward_fn(texts, conditions)`` scores decoded responses.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: PPOConfig, reward_fn: RewardFn,
                 stop_lines: int | None = None, field_names: Sequence[str] | None = None) -> None:
        self.model, self.tok, self.reward_fn = model, tokenizer, reward_fn
        self.stop_lines, self.field_names = stop_lines, field_names
        self.cfg = cfg = config.rl
        self.base = model.get_base_model()
        self.embed = self.base.get_input_embeddings()
        self.seq2seq = bool(getattr(self.base.config, "is_encoder_decoder", False))
        self.n_virtual = model.active_peft_config.num_virtual_tokens
        self.prompt_weight: nn.Parameter = model.prompt_encoder[model.active_adapter].embedding.weight
        self.prompt_weight.requires_grad_(True)
        self.ref_prompt = self.prompt_weight.detach().clone()  # frozen step-1 prompt = reference policy
        self.device = self.prompt_weight.device
        for p in self.base.parameters():
            p.requires_grad_(False)
        model.eval()  # no dropout: old / new / reference log-probs must be comparable
        self.value_head = nn.Linear(self.base.config.get_text_config().hidden_size, 1).to(self.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.optimizer = torch.optim.Adam(
            [
                {"params": [self.prompt_weight], "lr": cfg.lr},
                {"params": self.value_head.parameters(), "lr": cfg.value_lr or cfg.lr},
            ]
        )
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token to end responses")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.start_id = getattr(self.base.config, "decoder_start_token_id", None)
        if self.start_id is None:
            self.start_id = self.pad_id
        self.seed, self._calls = config.seed, 0
        self._shuffle_gen = torch.Generator().manual_seed(config.seed + 1)
        self.n_updates = 0

    # ---------------------------------------------------------------------------- policy pieces
    def _encode(self, conditions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise conditions; left-pad for causal generators, right-pad for seq2seq encoders."""
        seqs = [self.tok(c)["input_ids"] for c in conditions]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if self.seq2seq else slice(width - len(s), width)
            ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
        return ids.to(self.device), mask.to(self.device)

    def _context(
        self, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[virtual tokens; embedded ids]`` and its attention mask (as PEFT prompt tuning does)."""
        emb = self.embed(ids)
        virt = prompt[: self.n_virtual].to(emb.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
        ones = torch.ones(ids.shape[0], self.n_virtual, dtype=mask.dtype, device=mask.device)
        return torch.cat([virt, emb], dim=1), torch.cat([ones, mask], dim=1)

    def rollout_seed(self) -> int:
        """The sampler seed of the latest :meth:`generate` call: the run's seed and the call's number."""
        return self.seed * 1_000_003 + self._calls

    @torch.no_grad()
    def generate(self, conditions: Sequence[str]) -> Rollout:
        """Sample one response per condition with the current prompt (:func:`retrikt.sampling.draw_samples`,
        compute dtype ``rl.dtype``); the log-probs PPO uses are recomputed by :meth:`_forward` in float32.
        Each call draws from its own seeded stream (the run's seed and the call's number)."""
        from retrikt.sampling import decode, draw_samples

        q_ids, q_mask = self._encode(conditions)
        self._calls += 1
        drawn = draw_samples(self.model, self.tok, list(conditions), max_new_tokens=self.cfg.max_new_tokens,
                             temperature=self.cfg.temperature, top_p=self.cfg.top_p, seed=self.rollout_seed(),
                             slots=len(conditions), dtype=self.cfg.dtype, stop_lines=self.stop_lines,
                             field_names=self.field_names)
        rows = [d.ids + [self.eos_id] * (d.ended == "eos") for d in drawn]
        width = max(1, max(len(r) for r in rows))
        r_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        r_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            r_ids[i, :len(r)], r_mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
        act_mask = r_mask.clone()
        for i, d in enumerate(drawn):
            act_mask[i, d.forced_at] = 0
        texts = [decode(self.tok, d) for d in drawn]
        return Rollout(q_ids, q_mask, r_ids.to(self.device), r_mask.to(self.device), texts,
                       finished=[d.finished for d in drawn], act_mask=act_mask.to(self.device))

    def _forward(
        self, prompt: torch.Tensor, ro: Rollout, idx: slice | torch.Tensor = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature-scaled logits ``[b, t, V]`` and last hidden states ``[b, t, H]`` at the
        positions predicting each response token (rows ``idx`` of the rollout), ``t`` the longest
        response among those rows (responses are right-padded: the columns cut are padding in every row)."""
        q_ids, q_mask, r_ids, r_mask = ro.q_ids[idx], ro.q_mask[idx], ro.r_ids[idx], ro.r_mask[idx]
        t = max(int(r_mask.sum(1).max()), 1)
        r_ids, r_mask = r_ids[:, :t], r_mask[:, :t]
        emb, am = self._context(prompt, q_ids, q_mask)
        if self.seq2seq:
            start = torch.full_like(r_ids[:, :1], self.start_id)
            out = self.base(
                inputs_embeds=emb, attention_mask=am, decoder_input_ids=torch.cat([start, r_ids[:, :-1]], 1),
                output_hidden_states=True,
            )
            logits, hidden = out.logits, out.decoder_hidden_states[-1]
        else:
            full_am = torch.cat([am, r_mask], dim=1)
            out = self.base(
                inputs_embeds=torch.cat([emb, self.embed(r_ids)], dim=1), attention_mask=full_am,
                position_ids=_positions(full_am), output_hidden_states=True, logits_to_keep=t + 1,
            )
            logits, hidden = out.logits[:, :t], out.hidden_states[-1][:, -t - 1 : -1]
        return logits.float() / self.cfg.temperature, hidden

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.detach().float()).squeeze(-1)

    @staticmethod
    def _logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(F.log_softmax(logits, dim=-1), 2, ids.unsqueeze(-1)).squeeze(-1)

    # ------------------------------------------------------------------------------- PPO update
    def step(self, conditions: Sequence[str]) -> dict[str, float]:
        """One PPO update: rollout on ``conditions``, score, GAE, ``ppo_epochs`` over minibatches."""
        cfg, conditions = self.cfg, list(conditions)
        ro = self.generate(conditions)
        scored = self.reward_fn(ro.texts, conditions, ro.finished)
        score = torch.tensor(scored["reward"], dtype=torch.float, device=self.device)
        # mask: every response token (the states GAE and the value head see); act: the tokens the policy
        # chose — not the field names the sampler wrote for it — which the KL penalty, the policy loss,
        # the advantage whitening and the entropy count
        mask = ro.r_mask.float()
        act = (ro.act_mask if ro.act_mask is not None else ro.r_mask).float()
        n = len(conditions)
        perms = [torch.randperm(n, generator=self._shuffle_gen).to(self.device) for _ in range(cfg.ppo_epochs)]
        minibatches = [[perm[s : s + cfg.mini_batch_size] for s in range(0, n, cfg.mini_batch_size)] for perm in perms]
        ro.logprobs, ro.ref_logprobs, ro.values = (torch.zeros(mask.shape, device=self.device) for _ in range(3))
        with torch.no_grad():  # in the first epoch's minibatches: the same forwards as its training steps
            for mb in minibatches[0]:
                logits, hidden = self._forward(self.prompt_weight, ro, mb)
                t = logits.shape[1]
                ro.logprobs[mb, :t], ro.values[mb, :t] = self._logprobs(logits, ro.r_ids[mb, :t]), self._values(hidden)
                ro.ref_logprobs[mb, :t] = self._logprobs(self._forward(self.ref_prompt, ro, mb)[0], ro.r_ids[mb, :t])
                del logits, hidden
        rewards = kl_penalty_rewards(ro.logprobs, ro.ref_logprobs, act, self.kl_ctl.value)
        last = (ro.r_mask.sum(1) - 1).clamp(min=0)
        rewards[torch.arange(len(last), device=last.device), last] += score
        adv, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, act)

        log: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [], "entropy": []}
        for epoch_minibatches in minibatches:
            for mb in epoch_minibatches:
                logits, hidden = self._forward(self.prompt_weight, ro, mb)
                t = logits.shape[1]
                m, a = mask[mb, :t], act[mb, :t]
                logp = self._logprobs(logits, ro.r_ids[mb, :t])
                pg, clip_frac = ppo_policy_loss(logp, ro.logprobs[mb, :t], adv[mb, :t], a, cfg.clip)
                vl = value_loss(self._values(hidden), ro.values[mb, :t], returns[mb, :t], m, cfg.clip_value)
                self.optimizer.zero_grad(set_to_none=True)
                (pg + cfg.vf_coef * vl).backward()
                nn.utils.clip_grad_norm_([self.prompt_weight], cfg.max_grad_norm)
                nn.utils.clip_grad_norm_(self.value_head.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    ent = entropy_from_logits(logits, a)
                for k, v in zip(log, (pg, vl, clip_frac, ent)):
                    log[k].append(float(v.detach()))

        kl = float(((ro.logprobs - ro.ref_logprobs) * act).sum(1).mean())  # per-sequence KL
        stats = {"reward": float(score.mean()), "kl": kl, "kl_coef": self.kl_ctl.value}
        stats.update({k: float(np.mean(v)) for k, v in log.items()})
        stats["response_length"] = float(mask.sum(1).mean())
        for k, v in scored.items():  # pass numeric components through (lists -> batch mean)
            arr = np.asarray(v)
            if k != "reward" and arr.dtype.kind in "biuf" and arr.size:
                stats[k] = float(arr.mean())
        self.kl_ctl.update(kl, n)
        self.n_updates += 1
        return stats

    def train(
        self,
        condition_sampler: Callable[[int], list[str]],
        num_updates: int,
        callback: Callable[[int, dict[str, float]], Any] | None = None,
    ) -> list[dict[str, float]]:
        """``num_updates`` PPO steps on ``condition_sampler(batch_size)``; ``callback(update, stats)`` after each."""
        history = []
        for _ in range(num_updates):
            stats = self.step(condition_sampler(self.cfg.batch_size))
            history.append(stats)
            if callback is not None:
                callback(self.n_updates - 1, stats)
        return history
