"""The student methods: one registry that params validation, ``train_student`` and ``evaluate`` read.

Pure Python (no torch), so params validation and the CLI can read it cheaply. Each method names its
objective builder, a function of :mod:`retrikt.distill.objectives` with the signature
``(student, teacher, train, entries, params) -> Objective``, and says what it needs: the teacher, the
knowledge store (a store method is trained with it; the others on the task data only) and whether it
predicts by retrieving from its own index over the store at serving time.

To add a method: a builder in ``distill/objectives.py``, a :class:`Method` here, its name in params.yaml's
``student.baselines`` or ``student.store_methods`` (see CONTRIBUTING.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    needs_teacher: bool
    needs_store: bool  # trained with the knowledge store (params: student.store_methods)
    retrieves: bool = False  # serves by retrieval over its own store index (reads the store at inference)

    @property
    def objective(self) -> str:
        """The builder's name in :mod:`retrikt.distill.objectives`."""
        return self.name


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("finetune", needs_teacher=False, needs_store=False),
    Method("vanilla_kd", needs_teacher=True, needs_store=False),
    Method("mgskd", needs_teacher=True, needs_store=False),
    Method("adkd", needs_teacher=True, needs_store=False),
    Method("retrikt_kd", needs_teacher=True, needs_store=True),
    Method("retrikt", needs_teacher=True, needs_store=True, retrieves=True),
)}
METHODS = tuple(REGISTRY)  # the report's row order
BASELINES = tuple(n for n, m in REGISTRY.items() if not m.needs_store)  # trained on the task data only
STORE_METHODS = tuple(n for n, m in REGISTRY.items() if m.needs_store)  # trained with the knowledge store


def get_method(name: str) -> Method:
    """The registered method ``name``; UnknownNameError listing the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        from retrikt.errors import UnknownNameError

        raise UnknownNameError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
