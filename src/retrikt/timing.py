"""Latency measured so that two things timed in one process can be compared: A/B interleaved, medians.

Timing one model right after training, in a process of its own, while other work shares the cores,
gives numbers that differ 3x between two copies of the same architecture. :func:`ab_latency` times
``a(item)`` and ``b(item)`` on the same items, alternating which goes first (ABBA), for several
rounds after a warm-up; load that comes and goes hits both alike, so their per-item ratio is stable
even when the absolute milliseconds are not.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np


def ab_latency(a: Callable[[Any], Any], b: Callable[[Any], Any], items: Sequence[Any], *, rounds: int = 3,
               warmup: int = 3) -> dict[str, float]:
    """``{"a_ms", "b_ms", "ratio", "samples"}``: median wall time of one ``a(item)`` and one ``b(item)``
    (ms) over ``rounds`` x ``len(items)`` interleaved pairs, and the median of the per-pair ratios a/b.

    The first ``warmup`` items are run through both, untimed, first.
    """
    if not items or rounds < 1:
        raise ValueError("ab_latency: need at least one item and one round")
    for item in items[:max(1, warmup)]:
        a(item)
        b(item)
    ta, tb = [], []
    for r in range(rounds):
        for i, item in enumerate(items):
            order = ((a, ta), (b, tb)) if (r + i) % 2 == 0 else ((b, tb), (a, ta))
            for fn, out in order:
                t0 = time.perf_counter()
                fn(item)
                out.append(time.perf_counter() - t0)
    ta_arr, tb_arr = np.asarray(ta), np.asarray(tb)
    return {"a_ms": 1000.0 * float(np.median(ta_arr)), "b_ms": 1000.0 * float(np.median(tb_arr)),
            "ratio": float(np.median(ta_arr / tb_arr)), "samples": len(ta)}
