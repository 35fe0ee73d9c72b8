"""The torch device a stage computes on (params ``device``), and the thread count.

There is no process-wide device: :func:`resolve_device` turns params ``device`` into a
``torch.device`` (the CLI calls it right after validating params, so ``device: cuda`` on a machine
without a GPU stops the stage with one line before any compute), each stage resolves it from its
params and hands it to the loaders (``Classifier.from_base/load``, ``models.load_generator``), whose
``device`` argument defaults to the CPU. Code that feeds a model moves its inputs to *that model's*
device, so library functions also work on a model a caller placed elsewhere. FAISS always runs on the
CPU (faiss-cpu): embeddings leave torch as numpy.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import torch

from retrikt.params import ParamsError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``;
    a CUDA device torch cannot see is a :class:`ParamsError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError(f"device: {name!r} requested, but torch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParamsError(f"device: {name!r} requested, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        # seed_everything asks for deterministic kernels; cuBLAS needs this before its first call to comply
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if device.index is not None:
            torch.cuda.set_device(device)  # so that tensors made on plain "cuda" land on the same GPU
    return device


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU whose
    oneDNN has bf16 kernels (AVX-512 BF16 / AMX). Elsewhere torch falls back to a reference GEMM: on an
    AVX2-only CPU (AMD Zen 3) a bf16 matmul + backward ran 20x slower than float32 (2.16 s vs 0.107 s)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
            return False
    return False


def resolve_dtype(name: str, device: torch.device) -> str:
    """A params ``dtype`` (``auto``, ``float32``, ``bfloat16``) as the compute dtype to use on ``device``:
    ``auto`` is bfloat16 where :func:`bf16_native`, else float32. An explicit value is kept as it is."""
    if name != "auto":
        return name
    return "bfloat16" if bf16_native(device) else "float32"


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def set_threads(n: int) -> int:
    """Pin the CPU thread count of every library that computes (params ``threads``), before any compute.

    Results depend on it (reductions split across threads sum in another order), so it is an
    execution setting fixed per run and recorded, like ``device``. torch's intra-op pool, FAISS's
    OpenMP and the BLAS numpy and scikit-learn use are set now; the environment variables cover
    libraries loaded later and child processes.
    """
    for var in THREAD_ENV:
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        pass
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)  # numpy's / scipy's BLAS, already loaded
    log.info("threads: %d", n)
    return n


def execution_info(device: torch.device) -> dict[str, str]:
    """What a run's numbers depend on besides params and data: recorded with every stage (timings, MLflow tags)."""
    return {"device": str(device), "bf16_native": str(bf16_native(device)).lower(),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "deterministic": str(torch.are_deterministic_algorithms_enabled()).lower()}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A copy of a dict of tensors (a tokenizer's output) on ``device``; a no-op move where they are."""
    return {k: v.to(device) for k, v in batch.items()}
