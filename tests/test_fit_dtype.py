"""Training compute dtype of the shared loop (retrikt.classifier.fit): float32, or bfloat16 autocast."""

from __future__ import annotations

import pytest
import torch

from retrikt.classifier import Classifier, ce_objective, fit
from retrikt.tasks import get_task

CB = get_task("cb")
ROWS = [{"premise": p, "hypothesis": h, "label": y} for p, h, y in [
    ("the cat sat on the mat .", "a cat is sitting .", 0), ("it rained all day .", "the ground is dry .", 1),
    ("the dog sleeps .", "the dog is awake .", 1), ("the fox jumps over the dog .", "a fox jumps .", 0),
    ("it rained all day .", "the movie was good .", 2), ("the cat sat .", "the cat sat on the mat .", 2)]]


def test_fit_in_bfloat16_trains_and_ends_in_float32_close_to_the_float32_run(tiny_encoder_dir, one_thread):
    runs, seen = {}, []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):  # the dtype each linear layer computes in
        out = real(x, w, b)
        seen.append(out.dtype)
        return out

    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        clf = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
        seen.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "linear", spy)
            hist = fit(ce_objective(clf, ROWS), clf, ROWS, epochs=8, lr=1e-2, batch_size=3, seed=0, weight_decay=0.0,
                       warmup_ratio=0.0, dtype=dtype)
        assert set(seen) == {getattr(torch, dtype)}
        assert all(p.dtype == torch.float32 for p in clf.model.parameters())  # weights stay float32
        assert hist[-1]["train_loss"] < hist[0]["train_loss"]
        runs[dtype] = clf.predict_proba(ROWS)
    assert abs(runs["bfloat16"] - runs["float32"]).max() < 0.05  # the same training, up to bf16 rounding
    assert not (runs["bfloat16"] == runs["float32"]).all()  # ... but it did compute in bf16


def test_fit_refuses_an_unknown_dtype(tiny_encoder_dir):
    clf = Classifier.from_base(tiny_encoder_dir, CB, 32, num_layers=2)
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        fit(ce_objective(clf, ROWS), clf, ROWS, epochs=1, lr=1e-3, batch_size=3, seed=0, weight_decay=0.0,
            warmup_ratio=0.0, dtype="float16")
