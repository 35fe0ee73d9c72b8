"""Stage modules do not reach into each other: only cli.py imports a stage module.

A stage module is the module that implements a command dvc.yaml runs (or `retrikt predict`). Shared
pieces live in library modules that stages import; a stage module importing another (or a library
importing a stage) would make one stage's code part of another's and hide what each stage depends on.
The imports are read with ``ast`` (module level and inside functions, ``_call("module:function")``
targets included; ``if TYPE_CHECKING:`` blocks skipped), by the same analysis as tests/test_dvc_deps.py.
"""

from __future__ import annotations

import ast

import pytest

from .test_dvc_deps import COMMANDS, PKG, SRC, _body, _stages, imported_modules

# CLI command -> its stage module (cli.py runs each lazily)
STAGE_MODULES = {
    "resolve-model": "retrikt.resolve_model",
    "prepare": "retrikt.data",
    "teacher": "retrikt.teacher",
    "prompt-tune": "retrikt.prompt_tune",
    "rl": "retrikt.rl.stage",
    "generate": "retrikt.generate",
    "index": "retrikt.index",
    "train-student": "retrikt.distill.train",
    "evaluate": "retrikt.evaluate",
    "predict": "retrikt.predict",
}
# commands whose work is the params validation every stage shares (retrikt.params, a library module)
NOT_STAGES = {"check-params", "registry-packages"}
DISPATCHER = f"{PKG}.cli"


def module_name(path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def all_imports() -> dict[str, set[str]]:
    """Every src/retrikt module -> the retrikt modules it imports."""
    return {module_name(p): imported_modules(ast.parse(p.read_text(), str(p)))
            for p in sorted((SRC / PKG).rglob("*.py"))}


STAGES = frozenset(STAGE_MODULES.values())


def violations(imports: dict[str, set[str]], stages: frozenset[str] = STAGES) -> list[str]:
    """``"a imports stage module b"`` for each module other than cli.py that imports a stage module."""
    return [f"{name} imports stage module {m}" for name, mods in sorted(imports.items()) if name != DISPATCHER
            for m in sorted(mods) if m in stages and m != name]


def test_no_module_but_the_cli_imports_a_stage_module():
    found = all_imports()
    assert set(STAGE_MODULES.values()) <= set(found), "a stage module listed here is not in src/"
    assert not violations(found), "move the shared code into a library module:\n" + "\n".join(violations(found))


def test_the_stage_list_matches_cli_and_dvc_yaml():
    commands = {_body(s)["cmd"].split()[1] for s in _stages().values()}  # "${retrikt} <command> ..."
    assert commands <= set(STAGE_MODULES) | NOT_STAGES, "dvc.yaml runs a command this test does not know"
    assert set(COMMANDS) == set(STAGE_MODULES) | NOT_STAGES, "cli.py has a command this test does not know"
    for command, module in STAGE_MODULES.items():
        assert module in imported_modules(COMMANDS[command]), f"`retrikt {command}` does not run {module}"


@pytest.mark.parametrize("importer, source", [
    ("retrikt.distill.train", "from retrikt.predict import STORE_SUBDIR\n"),          # stage -> stage
    ("retrikt.generate", "def f():\n    from retrikt import index\n"),                # lazily, inside a function
    ("retrikt.store", "import retrikt.teacher\n"),                                    # library -> stage
    ("retrikt.methods", "BUILD = 'retrikt.distill.train:vanilla_kd'\n"),              # a _call-style target
])
def test_the_check_catches_a_stage_import(importer, source):
    assert violations({importer: imported_modules(ast.parse(source))})


def test_the_check_allows_library_imports_and_the_cli():
    ok = {"retrikt.distill.train": imported_modules(ast.parse("from retrikt.retrieval import retrieval_proba\n")),
          "retrikt.cli": imported_modules(ast.parse("from retrikt import data\n"))}
    assert not violations(ok)
