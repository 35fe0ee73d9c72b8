"""The fast sampler: counter-based randomness, exact nucleus sampling, our Llama decode step, slot refill."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrikt.llm import attach_prompt, source_text
from retrikt.models import load_generator
from retrikt.sampling import (
    LlamaDecoder,
    _generic_loop,
    _prefix_embeds,
    _Rules,
    decode,
    draw_samples,
    field_name_tokens,
    line_breaks,
    nucleus_draw,
    uniforms,
    uses_fast_path,
)
from retrikt.tasks import get_task

from .conftest import fit_tiny_generator

CB = get_task("cb")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_uniforms_are_a_pure_function_of_seed_id_and_step():
    a = uniforms(3, [0, 1, 2, 3], [0, 0, 5, 7])
    assert a.shape == (4,) and ((a >= 0) & (a < 1)).all()
    # each value depends on its own (seed, id, step) only, not on its neighbours in the call
    assert uniforms(3, [2], [5])[0] == a[2] and uniforms(3, [3, 9], [7, 1])[0] == a[3]
    assert uniforms(4, [2], [5])[0] != a[2] and uniforms(3, [2], [6])[0] != a[2]
    many = uniforms(0, np.arange(20000), 0)
    assert abs(many.mean() - 0.5) < 0.01 and len(np.unique(many)) == 20000


def _reference_draw(logits: torch.Tensor, u: float, temperature: float, top_p: float) -> int:
    """Top-p by a full stable sort, as written in the docstring: keep tokens until the mass reaches top_p."""
    p = F.softmax(logits.double() / temperature, -1)
    ps, idx = p.sort(descending=True, stable=True)
    cum = ps.cumsum(0)
    keep = (cum - ps) < top_p
    ps = ps * keep
    c = ps.cumsum(0)
    j = int((c <= u * c[-1]).sum().clamp(max=int(keep.sum()) - 1))
    return int(idx[j])


@pytest.mark.parametrize("scale", [0.1, 3.0, 20.0])  # flat (wide nucleus: escalation and full sort) to peaky
def test_nucleus_draw_equals_a_full_sort(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 5000, generator=g) * scale
    u = torch.from_numpy(uniforms(1, range(40), 0))
    for temperature, top_p in ((1.0, 0.95), (0.7, 0.5), (1.3, 0.99)):
        got = nucleus_draw(logits, u, temperature, top_p, prefilter=16).tolist()
        want = [_reference_draw(logits[i], float(u[i]), temperature, top_p) for i in range(40)]
        assert got == want


def test_nucleus_draw_keeps_the_crossing_token_and_top_p_one_samples_everything():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    # mass 0.5 < 0.6, so the second token (which crosses 0.6) is in the nucleus; the third never is
    drawn = {int(nucleus_draw(logits, torch.tensor([u]), 1.0, 0.6)[0]) for u in np.linspace(0, 0.999, 50)}
    assert drawn == {0, 1}
    drawn = {int(nucleus_draw(logits, torch.tensor([u]), 1.0, 1.0)[0]) for u in np.linspace(0, 0.999, 50)}
    assert drawn == {0, 1, 2}
    assert int(nucleus_draw(logits, torch.tensor([0.99]), 1.0, 1e-9)[0]) == 0  # tiny nucleus = argmax


def _tiny_gqa_llama(tmp_path, tiny_causal_dir):
    """The tiny Llama with grouped-query attention (4 query heads, 2 K/V heads) and peaky weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_causal_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(params=["mha", "gqa"])
def llama_dir(request, tmp_path, tiny_causal_dir):
    return tiny_causal_dir if request.param == "mha" else _tiny_gqa_llama(tmp_path, tiny_causal_dir)


def test_decoder_logits_equal_the_transformers_forward(llama_dir):
    model, tok = load_generator(llama_dir)
    pm = attach_prompt(model, 4, "random", "", llama_dir)
    emb = _prefix_embeds(pm, tok, source_text(CB, 1))
    n = emb.shape[0]
    with torch.no_grad():
        ref = model(inputs_embeds=emb[None]).logits[0]
        dec = LlamaDecoder(model, torch.float32, slots=3, max_len=n + 2)
        assert torch.allclose(dec.prefill(emb[: n - 1], 2), ref[n - 2], atol=1e-5)
        # the last position as a decode step of slot 2, beside two other slots at other positions
        ids = torch.tensor([5, 7, 0])
        dec.prefill(emb[:3], 0)
        dec.prefill(emb[:5], 1)
        emb_w = model.get_input_embeddings().weight
        dec.embed_w = torch.cat([emb_w, emb[n - 1:n]])  # token id V = the last prefix vector
        ids[2] = emb_w.shape[0]
        step = dec.step(ids, torch.tensor([3, 5, n - 1]))
        assert torch.allclose(step[2], ref[n - 1], atol=1e-5)


def test_fast_path_samples_what_the_generic_loop_samples(llama_dir):
    """Same rule, same uniforms: our decode step and transformers' forward draw the same texts (fp32)."""
    model, tok = load_generator(llama_dir)
    pm = attach_prompt(model, 4, "random", "", llama_dir)
    assert uses_fast_path(pm)
    src = [source_text(CB, lab) for lab in (0, 1, 2, 2, 0)]
    for stop_lines, names in ((None, None), (1, None), (2, ("premise", "hypothesis"))):
        fast = draw_samples(pm, tok, src, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, slots=2,
                            dtype="float32", stop_lines=stop_lines, field_names=names)
        ending = _Rules(tok, tok.eos_token_id, 10, stop_lines, names and field_name_tokens(tok, names))
        slow = _generic_loop(pm, tok, src, temperature=1.0, top_p=0.9, seed=5, slots=5, ending=ending,
                             pad=tok.pad_token_id, on_done=None)
        assert [(d.ids, d.ended) for d in fast] == [(d.ids, d.ended) for d in slow]
        assert any(d.ids for d in fast)


def test_samples_do_not_depend_on_the_batch_and_respect_the_budget(llama_dir):
    model, tok = load_generator(llama_dir)
    pm = attach_prompt(model, 4, "random", "", llama_dir)
    src = [source_text(CB, lab % 3) for lab in range(9)]
    done: list[int] = []
    runs = [draw_samples(pm, tok, src, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=2, slots=s,
                         dtype="float32", on_done=done.append if s == 4 else None) for s in (1, 4, 9)]
    assert runs[0] == runs[1] == runs[2]
    assert sorted(done) == list(range(9))  # each sample reported once, as it ended
    for d in runs[0]:
        assert d.ended in ("eos", "budget") and (d.ended == "eos" or len(d.ids) == 12) and len(d.ids) <= 12
        assert tok.eos_token_id not in d.ids
    other = draw_samples(pm, tok, src, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=3, slots=4,
                         dtype="float32")
    assert other != runs[0]
    # a sample's text depends on its index and source only: changing another sample's source changes nothing
    changed = draw_samples(pm, tok, [source_text(CB, 2)] + src[1:], max_new_tokens=12, temperature=1.0, top_p=0.95,
                           seed=2, slots=4, dtype="float32")
    assert changed[1:] == runs[0][1:]


def test_bfloat16_is_close_to_float32(llama_dir):
    model, tok = load_generator(llama_dir)
    emb = _prefix_embeds(model, tok, source_text(CB, 0))
    with torch.no_grad():
        a = LlamaDecoder(model, torch.float32, 1, 64).prefill(emb, 0)
        b = LlamaDecoder(model, torch.bfloat16, 1, 64).prefill(emb, 0)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max() + 0.05


def test_unknown_dtype_is_refused(tiny_causal_dir):
    model, tok = load_generator(tiny_causal_dir)
    with pytest.raises(ValueError, match="dtype"):
        draw_samples(model, tok, ["x"], max_new_tokens=2, temperature=1.0, top_p=0.9, seed=0, dtype="float16")


def test_a_sample_can_end_at_its_last_line(tiny_causal_dir):
    """stop_lines: the sample ends with its stop_lines-th line-break token, and that token is not in its
    text; EOS and the budget still end it earlier."""
    model, tok = load_generator(tiny_causal_dir)
    brk = [i for i in tok("a\nb", add_special_tokens=False)["input_ids"] if "\n" in tok.decode([i])]
    assert brk and line_breaks(tok)[brk[0]]
    rules = _Rules(tok, tok.eos_token_id, max_new_tokens=50, stop_lines=2)
    d, word = rules.start(), tok("the", add_special_tokens=False)["input_ids"][0]
    for t in (word, brk[0], word):
        assert not rules.add(d, t)
    assert rules.add(d, brk[0]) and d.ended == "lines" and d.finished and d.breaks == 2
    assert decode(tok, d) == tok.decode([word, brk[0], word]).strip()  # the last line break is cut
    eos = rules.start()
    assert rules.add(eos, tok.eos_token_id) and eos.ended == "eos" and eos.ids == []
    short = _Rules(tok, tok.eos_token_id, max_new_tokens=2, stop_lines=2)
    b = short.start()
    assert not short.add(b, word) and short.add(b, word) and b.ended == "budget" and not b.finished


def test_field_names_are_written_at_each_line_start(tiny_causal_dir):
    """Whatever the model samples, each line starts with its field name and it cannot stop before its last
    line; the values are the model's."""
    model, tok = load_generator(tiny_causal_dir)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    names = ("premise", "hypothesis")
    forced = field_name_tokens(tok, names)
    assert forced == [tok(f"{n}:", add_special_tokens=False)["input_ids"] for n in names]
    drawn = draw_samples(model, tok, [source_text(CB, i % 3) for i in range(12)], max_new_tokens=30,
                         temperature=1.0, top_p=1.0, seed=0, slots=4, dtype="float32", stop_lines=2,
                         field_names=names)
    for d in drawn:
        assert d.ids[:len(forced[0])] == forced[0]
        assert d.ended != "eos" or d.breaks >= 1  # no EOS before the last line has begun
        lines = tok.decode(d.ids).split("\n")
        assert lines[0].startswith("premise:")
        if d.breaks >= 1:  # (a sample cut by the budget may stop inside the name)
            second = lines[1].lstrip()
            assert second.startswith("hypothesis:") or (d.ended == "budget" and "hypothesis:".startswith(second))


def test_structured_decoding_rules_out_eos_before_the_last_line(tiny_causal_dir):
    _, tok = load_generator(tiny_causal_dir)
    names = ("premise", "hypothesis")
    rules = _Rules(tok, tok.eos_token_id, 50, 2, field_name_tokens(tok, names))
    first, last = rules.start(), rules.start()
    last.breaks = 1
    logits = torch.zeros(2, len(tok))
    logits[:, tok.eos_token_id] = 10.0  # EOS all but certain
    blocked = rules.block(logits.clone(), [first, last])
    assert blocked[0, tok.eos_token_id] == float("-inf") and blocked[1, tok.eos_token_id] == 10.0
    assert rules.choose(first, 7) == field_name_tokens(tok, names)[0][0]  # the name comes first
    plain = _Rules(tok, tok.eos_token_id, 50, 2)
    assert plain.block(logits, [first, last]) is logits  # no field names, no rule


def test_uniforms_match_a_pure_python_splitmix64():
    mask = (1 << 64) - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    def ref(seed, i, t):
        x = mix((seed & mask) ^ mix((i * 0x100000001B3 + t) & mask))
        return (mix(x ^ t) >> 11) / (1 << 53)

    for seed, i, t in ((0, 0, 0), (7, 123456, 89), (2**40 + 3, 2**33, 4096)):
        assert uniforms(seed, [i], [t])[0] == ref(seed, i, t)


@pytest.mark.parametrize("top_p", [1.0, 0.999999, 0.5])
def test_nucleus_draw_never_picks_a_zero_probability_token(top_p):
    logits = torch.zeros(3, 1000)
    logits[:, -50:] = float("-inf")  # e.g. EOS ruled out: the last ids have probability 0
    u = torch.tensor([0.0, 0.5, 1 - 2**-53], dtype=torch.float64)
    drawn = nucleus_draw(logits, u, 1.0, top_p, prefilter=16)
    assert (drawn < 950).all()


def test_bfloat16_samples_do_not_depend_on_the_batch(tiny_causal_dir, tmp_path):
    """A generator fitted to write short CB examples: samples end at different steps, so slots are refilled
    and moved; the texts still do not depend on the number of slots (bfloat16, the default dtype)."""
    rows = [{"premise": "the cat sat .", "hypothesis": "a cat .", "label": 0},
            {"premise": "the quick brown fox jumps over the lazy dog .", "hypothesis": "the dog sleeps all day .",
             "label": 1},
            {"premise": "it rained all day , and the ground is wet .", "hypothesis": "rain .", "label": 2}]
    fitted = fit_tiny_generator(tiny_causal_dir, CB, rows, tmp_path / "fitted", 64, 60)
    model, tok = load_generator(fitted)
    src = [source_text(CB, i % 3) for i in range(12)]
    runs = [draw_samples(model, tok, src, max_new_tokens=40, temperature=1.0, top_p=0.95, seed=4, slots=s,
                         dtype="bfloat16") for s in (1, 3, 12)]
    assert runs[0] == runs[1] == runs[2]
    assert len({len(d.ids) for d in runs[0]}) > 2 and any(d.ended == "eos" for d in runs[0])
