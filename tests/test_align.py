"""Teacher -> student token alignment (retrikt.distill.align), against hand-written maps."""

from __future__ import annotations

import random

import torch

from retrikt.classifier import Classifier
from retrikt.distill import align, losses
from retrikt.distill.objectives import adkd, mgskd, same_tokenization
from retrikt.params import load_params
from retrikt.tasks import get_task

from .conftest import REPO

CB = get_task("cb")
ROW = {"premise": "the cat", "hypothesis": "a dog .", "label": 0}


def tokens(clf, row=ROW):
    a, b = clf.task.render(row)
    return clf.tokenizer.convert_ids_to_tokens(clf.tokenizer(a, b)["input_ids"])


def test_alignment_by_hand(tiny_encoder_dir, tiny_char_mpnet_dir):
    student = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
    teacher = Classifier.from_base(tiny_char_mpnet_dir, CB, 32)
    assert tokens(student) == ["[CLS]", "the", "cat", "[SEP]", "a", "dog", ".", "[SEP]"]
    assert tokens(teacher) == ["<s>", "t", "##h", "##e", "c", "##a", "##t", "</s>", "</s>", "a", "d", "##o", "##g",
                               ".", "</s>"]
    want = torch.zeros(8, 15)
    for i, cols in {0: [0], 1: [1, 2, 3], 2: [4, 5, 6], 3: [7, 8], 4: [9], 5: [10, 11, 12], 6: [13], 7: [14]}.items():
        want[i, cols] = 1
    a = align.alignment(student, teacher, ROW)
    assert torch.equal(a, want)  # the premise's "a" in "cat" does not match the hypothesis' "a"
    assert torch.equal(align.alignment(teacher, student, ROW), want.T)
    maps, unmatched, total = align.token_maps(student, teacher, [ROW, ROW])
    assert (unmatched, total) == (0, 16) and all(torch.equal(m, want) for m in maps)
    assert not same_tokenization(student, teacher, [ROW])


def test_decoder_tokenizer_pairs_get_a_separator_and_still_align(tiny_encoder_dir, tiny_causal_dir):
    """A decoder's tokenizer (BPE, no pair template) would run the two texts together ("the cata dog");
    its classifier puts PAIR_SEPARATOR before the second text, and alignment shifts its offsets back."""
    student = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
    teacher = Classifier.from_base(tiny_causal_dir, CB, 32)
    assert (student.pair_prefix, teacher.pair_prefix) == ("", "\n")
    a, b = CB.render(ROW)
    assert teacher.tokenizer.decode(teacher.tokenizer(a, b)["input_ids"]) == "the cata dog ."  # the defect
    ids = teacher.encode([ROW])["input_ids"][0].tolist()
    assert teacher.tokenizer.decode(ids) == "the cat\na dog ."
    t = teacher.tokenizer.convert_ids_to_tokens(ids)
    sep = t.index("Ċ")  # byte-level "\n"
    s = tokens(student)
    assert s == ["[CLS]", "the", "cat", "[SEP]", "a", "dog", ".", "[SEP]"]
    m = align.alignment(student, teacher, ROW)
    assert m[:, sep].sum() == 0  # the separator matches no student token
    for i in (1, 2, 4, 5, 6):  # every word: the teacher tokens spelling it, in the same text
        cols = m[i].nonzero().flatten().tolist()
        assert cols and "".join(t[j] for j in cols).replace("Ġ", "") == s[i]
        assert all((j < sep) == (i < 3) for j in cols)


def test_pool_and_split_by_hand():
    a = torch.tensor([[1., 0., 0.], [0., 1., 1.], [0., 0., 1.], [0., 0., 0.]])  # teacher token 2 spans students 1, 2
    h = torch.tensor([[1., 2.], [3., 4.], [5., 8.]])
    assert torch.allclose(align.pool_onto(a, h), torch.tensor([[1., 2.], [4., 6.], [5., 8.], [0., 0.]]))
    attr = torch.tensor([[0.6], [0.0], [0.8]])  # one view; unit L2 norm over the teacher's tokens
    split = torch.tensor([[0.6], [0.4], [0.4], [0.0]])  # token 2's 0.8 shared by students 1 and 2
    assert torch.allclose(align.split_onto(a, attr), split / split.norm())


def test_truncated_teacher_leaves_student_tokens_unmatched(tiny_encoder_dir, tiny_char_mpnet_dir):
    student = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
    teacher = Classifier.from_base(tiny_char_mpnet_dir, CB, 8)  # longest-first: <s> t ##h </s> </s> a d </s>
    assert tokens(teacher) != (cut := teacher.tokenizer.convert_ids_to_tokens(
        teacher.encode([ROW])["input_ids"][0].tolist()))
    assert cut == ["<s>", "t", "##h", "</s>", "</s>", "a", "d", "</s>"]
    a = align.alignment(student, teacher, ROW)
    assert a.shape == (8, 8)
    assert a[1].tolist() == [0, 1, 1, 0, 0, 0, 0, 0] and a[5].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    assert a[2].sum() == 0 and a[6].sum() == 0  # "cat" and "." were cut from the teacher's input
    assert align.token_maps(student, teacher, [ROW])[1:] == (2, 8)


def test_mgskd_and_adkd_train_with_a_teacher_that_tokenizes_otherwise(tiny_encoder_dir, tiny_char_mpnet_dir):
    """The cached teacher side equals the teacher's own per-token outputs carried through the maps,
    and both objectives give finite losses and gradients."""
    from .test_train_student import keyword_rows

    params = load_params(REPO / "params.yaml")
    torch.manual_seed(0)
    student = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
    teacher = Classifier.from_base(tiny_char_mpnet_dir, CB, 64, pooling="mean")
    teacher.model.requires_grad_(False).eval()
    student.model.eval()
    rows = keyword_rows(6, random.Random(1))
    objective = mgskd(student, teacher, rows, None, params)
    loss = objective.loss([0, 3, 5])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in student.model.parameters() if p.grad is not None)

    # by hand, for one row: teacher layer t on its own tokens, averaged onto the student's tokens
    sp = params.student
    s_out, enc = student.forward(rows[:1], hidden=True)
    with torch.no_grad():
        t_out, t_enc = teacher.forward(rows[:1], hidden=True)
    a = align.alignment(student, teacher, rows[0])
    assert a.shape == (int(enc["attention_mask"].sum()), int(t_enc["attention_mask"].sum()))
    assert a.shape[0] != a.shape[1]  # letters against words: really another tokenization
    t_hidden = [None] * 3
    for _, t in losses.mgskd_layer_map(2, 2):
        t_hidden[t] = align.pool_onto(a, t_out.hidden_states[t][0])[None]
    y = torch.tensor([rows[0]["label"]])
    want = (losses.kd_ce_loss(s_out.logits, t_out.logits, y, sp.kd_alpha, sp.kd_temperature).total
            + losses.mgskd_loss(s_out.hidden_states, t_hidden, enc["attention_mask"], n_heads=32,
                                w_sample=sp.mgskd_sample_weight, w_token=sp.mgskd_token_weight).total)
    assert torch.isclose(objective.loss([0]), want, rtol=1e-4, atol=1e-5)

    objective = adkd(student, teacher, rows, None, params)
    loss = objective.loss([1, 2, 4])
    loss.backward()
    objective.release()
    assert torch.isfinite(loss) and loss > 0


def test_mgskd_and_adkd_train_with_a_decoder_teacher(tiny_encoder_dir, tiny_causal_dir):
    """The generator as the teacher (`teacher.model: generator`): a Llama-like classifier (last-token
    head, byte-level BPE, the pair separator) drives both token-level objectives through the maps."""
    from .test_train_student import keyword_rows

    params = load_params(REPO / "params.yaml")
    torch.manual_seed(0)
    student = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
    teacher = Classifier.from_base(tiny_causal_dir, CB, 64)
    teacher.model.requires_grad_(False).eval()
    rows = keyword_rows(6, random.Random(1))
    maps, unmatched, total = align.token_maps(student, teacher, rows)
    # every student word piece has a teacher token; [CLS] [SEP] [SEP] have none (the teacher adds no specials)
    assert (unmatched, total) == (3 * len(rows), sum(m.shape[0] for m in maps))
    for name in ("mgskd", "adkd"):
        objective = {"mgskd": mgskd, "adkd": adkd}[name](student, teacher, rows, None, params)
        student.model.zero_grad()
        loss = objective.loss([0, 2, 5])
        loss.backward()
        objective.release()
        grads = [p.grad for p in student.model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and loss > 0 and grads and all(torch.isfinite(g).all() for g in grads), name
