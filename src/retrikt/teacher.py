"""`teacher` stage: fine-tune the reward model / KD teacher on a task's train split.

It serves three roles later: class probabilities (the RL stage's confidence reward, soft labels of store entries,
KD targets) and embeddings (its similarity distribution over store entries, which the retrieval
student imitates). Default: all 6 layers of all-MiniLM-L6-v2 (``teacher.model: encoder``); any HF
encoder or decoder with a sequence-classification head works (``models.<role>`` + ``teacher.model``).
"""

from __future__ import annotations

from retrikt import paths
from retrikt.classifier import Classifier, evaluate, train_classifier, write_predictions
from retrikt.device import resolve_device, resolve_dtype
from retrikt.io import read_jsonl
from retrikt.models import count_parameters
from retrikt.params import Params
from retrikt.tasks import get_task


def teacher(params: Params, task_name: str, run) -> dict:
    task, tp = get_task(task_name), params.teacher
    train = read_jsonl(paths.split_file(task.name, "train"))
    validation = read_jsonl(paths.split_file(task.name, "validation"))
    device = resolve_device(params.device)
    clf = Classifier.from_base(paths.base_model(tp.model), task, tp.max_length, pooling=tp.pooling, device=device)
    train_classifier(clf, train, validation, epochs=tp.epochs, lr=tp.lr, batch_size=tp.batch_size, seed=params.seed,
                     weight_decay=tp.weight_decay, warmup_ratio=tp.warmup_ratio,
                     on_epoch=lambda row: run.add_plot_row("teacher_curve", row, step_key="epoch"),
                     desc=f"teacher {task.name}", dtype=resolve_dtype(tp.dtype, device))
    metrics, proba = evaluate(clf, validation)
    clf.save(paths.teacher(task.name), extra={"base": tp.model})
    write_predictions(task.name, "teacher", validation, proba)
    out = {**metrics, "parameters": count_parameters(clf.model)}
    run.set_metrics(out)
    return out
