"""retrikt.llm on the tiny causal (Llama) and seq2seq (T5) models: batches, soft prompt, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from retrikt.llm import (
    IGNORE,
    attach_prompt,
    load_with_prompt,
    nll,
    sample,
    sample_full,
    source_text,
    target_text,
    token_nll,
    tokenize_for_training,
)
from retrikt.models import load_generator
from retrikt.tasks import get_task

CB = get_task("cb")
ROWS = [{"premise": "the cat sat on the mat .", "hypothesis": "a cat is sitting .", "label": 0},
        {"premise": "it rained all day .", "hypothesis": "the ground is dry .", "label": 1}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash


@pytest.fixture(params=["causal", "seq2seq"])
def gen_dir(request, tiny_causal_dir, tiny_seq2seq_dir):
    return tiny_causal_dir if request.param == "causal" else tiny_seq2seq_dir


def _texts(rows=ROWS):
    return [source_text(CB, r["label"]) for r in rows], [target_text(CB, r) for r in rows]


def test_texts_are_plain_condition_and_serialisation():
    src, tgt = _texts()
    assert src[0] == CB.condition(0) and "Label: entailment" in src[0]
    assert tgt[0] == "premise: the cat sat on the mat .\nhypothesis: a cat is sitting ."


def test_tokenize_causal_masks_source_and_padding(tiny_causal_dir):
    _, tok = load_generator(tiny_causal_dir)
    src, tgt = _texts()
    b = tokenize_for_training(tok, src, tgt, max_length=128, seq2seq=False)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i in range(2):
        n_src = len(tok(src[i])["input_ids"])
        n_tgt = len(tok(tgt[i], add_special_tokens=False)["input_ids"]) + 1
        real = int(b["attention_mask"][i].sum())
        assert real == n_src + n_tgt and b["attention_mask"][i, :real].all()  # right padding
        assert (b["labels"][i, :n_src] == IGNORE).all() and (b["labels"][i, real:] == IGNORE).all()
        assert b["labels"][i, n_src:real].tolist() == b["input_ids"][i, n_src:real].tolist()
        assert b["labels"][i, real - 1] == tok.eos_token_id
    # truncation cuts the target's end, never shifts the source
    short = tokenize_for_training(tok, src, tgt, max_length=len(tok(src[0])["input_ids"]) + 3, seq2seq=False)
    assert int((short["labels"][0] != IGNORE).sum()) == 3


def test_tokenize_seq2seq_source_in_target_out(tiny_seq2seq_dir):
    _, tok = load_generator(tiny_seq2seq_dir)
    src, tgt = _texts()
    b = tokenize_for_training(tok, src, tgt, max_length=128, seq2seq=True)
    for i in range(2):
        ids = tok(src[i])["input_ids"]
        assert b["input_ids"][i, :len(ids)].tolist() == ids and not b["attention_mask"][i, len(ids):].any()
        want = tok(tgt[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert b["labels"][i, :len(want)].tolist() == want and (b["labels"][i, len(want):] == IGNORE).all()


@pytest.mark.parametrize("init", ["text", "random"])
def test_attach_prompt_trains_only_the_prompt(gen_dir, init):
    model, tok = load_generator(gen_dir)
    pm = attach_prompt(model, 5, init, "Write a new example", gen_dir)
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert list(trainable) == ["prompt_encoder.default.embedding.weight"]
    assert trainable["prompt_encoder.default.embedding.weight"].shape == (5, model.config.get_text_config().hidden_size)
    src, tgt = _texts()
    batch = tokenize_for_training(tok, src, tgt, 64, seq2seq=model.config.is_encoder_decoder)
    loss, n = token_nll(pm, batch, model.config.is_encoder_decoder)
    loss.backward()
    assert n == int((batch["labels"] != IGNORE).sum())  # every target token (and EOS) is scored
    assert trainable["prompt_encoder.default.embedding.weight"].grad.abs().sum() > 0


def test_text_init_copies_token_embeddings(tiny_causal_dir):
    model, tok = load_generator(tiny_causal_dir)
    pm = attach_prompt(model, 3, "text", "the cat sat", tiny_causal_dir)
    ids = tok("the cat sat", add_special_tokens=False)["input_ids"][:3]
    want = model.get_input_embeddings().weight[ids]
    assert torch.allclose(pm.get_prompt(1)[0, :len(ids)], want)


def test_sample_is_deterministic_strings(gen_dir):
    model, tok = load_generator(gen_dir)
    pm = attach_prompt(model, 4, "text", "Write a new example", gen_dir)
    src = [source_text(CB, lab) for lab in (0, 1, 2, 0, 1)]
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, batch_size=2)
    a, b = sample(pm, tok, src, seed=7, **kw), sample(pm, tok, src, seed=7, **kw)
    assert a == b and len(a) == len(src) and all(isinstance(t, str) for t in a)
    assert sample(pm, tok, src, seed=8, **kw) != a
    assert all(t == t.strip() and tok.eos_token not in t for t in a)
    full = sample_full(pm, tok, src, seed=7, **kw)
    assert full.texts == a and len(full.finished) == len(src)
    assert 12 * full.finished.count(False) <= full.tokens <= 12 * len(src)  # unfinished rows used all 12


def test_batched_sampling_equals_one_by_one(gen_dir):
    """Left padding (causal) with position ids from the mask: a row's output does not depend on its batch."""
    model, tok = load_generator(gen_dir)
    torch.manual_seed(0)
    for p in model.parameters():  # peaky logits, so greedy output is not just special tokens
        p.data.normal_(0, 0.3)
    pm = attach_prompt(model, 4, "random", "", gen_dir)
    src = [source_text(CB, lab) for lab in (0, 1, 2)] + ["premise: the cat"]
    greedy = dict(max_new_tokens=8, temperature=1.0, top_p=1e-9)  # nucleus of one token = argmax
    batched = sample(pm, tok, src, batch_size=len(src), seed=0, **greedy)
    alone = [sample(pm, tok, [s], batch_size=1, seed=0, **greedy)[0] for s in src]
    assert batched == alone and any(batched)


def test_load_with_prompt_round_trips(gen_dir, tmp_path):
    model, tok = load_generator(gen_dir)
    torch.manual_seed(1)
    pm = attach_prompt(model, 4, "random", "", gen_dir)
    pm.save_pretrained(tmp_path / "adapter")
    loaded, tok2 = load_with_prompt(gen_dir, tmp_path / "adapter")
    assert torch.equal(loaded.get_prompt(1), pm.get_prompt(1))
    assert not any(p.requires_grad for p in loaded.parameters())
    src = [source_text(CB, lab) for lab in (0, 1, 2)]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, batch_size=2, seed=3)
    assert sample(loaded, tok2, src, **kw) == sample(pm, tok, src, **kw)
    trainable, _ = load_with_prompt(gen_dir, tmp_path / "adapter", trainable=True)
    trainable_names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert trainable_names == ["prompt_encoder.default.embedding.weight"]


def test_nll_is_the_token_mean(gen_dir):
    model, tok = load_generator(gen_dir)
    pm = attach_prompt(model, 4, "text", "Write a new example", gen_dir)
    seq2seq = model.config.is_encoder_decoder
    src, tgt = _texts()
    value = nll(pm, tok, src, tgt, 64, batch_size=1, seq2seq=seq2seq)
    with torch.no_grad():
        sums = [token_nll(pm, tokenize_for_training(tok, [s], [t], 64, seq2seq), seq2seq) for s, t in zip(src, tgt)]
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(sum(float(s) for s, _ in sums) / sum(n for _, n in sums), rel=1e-5)
    assert nll(pm, tok, src, tgt, 64, batch_size=2, seq2seq=seq2seq) == pytest.approx(value, rel=1e-4)
