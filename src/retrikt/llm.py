"""The frozen LLM (the generator) with its soft prompt, a library shared by the prompt_tune, rl and generate
stages: texts, batches, loading the LLM + soft prompt, sampling. (The generate *stage* is
:mod:`retrikt.generate`.)

The generator (a frozen causal or seq2seq Hugging Face LM) reads ``[soft prompt; source]`` and writes
``target``:

* source = ``task.condition(label)`` — plain text naming the task and the label. No chat template:
  the learned soft prompt is the instruction, the same text works for causal and seq2seq models
  (and for the rl stage, which tokenises the same string), and a template's fixed system turn
  would only spend context on every sample.
* target = ``task.serialise(ex)`` (``field: value`` lines) followed by the tokenizer's EOS token, so
  the tuned prompt teaches the model where an example ends.

Tokens: the source is tokenised with the tokenizer's own special tokens (as ``tok(source)`` does,
e.g. a BOS for some models, ``</s>`` for T5 encoders), the target without them, then EOS is appended.
Source and target are tokenised separately, so the training tokens are exactly what sampling sees.

Padding: training batches (and :func:`nll`) are right-padded, so every real token keeps the
position it has when the prompt is followed directly by the text. Sampling (:mod:`retrikt.sampling`)
numbers the virtual tokens ``0..V-1`` and the text from ``V`` on too, with no padding at all.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from retrikt.device import to_device
from retrikt.models import ensure_pad_token, load_generator
from retrikt.tasks import Task

IGNORE = -100  # label id ignored by the loss
# ``max_new_tokens: auto`` = ceil(LENGTH_MARGIN x the LENGTH_PERCENTILE-th percentile) of the task's train
# serialisations in generator tokens, EOS included (see length_budget)
LENGTH_PERCENTILE = 99
LENGTH_MARGIN = 1.1


def source_text(task: Task, label: int) -> str:
    """The generator input for a label: the task's conditioning text (ends with a newline)."""
    return task.condition(label)


def label_prior(rows: Sequence[dict], num_labels: int) -> list[float]:
    """The share of each label among ``rows``."""
    counts = Counter(r["label"] for r in rows)
    return [counts[lab] / max(1, len(rows)) for lab in range(num_labels)]


LABEL_DRAWS = ("balanced", "uniform", "prior")


def draw_labels(rng: np.random.Generator, n: int, num_labels: int, how: str,
                prior: Sequence[float] | None = None) -> list[int]:
    """``n`` conditioning labels from ``rng``: ``balanced`` (equal counts, the remainder to the first
    labels, shuffled), or drawn i.i.d. ``uniform`` or from ``prior`` (normalised here)."""
    if how == "balanced":
        labels = [lab for lab in range(num_labels) for _ in range(n // num_labels + (lab < n % num_labels))]
        return [int(x) for x in rng.permutation(labels)]
    if how not in LABEL_DRAWS:
        raise ValueError(f"unknown label draw {how!r}; expected one of {', '.join(LABEL_DRAWS)}")
    p = None
    if how == "prior":
        p = np.asarray(prior, dtype=float)
        p = p / p.sum()
    return [int(x) for x in rng.choice(num_labels, size=n, p=p)]


def target_text(task: Task, ex: Mapping[str, Any]) -> str:
    """What the generator should write for ``ex``; EOS is appended at tokenisation."""
    return task.serialise(ex)


def eos_id(tok) -> int:
    if tok.eos_token_id is None:
        raise ValueError("the generator's tokenizer has no EOS token; the generator cannot learn to stop")
    return int(tok.eos_token_id)


def tokenize_for_training(tok, sources: Sequence[str], targets: Sequence[str], max_length: int,
                          seq2seq: bool) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE where no loss).

    Causal: input = source + target + EOS (cut to ``max_length``, the target's end first); labels are
    the target and EOS tokens, IGNORE on the source and the padding. Seq2seq: input = source (cut to
    ``max_length``), labels = target + EOS (cut to ``max_length``), IGNORE on padding.
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    eos = eos_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    src = tok(list(sources))["input_ids"]
    tgt = [t + [eos] for t in tok(list(targets), add_special_tokens=False)["input_ids"]]
    if seq2seq:
        inputs = [s[:max_length] for s in src]
        labels = [t[:max_length] for t in tgt]
    else:
        inputs = [(s + t)[:max_length] for s, t in zip(src, tgt)]
        labels = [([IGNORE] * len(s) + t)[:max_length] for s, t in zip(src, tgt)]

    def pad_to(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    return {"input_ids": pad_to(inputs, pad), "attention_mask": pad_to([[1] * len(r) for r in inputs], 0),
            "labels": pad_to(labels, IGNORE)}


def load_tokenizer(generator_dir: str | Path):
    """The generator's tokenizer alone (no weights), with a pad token as :func:`load_generator` sets."""
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(str(generator_dir)))


def target_lengths(tok, task: Task, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Generator tokens of each row's target (its serialisation + EOS): what sampling must produce."""
    return [len(ids) + 1 for ids in tok([target_text(task, r) for r in rows], add_special_tokens=False)["input_ids"]]


def length_budget(value: int | str, tok, task: Task, rows: Sequence[Mapping[str, Any]]) -> int:
    """``max_new_tokens`` for sampling: an int as given, or ``"auto"`` = ceil(LENGTH_MARGIN x the
    LENGTH_PERCENTILE-th percentile of :func:`target_lengths` over ``rows``), so that almost every
    real example of the task would fit, with room to spare."""
    if value != "auto":
        return int(value)
    import numpy as np

    if not rows:
        raise ValueError(f"{task.name}: no train rows to size max_new_tokens: auto from")
    return int(np.ceil(LENGTH_MARGIN * np.percentile(target_lengths(tok, task, rows), LENGTH_PERCENTILE)))


def attach_prompt(model, num_virtual_tokens: int, init: str, init_text: str,
                  tokenizer_path: str | Path) -> PeftModel:
    """Wrap a frozen generator with a trainable PEFT soft prompt (init ``"text"`` or ``"random"``).

    Text init copies the embeddings of ``init_text``'s tokens (repeated or cut to fill the prompt);
    random init draws from torch's global RNG, so seed it first. Seq2seq: the prompt precedes the
    encoder input only (``num_transformer_submodules=1``; PEFT's default of 2 would also prefix the
    decoder in training, which its ``generate`` then never does).
    """
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        num_transformer_submodules=1,
        prompt_tuning_init=PromptTuningInit.TEXT if init == "text" else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=init_text if init == "text" else None,
        tokenizer_name_or_path=str(tokenizer_path) if init == "text" else None,
    )
    return get_peft_model(model, config)


def load_with_prompt(generator_dir: str | Path, adapter_dir: str | Path, trainable: bool = False,
                     device: "torch.device | str" = "cpu"):
    """``(peft_model, tokenizer)``: the frozen generator with a saved soft prompt (trainable if asked), on ``device``.

    PEFT refuses ``is_trainable=True`` for prompt-learning adapters, so the prompt is loaded frozen
    and its embedding unfrozen here (the base model stays frozen either way).
    """
    model, tok = load_generator(generator_dir, device)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), torch_device=str(model.device))
    peft_model.requires_grad_(False)
    if trainable:
        peft_model.prompt_encoder.requires_grad_(True)
    else:
        peft_model.eval()
    return peft_model, tok


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own train/eval flag restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _num_virtual(model) -> int:
    return int(model.active_peft_config.num_virtual_tokens) if isinstance(model, PeftModel) else 0


def target_token_nll(model, batch: Mapping[str, torch.Tensor], seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, labels)``, both flat over a :func:`tokenize_for_training` batch (moved to the model's device
    first): each position's NLL of its label token, 0 where the label is IGNORE."""
    batch = to_device(batch, model.device)
    labels = batch["labels"]
    if seq2seq:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, _num_virtual(model):][:, :-1]  # position t predicts token t + 1
        labels = labels[:, 1:]
    flat = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat,
                                             ignore_index=IGNORE, reduction="none")
    return loss, flat


def token_nll(model, batch: Mapping[str, torch.Tensor], seq2seq: bool) -> tuple[torch.Tensor, int]:
    """(summed token NLL, number of target tokens) of a :func:`tokenize_for_training` batch."""
    loss, labels = target_token_nll(model, batch, seq2seq)
    return loss.sum(), int((labels != IGNORE).sum())


@torch.no_grad()
def nll(model, tok, sources: Sequence[str], targets: Sequence[str], max_length: int, batch_size: int,
        seq2seq: bool) -> float:
    """Mean NLL per target token (EOS included) of ``targets`` given ``sources``, in eval mode."""
    total, count = 0.0, 0
    with _eval_mode(model):
        for i in range(0, len(sources), batch_size):
            batch = tokenize_for_training(tok, sources[i:i + batch_size], targets[i:i + batch_size], max_length,
                                          seq2seq)
            s, n = token_nll(model, batch, seq2seq)
            total, count = total + float(s), count + n
    return total / max(count, 1)


@dataclass
class Samples:
    """What :func:`sample_full` returns: texts, how each ended, generated token count."""

    texts: list[str]
    ended: list[str]  # "eos" | "lines" (cut at its last line) | "budget" (stopped by max_new_tokens)
    tokens: int  # generated tokens, EOS included, padding not

    @property
    def finished(self) -> list[bool]:
        """Whether each sample ended by itself (EOS) or at its last line, i.e. was not cut by the budget."""
        return [e != "budget" for e in self.ended]


def sample(model, tok, sources: Sequence[str], *, max_new_tokens: int, temperature: float, top_p: float,
           batch_size: int, seed: int, dtype: str = "float32") -> list[str]:
    """One sampled continuation per source (see :func:`sample_full`), decoded text only."""
    return sample_full(model, tok, sources, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       batch_size=batch_size, seed=seed, dtype=dtype).texts


def sample_full(model, tok, sources: Sequence[str], *, max_new_tokens: int, temperature: float, top_p: float,
                batch_size: int, seed: int, dtype: str = "float32", stop_lines: int | None = None,
                field_names: Sequence[str] | None = None, on_done=None) -> Samples:
    """One sampled continuation per source: temperature + nucleus sampling (no top-k), decoded.

    ``model`` is a PEFT prompt-tuning model (or a bare generator). ``batch_size`` is the number of
    decode slots and ``dtype`` the compute dtype of :func:`retrikt.sampling.draw_samples`: the text of
    sample ``i`` is a function of ``seed``, ``i`` and its source (not of the batch size), for a given
    device and dtype. Texts stop at the first EOS, or with ``stop_lines`` at the line break after
    that many lines (a task serialisation of that many lines is complete there); ``field_names``
    are written for the model at the start of each line. Special tokens are stripped.
    """
    from retrikt.sampling import decode, draw_samples

    drawn = draw_samples(model, tok, sources, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         seed=seed, slots=batch_size, dtype=dtype, stop_lines=stop_lines, field_names=field_names,
                         on_done=on_done)
    return Samples([decode(tok, d) for d in drawn], [d.ended for d in drawn],
                   sum(len(d.ids) + (d.ended == "eos") for d in drawn))
