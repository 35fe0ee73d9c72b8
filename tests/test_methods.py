"""The student-method registry: every method has a builder of the one signature; params and the CLI read it."""

from __future__ import annotations

import inspect

import pytest

from retrikt.distill import objectives
from retrikt.errors import ParamsError, UnknownNameError
from retrikt.methods import BASELINES, METHODS, REGISTRY, STORE_METHODS, get_method
from retrikt.params import load_params, parse_params

from .conftest import REPO


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_builder_of_the_shared_signature(name):
    build = getattr(objectives, REGISTRY[name].objective)
    assert list(inspect.signature(build).parameters) == ["student", "teacher", "train", "entries", "params"]


def test_groups_and_needs():
    assert METHODS == BASELINES + STORE_METHODS
    assert not get_method("finetune").needs_teacher and all(get_method(m).needs_teacher for m in METHODS[1:])
    assert [m for m in METHODS if REGISTRY[m].retrieves] == ["retrikt"]
    with pytest.raises(UnknownNameError, match="unknown method 'distill'; known: finetune, vanilla_kd"):
        get_method("distill")


def test_params_take_the_method_lists_from_the_registry():
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    p = load_params(REPO / "params.yaml")
    assert set(p.student.baselines) <= set(BASELINES) and set(p.student.store_methods) <= set(STORE_METHODS)
    with pytest.raises(ParamsError, match=r"student.baselines\[0\]: 'retrikt' is not one of finetune, vanilla_kd"):
        parse_params({**raw, "student": {**raw["student"], "baselines": ["retrikt"]}})
    with pytest.raises(ParamsError, match=r"student.store_methods\[0\]: 'adkd' is not one of retrikt_kd, retrikt"):
        parse_params({**raw, "student": {**raw["student"], "store_methods": ["adkd"]}})
