"""The one exception type for what a user can get wrong, and its kinds.

Bad params, a malformed or missing mirror file, a model spec that cannot be resolved, an upstream
stage's output that is missing or corrupt, a bad ``retrikt predict`` argument, an unreachable tracking
server: each raises a :class:`UserError` whose message is one line naming the thing. The CLI
(``cli._guard``) turns exactly this type into ``retrikt: error: <message>`` and ``exit_code``; any other
exception (a plain KeyError, a FileNotFoundError from a bug) is a bug and keeps its traceback.

The kinds also derive from the built-in type they replace (ValueError, FileNotFoundError, KeyError,
RuntimeError), so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: one line, a non-zero exit code, no traceback."""

    exit_code = 1
    prefix = ""

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0]) if self.args else self.__class__.__name__


class ParamsError(UserError, ValueError):
    """Invalid params.yaml (or a setting checked against the machine); the message names the key."""

    exit_code = 2
    prefix = "params: "


class DataError(UserError, ValueError):
    """Malformed input data; the message names the file (and line)."""


class MissingInputError(DataError, FileNotFoundError):
    """A file a stage reads is not there (the message says which stage writes it)."""


class UnknownNameError(UserError, KeyError):
    """An unknown task, method or other name; the message lists the known ones."""


class ModelResolutionError(UserError, RuntimeError):
    """A model spec cannot be resolved (package missing, checksum mismatch, unreadable folder, ...)."""


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking store cannot be reached when a stage starts."""
