"""`retrikt predict`: CLI input parsing and terminal formatting of predictions.

The predictions themselves (class probabilities and, for a retrieval student, the top-k store entries)
come from :func:`retrikt.retrieval.predict`.
"""

from __future__ import annotations

from pathlib import Path

from retrikt.io import DataError, read_jsonl
from retrikt.tasks import INT_FIELDS, Task, get_task


def format_prediction(pred: dict, task: str | Task, width: int = 100) -> str:
    """A few human-readable lines: the label, the probabilities and the retrieved evidence."""
    task = get_task(task) if isinstance(task, str) else task
    probs = "  ".join(f"{n} {p:.3f}" for n, p in pred["proba"].items())
    lines = [f"prediction: {pred['label']}    ({probs})"]
    for rank, ev in enumerate(pred.get("evidence", []), 1):
        text = " | ".join(f"{f}: {ev[f]}" for f in task.text_fields)
        text = text if len(text) <= width else text[:width - 3] + "..."
        soft = " ".join(f"{p:.2f}" for p in ev["soft_label"].values())
        lines.append(f"  {rank:2d}. sim {ev['similarity']:.3f}  soft [{soft}]  #{ev['id']}  {text}")
    return "\n".join(lines)


def parse_cli_inputs(task: str | Task, fields: list[str] | None, jsonl: Path | None) -> list[dict]:
    """Inputs from ``field=value`` arguments (one example) or a JSONL file (one per line).

    Raises :class:`DataError` with a one-line message for a malformed argument, an unknown or
    missing field, or a value of the wrong type.
    """
    task = get_task(task) if isinstance(task, str) else task
    names = ", ".join(task.input_fields)
    if bool(fields) == (jsonl is not None):
        raise DataError(f"give either field=value arguments or --jsonl (not both, not neither); "
                        f"{task.name} fields: {names}")
    if jsonl is not None:
        rows = read_jsonl(jsonl)
        where = [f"{jsonl}: input {i}" for i in range(1, len(rows) + 1)]
        if not rows:
            raise DataError(f"{jsonl}: no inputs")
    else:
        row: dict = {}
        for arg in fields:
            name, sep, value = arg.partition("=")
            if not sep:
                raise DataError(f"argument {arg!r}: expected field=value ({task.name} fields: {names})")
            if name not in task.input_fields:
                raise DataError(f"unknown field {name!r} for task {task.name} (fields: {names})")
            row[name] = int(value) if name in INT_FIELDS and value.lstrip("-").isdigit() else value
        rows, where = [row], ["input"]
    out = []
    for row, at in zip(rows, where):
        missing = [f for f in task.input_fields if f not in row]
        if missing:
            raise DataError(f"{at}: missing field(s) {', '.join(missing)} for task {task.name} (fields: {names})")
        ex = {f: row[f] for f in task.input_fields}
        try:
            task.validate(ex)
        except ValueError as e:
            raise DataError(f"{at}: {e}") from None
        out.append(ex)
    return out

