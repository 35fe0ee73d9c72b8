"""Atomic file output and JSONL helpers shared by every stage.

A stage that is killed mid-write must never leave a half-written file behind: everything is written
to a temporary sibling first and moved into place with ``os.replace`` (atomic on POSIX). What a
killed writer left (its temporary sibling) is removed the next time that output is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from retrikt.errors import DataError, MissingInputError

__all__ = ["DataError", "MissingInputError", "atomic_dir", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "load_yaml", "read_json", "read_jsonl", "read_jsonl_numbered", "write_jsonl"]


_YAML_LOADER = None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads YAML 1.2 floats without a dot (``3e-05``, ``1e3``) as floats.

    PyYAML implements YAML 1.1, where a float needs a dot (``3.0e-05``); ``3e-05`` is a string there.
    DVC (ruamel, YAML 1.2) writes ``dvc exp run -S teacher.lr=3e-5`` into params.yaml as ``3e-05``, so
    without this every such override would stop the stage with "expected a number". Raises
    ``yaml.YAMLError`` like ``safe_load``.
    """
    global _YAML_LOADER
    import re

    import yaml

    if _YAML_LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
            r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))
        _YAML_LOADER = Loader
    return yaml.load(text, Loader=_YAML_LOADER)


def _clear_stale(path: Path) -> None:
    """Remove what a killed writer of ``path`` left: its temporary siblings (``.<name>.*.tmp``) and
    the previous version it was replacing (``.<name>.old``). One writer per output at a time (DVC
    locks a stage's outputs), so whatever is there is stale."""
    import re

    stale = re.compile(rf"\.{re.escape(path.name)}\.([a-z0-9_]{{8}}\.tmp|old)")  # mkstemp/mkdtemp: 8 random chars
    for p in path.parent.glob(f".{path.name}.*"):
        if stale.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    _clear_stale(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, UTF-8 (parents are created)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write rows as JSON Lines, atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _missing(path: Path, what: str | None) -> MissingInputError:
    return MissingInputError(f"{path}: not found" + (f" ({what})" if what else ""))


def read_json(path: str | os.PathLike, missing: str | None = None) -> Any:
    """A JSON file; a missing file, bad UTF-8 or bad JSON raise one-line DataErrors naming the file.
    ``missing`` says what to do about a missing file (e.g. "run the index stage first")."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _missing(path, missing) from None
    except OSError as e:  # a folder, no permission
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def read_jsonl_numbered(path: str | os.PathLike, missing: str | None = None) -> list[tuple[int, dict]]:
    """``(line number, row)`` pairs of a JSON Lines file (blank lines skipped); a missing file, a line
    that is not UTF-8 or not a JSON object raise DataError naming the file (and line number)."""
    path = Path(path)
    rows = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _missing(path, missing) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start} of the line: {e.reason})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def read_jsonl(path: str | os.PathLike, missing: str | None = None) -> list[dict]:
    """Read JSON Lines; a missing file or a malformed line raises DataError naming the file and line number."""
    return [row for _, row in read_jsonl_numbered(path, missing)]


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` as a whole when the block succeeds.

    Used for model folders and indexes: a killed stage leaves the previous folder (or none), never a
    partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
