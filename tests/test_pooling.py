"""The classifier head's input: [CLS] (HF's default) or the masked mean of the last layer."""

from __future__ import annotations

import pytest
import torch

from retrikt.classifier import Classifier, MeanPooler, set_pooling
from retrikt.tasks import get_task

CB = get_task("cb")
ROWS = [{"premise": "the cat sat on the mat .", "hypothesis": "a cat is sitting .", "label": 0},
        {"premise": "it rained all day , and the dog sleeps on the mat .", "hypothesis": "the ground is dry .",
         "label": 1}]


def test_mean_pooling_is_the_pooler_on_the_masked_mean(tiny_encoder_dir):
    torch.manual_seed(0)
    clf = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2, pooling="mean")
    clf.model.eval()
    assert isinstance(clf.model.bert.pooler, MeanPooler)
    out, enc = clf.forward(ROWS, hidden=True)
    mask = enc["attention_mask"]
    assert (mask == 0).any()  # the shorter row is padded
    h = out.hidden_states[-1]
    mean = torch.stack([h[b, mask[b].bool()].mean(0) for b in range(len(ROWS))])
    pooler = clf.model.bert.pooler
    want = clf.model.classifier(torch.tanh(pooler.dense(mean)))
    assert torch.allclose(out.logits, want, atol=1e-5)
    with torch.no_grad():  # padding does not change a row's logits: alone = in the padded batch
        alone = clf.model(**clf.encode(ROWS[:1])).logits
    assert torch.allclose(alone, out.logits[:1], atol=1e-5)


def test_cls_is_the_default_and_differs_from_mean(tiny_encoder_dir):
    torch.manual_seed(0)
    cls_clf = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
    torch.manual_seed(0)
    mean_clf = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2, pooling="mean")
    assert cls_clf.pooling == "cls" and not isinstance(cls_clf.model.bert.pooler, MeanPooler)
    assert not torch.allclose(cls_clf.forward(ROWS)[0].logits, mean_clf.forward(ROWS)[0].logits)


def test_save_and_load_keep_the_pooling(tiny_encoder_dir, tmp_path):
    torch.manual_seed(0)
    clf = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2, pooling="mean")
    clf.model.eval()
    clf.save(tmp_path / "clf")
    loaded = Classifier.load(tmp_path / "clf")
    assert loaded.pooling == "mean" and isinstance(loaded.model.bert.pooler, MeanPooler)
    assert torch.allclose(torch.from_numpy(loaded.predict_proba(ROWS)), torch.from_numpy(clf.predict_proba(ROWS)),
                          atol=1e-6)


def test_unknown_pooling_and_models_without_a_pooler(tiny_encoder_dir):
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2, pooling="max")
    with pytest.raises(ValueError, match="needs a BERT-like pooler"):
        set_pooling(torch.nn.Linear(2, 2), "mean")


def test_mean_pooling_of_a_roberta_style_head(tiny_mpnet_dir, tmp_path):
    """MPNet (all-mpnet-base-v2, a teacher option) has no pooler: its head reads token 0 of the sequence
    output. Mean pooling hands the head the masked mean in token 0's place; padding changes nothing, the
    head's weights keep their names, and save + load re-installs it."""
    torch.manual_seed(0)
    clf = Classifier.from_base(tiny_mpnet_dir, CB, 32, pooling="mean")
    clf.model.eval()
    out, enc = clf.forward(ROWS, hidden=True)
    mask = enc["attention_mask"]
    assert (mask == 0).any()
    h = out.hidden_states[-1]
    mean = torch.stack([h[b, mask[b].bool()].mean(0) for b in range(len(ROWS))])
    head = clf.model.classifier
    want = head.out_proj(torch.tanh(head.dense(mean)))
    assert torch.allclose(out.logits, want, atol=1e-5)
    first = head.out_proj(torch.tanh(head.dense(h[:, 0])))  # what HF's [CLS]-style head would give
    assert not torch.allclose(out.logits, first, atol=1e-3)
    with torch.no_grad():
        alone = clf.model(**clf.encode(ROWS[:1])).logits
    assert torch.allclose(alone, out.logits[:1], atol=1e-5)
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= set(clf.model.state_dict())
    clf.save(tmp_path / "clf")
    loaded = Classifier.load(tmp_path / "clf")
    assert loaded.pooling == "mean"
    assert torch.allclose(torch.from_numpy(loaded.predict_proba(ROWS)), torch.from_numpy(clf.predict_proba(ROWS)),
                          atol=1e-6)
    set_pooling(loaded.model, "mean")  # installing twice changes nothing
    assert torch.allclose(torch.from_numpy(loaded.predict_proba(ROWS)), torch.from_numpy(clf.predict_proba(ROWS)),
                          atol=1e-6)
