"""params.yaml validation: defaults load; every kind of bad input is one line naming the key; exit 2."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retrikt.params import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def _with(path: str, value):
    raw = copy.deepcopy(RAW)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


def test_defaults_load_and_are_typed():
    p = load_params(REPO / "params.yaml")
    assert p.tasks == ["cb"] and p.student.layers == [2]
    assert isinstance(p.teacher.lr, float) and p.models.generator.source == "registry"
    assert p.model_spec("encoder").name == "all-minilm-l6-v2"


@pytest.mark.parametrize("path,value,expect", [
    ("data.trian_limit", 100, "data.trian_limit: unknown key (did you mean 'train_limit'?)"),
    ("seeed", 1, "seeed: unknown key (did you mean 'seed'?)"),
    ("teacher.epochs", "ten", "teacher.epochs: expected an integer, got 'ten'"),
    ("teacher.epochs", 1.5, "teacher.epochs: expected an integer, got 1.5"),
    ("teacher.lr", 0, "teacher.lr: 0.0 is out of range (must be > 0)"),
    ("rl.top_p", 1.5, "rl.top_p: 1.5 is out of range (must be <= 1)"),
    ("rl.enabled", "yes", "rl.enabled: expected true/false, got 'yes'"),
    ("rl.algorithm", "dpo", "rl.algorithm: 'dpo' is not one of ppo, grpo, rloo"),
    ("index.type", "lsh", "index.type: 'lsh' is not one of flat, ivf, hnsw"),
    ("student.baselines", ["finetune", "distill"], "student.baselines[1]: 'distill' is not one of"),
    ("student.store_methods", ["retrikt", "finetune"], "student.store_methods[1]: 'finetune' is not one of"),
    ("student.layers", [2, 2], "student.layers: has duplicate entries"),
    ("student.layers", [], "student.layers: must not be empty"),
    ("data.train_limit", 0, "data.train_limit: 0 is out of range (must be >= 1)"),
    ("tasks", ["cb", "imdb"], "tasks[1]: unknown task 'imdb'; known tasks: boolq, cb,"),
    ("models.generator.source", "ftp", "models.generator.source: 'ftp' is not one of registry, hub, local"),
    ("models.encoder.package", None, "models.encoder.package: required when source is 'registry'"),
    ("teacher.model", "bert", "models.bert: no such model; known: encoder, generator"),
])
def test_bad_values_name_the_key(path, value, expect):
    with pytest.raises(ParamsError) as e:
        parse_params(_with(path, value))
    msg = str(e.value)
    assert msg.startswith(expect) and "\n" not in msg


def test_missing_required_group():
    raw = copy.deepcopy(RAW)
    del raw["models"]
    with pytest.raises(ParamsError, match=r"^models: missing \(params.yaml must set every key\)$"):
        parse_params(raw)


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k != "models":
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


@pytest.mark.parametrize("key", _leaf_keys(RAW))
def test_every_key_must_be_in_params_yaml(key):
    """params.yaml is the one source of values: dropping any key is an error naming it, not a default."""
    raw = copy.deepcopy(RAW)
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    del node[last]
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value) == f"{key}: missing (params.yaml must set every key)"


def test_the_typed_tree_has_no_defaults_and_params_yaml_sets_every_field():
    import dataclasses
    import typing

    from retrikt.params import ModelsParams, ModelSpec, Params

    def walk(cls, prefix, raw):
        for f in dataclasses.fields(cls):
            if cls is ModelSpec or f.name == "extra":  # source-specific keys; not settable
                continue
            key = f"{prefix}{f.name}"
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, key
            assert f.name in raw, f"{key}: declared in params.py but not set in params.yaml"
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp) and tp is not ModelsParams:
                walk(tp, key + ".", raw[f.name])

    walk(Params, "", RAW)


def test_rl_configs_are_the_rl_params_not_copies():
    import dataclasses

    from retrikt.rl.ppo import PPOConfig
    from retrikt.rl.trl_algos import TrlConfig

    p = parse_params(RAW)
    assert [f.name for f in dataclasses.fields(PPOConfig)] == ["rl", "seed"]
    assert PPOConfig(p.rl, 3).rl is p.rl
    assert [f.name for f in dataclasses.fields(TrlConfig)][:3] == ["rl", "seed", "output_dir"]


def test_students_have_their_own_optimiser_keys():
    p = parse_params(_with("teacher.weight_decay", 0.5))
    assert p.student.weight_decay == RAW["student"]["weight_decay"] and p.teacher.weight_decay == 0.5
    assert parse_params(_with("student.warmup_ratio", 0.3)).student.warmup_ratio == 0.3


def test_cross_field_checks():
    with pytest.raises(ParamsError, match="rl.mini_batch_size"):
        parse_params(_with("rl.mini_batch_size", 64))
    with pytest.raises(ParamsError, match="student.retrieval_top_k"):
        parse_params(_with("student.retrieval_top_k", 1000))


def test_extra_model_specs_are_validated():
    raw = _with("models.teacher_big", {"name": "bert-base", "source": "hub", "hub_id": "bert-base-uncased"})
    raw["teacher"]["model"] = "teacher_big"
    assert parse_params(raw).model_spec("teacher_big").hub_id == "bert-base-uncased"
    with pytest.raises(ParamsError, match="models.teacher_big.hub_id: required"):
        parse_params(_with("models.teacher_big", {"name": "x", "source": "hub"}))


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_with("data.trian_limit", 100)))
    stamp = tmp_path / "params.ok"
    out = subprocess.run([sys.executable, "-m", "retrikt.cli", "check-params", "--params", str(bad),
                          "--out", str(stamp)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["retrikt: error: params: data.trian_limit: unknown key (did you mean 'train_limit'?)"]
    assert not stamp.exists()


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [0\n")
    with pytest.raises(ParamsError, match="invalid YAML"):
        load_params(bad)


def test_student_layers_are_checked_against_the_resolved_encoder_only(tmp_path, monkeypatch):
    import json

    from retrikt.params import check_against_models

    monkeypatch.chdir(tmp_path)
    p = parse_params(_with("student.layers", [2, 8]))
    check_against_models(p)  # nothing resolved yet: nothing to check
    enc = tmp_path / "models/base/encoder"
    enc.mkdir(parents=True)
    (enc / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    spec = RAW["models"]["encoder"]
    (enc / "retrikt_model.json").write_text(json.dumps({"name": spec["name"], "source": spec["source"]}))
    with pytest.raises(ParamsError, match=r"^student.layers\[1\]: 8 layers, but the encoder .* has 6$"):
        check_against_models(p)
    check_against_models(parse_params(_with("student.layers", [2, 6])))
    (enc / "retrikt_model.json").write_text(json.dumps({"name": "another-model", "source": "hub"}))
    check_against_models(p)  # a folder from another spec: resolve_model replaces it first


def test_yaml_1_2_floats_are_numbers(tmp_path):
    """`dvc exp run -S teacher.lr=1e-4` writes ``lr: 1e-04`` (ruamel, YAML 1.2); PyYAML alone reads that
    as the string '1e-04' (YAML 1.1 floats need a dot), which used to stop the stage."""
    text = (REPO / "params.yaml").read_text()
    teacher_lr = "  lr: 3.0e-5\n"
    assert teacher_lr in text and yaml.safe_load("lr: 1e-04") == {"lr": "1e-04"}
    f = tmp_path / "params.yaml"
    f.write_text(text.replace(teacher_lr, "  lr: 1e-04\n", 1))
    assert load_params(f).teacher.lr == 1e-04
    f.write_text(text.replace(teacher_lr, "  lr: '1e-04'\n", 1))  # quoted: a string, still refused
    with pytest.raises(ParamsError, match="teacher.lr: expected a number"):
        load_params(f)
