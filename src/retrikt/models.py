"""Load models by role: base-model folders, generators, truncated encoders; file digests.

Library module: the folders it reads are made by the ``resolve_model`` stage
(:mod:`retrikt.resolve_model`): ``models/base/<role>/`` with safetensors weights, config, tokenizer and
``retrikt_model.json`` naming where it came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from retrikt import paths
from retrikt.io import read_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_info(folder: str | Path) -> dict:
    """The ``retrikt_model.json`` written by :func:`retrikt.resolve_model.resolve` (or {} for other folders)."""
    meta = Path(folder) / paths.MODEL_META
    return read_json(meta) if meta.exists() else {}


def ensure_pad_token(tokenizer):
    """``tokenizer`` with EOS as its pad token where it has none (decoder-only models often lack one;
    batching and generation need it); changed in place and returned."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_seq2seq(folder: str | Path) -> bool:
    import transformers

    return bool(getattr(transformers.AutoConfig.from_pretrained(folder), "is_encoder_decoder", False))


def load_generator(folder: str | Path, device: "torch.device | str" = "cpu"):
    """(model, tokenizer) for a causal or seq2seq generator folder, in eval mode, frozen, on ``device``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    cls = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype="float32")
    tok = ensure_pad_token(transformers.AutoTokenizer.from_pretrained(folder))
    model.to(device).eval().requires_grad_(False)
    return model, tok


def truncate_encoder(model: "torch.nn.Module", num_layers: int) -> "torch.nn.Module":
    """Keep the first ``num_layers`` transformer layers of a BERT-like encoder (in place)."""
    import torch

    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no encoder.layer stack to truncate")
    if not 1 <= num_layers <= len(layers):
        from retrikt.errors import ParamsError

        raise ParamsError(f"student layers must be within 1..{len(layers)} (the encoder's), got {num_layers}")
    base.encoder.layer = torch.nn.ModuleList(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    return model


def count_parameters(model) -> int:
    """Parameters of a module, or of an iterable of tensors (e.g. the trainable ones)."""
    params = model.parameters() if hasattr(model, "parameters") else model
    return sum(p.numel() for p in params)
