"""One seed drives python, numpy and torch (and, through torch, sampling)."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Seed every RNG the pipeline uses and ask torch for deterministic kernels."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(seed)
    # every kernel torch has a deterministic version of uses it (warn_only: the few without one still run);
    # cuDNN's autotuner would pick kernels by timing, so it stays off
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
