"""`train_student` stage: one student (method × layers × seed) per call; every method shares one loop.

Student: the first L layers of the base encoder with a fresh head (``Classifier.from_base``).
Teacher / reward model: ``models/<task>/teacher``, frozen. The method (:mod:`retrikt.methods`) says
whether it needs the teacher and the knowledge store, and names its objective builder in
:mod:`retrikt.distill.objectives` (what each method optimises is described there). Optimiser for every
method: AdamW with ``student.weight_decay`` and ``student.warmup_ratio`` (linear warm-up/decay),
gradient norm clipped to 1 (:func:`retrikt.classifier.fit`, the loop the teacher uses too).

Writes the student folder (atomic; ``store/`` for a method that serves by retrieval, ``retrikt``),
validation predictions, metrics and a ``student_curve`` plot. Metric keys ending in ``_seconds``/``_ms``
are timings (not deterministic).
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Callable, Sequence

import numpy as np
import torch

from retrikt import paths, store
from retrikt.classifier import Classifier, fit, write_predictions
from retrikt.device import resolve_device, resolve_dtype
from retrikt.distill import objectives
from retrikt.io import atomic_dir, read_jsonl
from retrikt.methods import get_method
from retrikt.models import count_parameters
from retrikt.params import Params
from retrikt.retrieval import retrieval_proba
from retrikt.seeding import seed_everything
from retrikt.tasks import get_task
from retrikt.timing import ab_latency

log = logging.getLogger(__name__)
LATENCY_EXAMPLES = 64
LATENCY_ROUNDS = 3  # A/B rounds over the LATENCY_EXAMPLES validation rows


def _load_teacher(task: str, device) -> Classifier:
    teacher = Classifier.load(paths.teacher(task), device)
    teacher.model.requires_grad_(False).eval()
    return teacher


def serving_latency(student: Classifier, serve: Callable[[dict], object], rows: Sequence[dict]) -> dict[str, float]:
    """Batch-1 serving latency, A/B interleaved against the plain forward of the same student in this
    process (:func:`retrikt.timing.ab_latency`, medians over ``LATENCY_ROUNDS`` rounds of ``rows``).

    ``latency_ms``: ``serve(row)`` end to end (tokenise, forward, and for ``retrikt`` the search and the
    aggregation); ``forward_latency_ms``: the bare forward on pre-tokenised input (``.cpu()`` waits for a
    GPU); ``latency_ratio``: the median per-row ratio of the two, the number to compare across methods.
    """
    encs = [student.encode([r]) for r in rows]
    with torch.no_grad():
        ab = ab_latency(lambda i: serve(rows[i]), lambda i: student.model(**encs[i]).logits.cpu(),
                        list(range(len(rows))), rounds=LATENCY_ROUNDS)
    return {"latency_ms": ab["a_ms"], "forward_latency_ms": ab["b_ms"], "latency_ratio": ab["ratio"]}


# --------------------------------------------------------------------------------- the stage --- #
def train_student(params: Params, task_name: str, run, *, method: str, layers: int, seed: int) -> dict:
    spec = get_method(method)
    seed_everything(seed)
    task, sp = get_task(task_name), params.student
    train = read_jsonl(paths.split_file(task.name, "train"))
    validation = read_jsonl(paths.split_file(task.name, "validation"))
    device = resolve_device(params.device)
    student = Classifier.from_base(paths.base_model("encoder"), task, sp.max_length, num_layers=layers,
                                   pooling=sp.pooling, device=device)
    teacher = _load_teacher(task.name, device) if spec.needs_teacher else None
    entries = store.load_entries(task.name) if spec.needs_store else None
    t0 = time.perf_counter()  # training time includes the one-off teacher passes
    objective = getattr(objectives, spec.objective)(student, teacher, train, entries, params)
    retrieval = objective.extra if spec.retrieves else None  # an objectives.Retrieval
    del teacher  # the objectives hold what they need
    setup_seconds = time.perf_counter() - t0
    epochs = sp.store_epochs if spec.needs_store else sp.epochs  # the store is ~10x the train rows
    dtype = resolve_dtype(sp.dtype, device)
    fit(objective, student, validation, epochs=epochs, lr=sp.lr, batch_size=sp.batch_size, seed=seed,
        weight_decay=params.student.weight_decay, warmup_ratio=params.student.warmup_ratio,
        on_epoch=lambda row: run.add_plot_row("student_curve", row, step_key="epoch"),
        desc=f"{method}-L{layers}-s{seed} {task.name}", dtype=dtype)
    objective.release()
    if retrieval is not None and dtype != "float32":
        # the last epoch's index was embedded under autocast; serving embeds queries in float32, so the
        # saved index (and the reported metric) must be the float32 embeddings of the final student
        retrieval.build_index()
    train_seconds = time.perf_counter() - t0

    folder = paths.student(task.name, method, layers, seed)
    extra = {"method": method, "layers": layers, "seed": seed, "base": "encoder"}
    if retrieval is not None:
        extra["retrieval"] = {"tau": sp.retrieval_tau, "top_k": sp.retrieval_top_k, "store": paths.STORE_SUBDIR}
    with atomic_dir(folder) as tmp:
        student.save(tmp, extra=extra)
        if retrieval is not None:
            index = retrieval.index  # the final student's, in float32 (the last epoch's, or rebuilt above)
            meta = {"task": task.name, "embedded_by": "student", "method": method}
            store.save_index(tmp / paths.STORE_SUBDIR, index, [e["id"] for e in entries], meta)
            shutil.copyfile(paths.store_entries(task.name), tmp / paths.STORE_SUBDIR / paths.ENTRIES_FILE)

    if retrieval is not None:
        proba = retrieval.predict(validation, retrieval.index)
        ids = np.arange(len(entries))
        serve = lambda r: retrieval_proba(student.embed([r]), retrieval.index, ids, retrieval.soft,  # noqa: E731
                                          sp.retrieval_top_k, sp.retrieval_tau)
    else:
        proba, serve = student.predict_proba(validation), lambda r: student.predict_proba([r])
    metrics = task.compute_metrics([r["label"] for r in validation], proba.argmax(1).tolist())
    write_predictions(task.name, f"{method}-L{layers}-s{seed}", validation, proba)

    timed = validation[:LATENCY_EXAMPLES]
    store_bytes = 0
    if spec.retrieves:
        store_bytes = store.dir_bytes(folder / paths.STORE_SUBDIR)  # the student's index + its copy of entries.jsonl
    elif spec.needs_store:
        store_bytes = paths.store_entries(task.name).stat().st_size
    out = {**metrics, "parameters": count_parameters(student.model),
           "model_bytes": (folder / paths.WEIGHTS_FILE).stat().st_size, "store_bytes": store_bytes}
    timings = {"train_seconds": train_seconds, "setup_seconds": setup_seconds,
               "epoch_seconds": (train_seconds - setup_seconds) / epochs,
               **serving_latency(student, serve, timed)}
    run.set_metrics(out)  # same seed -> identical file
    run.set_timings(timings)  # machine-dependent: reports/timings/
    return {**out, **timings}
