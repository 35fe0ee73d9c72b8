"""`teacher` stage: fine-tune the reward model / KD teacher on a task's train split.

It serves three roles later: class probabilities (PPO accuracy reward, soft labels of store entries,
KD targets) and embeddings (its similarity distribution over store entries, which the retrieval
student imitates). Default: all 6 layers of all-MiniLM-L6-v2 (``teacher.model: encoder``); any HF
encoder or decoder with a sequence-classification head works (``models.<role>`` + ``teacher.model``).
"""

from __future__ import annotations

from retrikt import paths
from retrikt.classifier import Classifier, evaluate, train_classifier
from retrikt.io import atomic_write_json, read_jsonl
from retrikt.params import Params
from retrikt.tasks import get_task


def write_predictions(task: str, name: str, rows: list[dict], proba) -> None:
    """Validation predictions in the shared format evaluate reads (idx, gold, predicted, probabilities)."""
    atomic_write_json(paths.predictions(task, name), {
        "idx": [r.get("idx", i) for i, r in enumerate(rows)], "label": [r["label"] for r in rows],
        "pred": proba.argmax(1).tolist(), "proba": [[round(float(p), 6) for p in row] for row in proba]})


def teacher(params: Params, task_name: str, run) -> dict:
    task, tp = get_task(task_name), params.teacher
    train = read_jsonl(paths.split_file(task.name, "train"))
    validation = read_jsonl(paths.split_file(task.name, "validation"))
    clf = Classifier.from_base(paths.base_model(tp.model), task, tp.max_length)
    train_classifier(clf, train, validation, epochs=tp.epochs, lr=tp.lr, batch_size=tp.batch_size, seed=params.seed,
                     weight_decay=tp.weight_decay, warmup_ratio=tp.warmup_ratio,
                     on_epoch=lambda row: run.add_plot_row("teacher_curve", row, step_key="epoch"),
                     desc=f"teacher {task.name}", dtype=tp.dtype)
    metrics, proba = evaluate(clf, validation)
    clf.save(paths.teacher(task.name), extra={"base": tp.model})
    write_predictions(task.name, "teacher", validation, proba)
    n_params = sum(p.numel() for p in clf.model.parameters())
    out = {**metrics, "parameters": n_params}
    run.set_metrics(out)
    return out
