"""The training loop's learning-rate schedule (classifier.linear_warmup) against transformers'.

``transformers.get_linear_schedule_with_warmup`` would do, but it is not the same schedule: its first
step runs at lr 0 (a step that only moves AdamW's moments), and its warm-up ends one step later. Ours
starts at lr/warm-up steps. The decay afterwards is identical. Switching would change every trained
model, so we keep ours; this test pins both, so a switch is a visible decision.
"""

from __future__ import annotations

import pytest
import torch

from retrikt.classifier import linear_warmup


def rates(make, steps: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_ours_warms_up_from_the_first_step():
    # 10 steps, warm-up ratio 0.2 -> 2 warm-up steps: 1/2, 2/2, then (10 - s) / 8
    assert rates(lambda o: linear_warmup(o, 10, 0.2), 10) == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_transformers_schedule_differs_only_in_the_warm_up():
    from transformers import get_linear_schedule_with_warmup

    ours = rates(lambda o: linear_warmup(o, 10, 0.2), 10)
    theirs = rates(lambda o: get_linear_schedule_with_warmup(o, 2, 10), 10)
    assert theirs[0] == 0.0 and ours[0] == 0.5  # their first step does not move the weights
    assert theirs[1] == 0.5 and ours[1] == 1.0
    assert theirs[2:] == pytest.approx(ours[2:])  # the same linear decay
