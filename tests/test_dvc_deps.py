"""Every stage's `deps` in dvc.yaml cover the code its command runs (issue: reproducible for real).

For each stage the test computes, by static analysis of src/retrikt with `ast`, the transitive closure
of retrikt modules the stage's CLI command imports:

- the command's function in cli.py (found by its Typer name), the module-level helpers of cli.py it
  calls (``_stage``, ``_setup``, ``_guard``, ...; recursively) and every import inside them;
- the ``"module:function"`` strings it hands to ``_call`` (stage modules are imported lazily);
- then, for every retrikt module reached, each import it makes anywhere (module level and inside
  functions), except those under ``if TYPE_CHECKING:``, which never run;
- cli.py itself and the packages a module sits in, whose ``__init__.py`` runs on import (an
  ``__init__.py`` with nothing but a docstring and literal constants is left out: it cannot change
  a result).

A stage passes when every module of its closure is one of its deps, or inside a folder dep (such as
src/retrikt/distill). So editing any code a stage runs makes `dvc repro` re-run it.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

SRC = REPO / "src"
PKG = "retrikt"
TARGET = re.compile(r"^retrikt(\.\w+)+:\w+$")


def module_file(name: str) -> Path | None:
    """``retrikt.a.b`` -> src/retrikt/a/b.py or src/retrikt/a/b/__init__.py (None if neither)."""
    base = SRC.joinpath(*name.split("."))
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return None


def _trivial_init(path: Path) -> bool:
    """An ``__init__.py`` holding only a docstring and assignments of literal constants."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            continue
        return False
    return True


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk_runtime(node: ast.AST):
    """``ast.walk`` that skips ``if TYPE_CHECKING:`` bodies (their imports never run)."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            if isinstance(child, ast.If) and _is_type_checking(child):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imported_modules(node: ast.AST) -> set[str]:
    """The retrikt modules the imports under ``node`` load (``from retrikt import paths`` -> retrikt.paths)."""
    out: set[str] = set()
    for n in _walk_runtime(node):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.split(".")[0] == PKG}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and n.module.split(".")[0] == PKG:
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names if module_file(f"{n.module}.{a.name}")}
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and TARGET.match(n.value):
            out.add(n.value.split(":")[0])  # a `_call("module:function")` target
    return out


@lru_cache(maxsize=None)
def module_imports(name: str) -> frozenset[str]:
    path = module_file(name)
    assert path is not None, f"import of {name}, which is not in src/"
    return frozenset(imported_modules(ast.parse(path.read_text(), str(path))))


def closure(start: set[str]) -> set[str]:
    """Modules reached from ``start`` (plus their parent packages)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # packages run their __init__
        if name != f"{PKG}.cli":  # cli.py's lazy imports count only along the command's own path
            todo.extend(module_imports(name))
    return seen


CLI = ast.parse((SRC / PKG / "cli.py").read_text())
CLI_FUNCS = {n.name: n for n in CLI.body if isinstance(n, ast.FunctionDef)}


def _command_name(fn: ast.FunctionDef) -> str | None:
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command":
            if d.args and isinstance(d.args[0], ast.Constant):
                return d.args[0].value
            return fn.name.replace("_", "-")
    return None


COMMANDS = {name: fn for fn in CLI_FUNCS.values() if (name := _command_name(fn))}


def command_modules(command: str) -> set[str]:
    """The closure of a CLI command: its function, the cli.py helpers it calls (recursively), their imports."""
    assert command in COMMANDS, f"dvc.yaml runs `retrikt {command}`, which cli.py does not define"
    start = {f"{PKG}.cli"} | {m for n in CLI.body if isinstance(n, (ast.Import, ast.ImportFrom))
                              for m in imported_modules(n)}
    funcs, todo = set(), [COMMANDS[command].name]
    while todo:
        name = todo.pop()
        if name in funcs:
            continue
        funcs.add(name)
        fn = CLI_FUNCS[name]
        start |= imported_modules(fn)
        todo += [n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in CLI_FUNCS]
    return closure(start)


def needed_files(command: str) -> set[str]:
    """Repository-relative files of a command's closure (trivial ``__init__.py`` files left out)."""
    files = set()
    for m in command_modules(command):
        path = module_file(m)
        if path.name == "__init__.py" and _trivial_init(path):
            continue
        files.add(path.relative_to(REPO).as_posix())
    return files


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _body(stage: dict) -> dict:
    return stage.get("do", stage)  # foreach stages keep cmd/deps under `do`


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_the_code_its_command_imports(stage):
    body = _body(_stages()[stage])
    words = body["cmd"].split()
    assert words[0] == "${retrikt}", body["cmd"]
    deps = [str(d) for d in body.get("deps", [])]
    missing = sorted(f for f in needed_files(words[1]) if not _covered(f, deps))
    assert not missing, f"stage {stage} (`retrikt {words[1]}`) imports code that is not in its deps: {missing}"


def test_the_analysis_sees_lazy_and_indirect_imports():
    """The closure follows ``_call`` targets, imports inside functions, and modules' own imports."""
    gen = needed_files("generate")
    assert "src/retrikt/generate.py" in gen  # a `_call("retrikt.generate:generate")` target
    assert "src/retrikt/llm.py" in gen and "src/retrikt/models.py" in gen  # through generate.py
    assert "src/retrikt/rl/rewards.py" in gen and "src/retrikt/rl/stage.py" not in gen
    assert {"src/retrikt/cli.py", "src/retrikt/params.py", "src/retrikt/tracking.py",
            "src/retrikt/seeding.py", "src/retrikt/device.py"} <= gen  # what every stage's set-up runs
    student = needed_files("train-student")
    assert "src/retrikt/distill/losses.py" in student  # `from retrikt.distill import losses`
    assert "src/retrikt/retrieval.py" in student  # imported by distill/train.py
    assert "src/retrikt/rl/ppo.py" in needed_files("rl")  # imported inside a function of rl/stage.py
    assert "src/retrikt/__init__.py" not in gen  # a docstring and __version__ only


def test_type_checking_imports_are_ignored():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from retrikt.models import X\n"
                     "def f():\n    from retrikt.paths import p\n")
    assert imported_modules(tree) == {"retrikt.paths"}
