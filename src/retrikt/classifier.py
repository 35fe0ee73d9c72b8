"""Task classifiers: encode task examples, class probabilities, sentence embeddings, a training loop.

Shared by the teacher/reward model and the students. A classifier folder is a standard HF
``*ForSequenceClassification`` folder plus ``retrikt_classifier.json`` (task, labels, max_length).
Embeddings are the attention-masked mean of the last hidden layer, L2-normalised (the
sentence-transformers pooling all-MiniLM-L6-v2 was trained with), so inner product = cosine.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from retrikt import paths
from retrikt.device import to_device
from retrikt.io import atomic_dir, atomic_write_json, read_json
from retrikt.models import ensure_pad_token
from retrikt.progress import bar
from retrikt.tasks import Task, get_task

log = logging.getLogger(__name__)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T, H]`` -> ``[B, H]``: the mean over the tokens ``mask`` marks (None: every token)."""
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


POOLINGS = ("cls", "mean")
PAIR_SEPARATOR = "\n"  # put before a pair's second text where the tokenizer's pair template separates nothing
DTYPES = ("float32", "bfloat16")  # training compute dtypes of :func:`fit`


class MeanPooler(torch.nn.Module):
    """A BERT pooler (its ``dense`` + ``activation``) applied to the attention-masked mean of the last
    layer instead of the [CLS] vector.

    Sentence-transformers encoders such as all-MiniLM-L6-v2 were trained through mean pooling; their
    [CLS] vector carries little of the input (after 2 layers of all-MiniLM-L6-v2 it is the same for
    every CB example: pairwise cosine 1.000), so a head on it learns nothing until the encoder has
    re-learned [CLS]. The weights keep their names (``pooler.dense.*``), so a saved folder is a normal
    HF folder; ``retrikt_classifier.json`` records ``pooling`` and :meth:`Classifier.load` re-installs it.
    """

    def __init__(self, pooler: torch.nn.Module):
        super().__init__()
        self.dense, self.activation = pooler.dense, pooler.activation
        self.mask: torch.Tensor | None = None  # set by a pre-hook on the base model, per forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(mean_pool(hidden_states, self.mask)))


def set_pooling(model, pooling: str):
    """Make a ``*ForSequenceClassification`` classify from ``pooling`` (``cls``: as loaded; ``mean``:
    the masked token mean). BERT-like models (a ``pooler`` with ``dense`` + ``activation``) get a
    :class:`MeanPooler`; RoBERTa-style ones (MPNet, RoBERTa: a ``classifier`` head that reads token 0 of
    the sequence output) get a pre-hook that hands their head the mean in token 0's place. Either way
    the weights keep their names. Returns the model."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    if pooling == "cls" or getattr(model, "_retrikt_mean_pooling", False):
        return model
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler = getattr(base, "pooler", None)
    head = getattr(model, "classifier", None)
    if pooler is not None and hasattr(pooler, "dense"):
        base.pooler = pooler = MeanPooler(pooler)
        state = pooler
    elif base is not None and head is not None and hasattr(head, "out_proj"):
        state = head
        # the head reads token 0 of its input: give it [B, 1, H], the masked mean
        head.register_forward_pre_hook(lambda _m, args: (mean_pool(args[0], state.mask).unsqueeze(1), *args[1:]))
    else:
        raise ValueError(f"{type(model).__name__}: pooling 'mean' needs a BERT-like pooler (dense + activation) "
                         "or a RoBERTa-style classifier head (dense + out_proj on token 0)")
    state.mask = None

    def keep_mask(_module, args, kwargs):
        state.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    base.register_forward_pre_hook(keep_mask, with_kwargs=True)
    model._retrikt_mean_pooling = True
    return model


def _report_new_head(model, info: dict, base_dir: str | Path) -> None:
    """One line about the freshly initialised head; a warning if weights of the base model itself
    were missing (that is not expected and would be a broken base folder)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    missing = sorted(info.get("missing_keys", ()))
    body = [k for k in missing if k.startswith(prefix)]
    if body:
        log.warning("%s: %d base-model weights missing and newly initialised: %s", base_dir, len(body),
                    ", ".join(body[:8]) + (" ..." if len(body) > 8 else ""))
    head = [k for k in missing if not k.startswith(prefix)]
    unused = sorted(info.get("unexpected_keys", ()))
    log.info("%s: new %d-class head (%s)%s", base_dir, model.config.num_labels, ", ".join(head) or "none",
             f"; {len(unused)} checkpoint weights unused" if unused else "")


def _with_padding(model, tokenizer):
    """A freshly loaded (model, tokenizer) made to pad: EOS as the pad token where the tokenizer has
    none (decoder-only models), and the model config told which id that is."""
    ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class Classifier:
    """A sequence classifier bound to a task: renders examples, batches, predicts and embeds."""

    def __init__(self, model, tokenizer, task: Task, max_length: int = 128, pooling: str = "cls"):
        """Binds ``model`` (its pooling head installed by :func:`set_pooling`) and ``tokenizer``, which
        must pad: :meth:`from_base` and :meth:`load` make them so (:func:`_with_padding`); the tokenizer
        and config a caller passes are not changed here."""
        if tokenizer.pad_token is None or getattr(model.config, "pad_token_id", None) is None:
            raise ValueError("Classifier needs a tokenizer with a pad token and a model config with pad_token_id "
                             "(Classifier.from_base / Classifier.load set both)")
        self.model, self.tokenizer, self.task, self.max_length = model, tokenizer, task, max_length
        self.pooling = pooling
        # decoder tokenizers (SmolLM2, GPT-2) encode a pair as the two texts run together ("sat.A dog"):
        # their template adds no token between the segments. BERT: [SEP]; MPNet/RoBERTa: </s></s>.
        self.pair_prefix = PAIR_SEPARATOR if tokenizer.num_special_tokens_to_add(pair=True) <= \
            tokenizer.num_special_tokens_to_add(pair=False) else ""
        set_pooling(model, pooling)

    # -- construction ------------------------------------------------------------------------- #
    @classmethod
    def from_base(cls, base_dir: str | Path, task: Task, max_length: int = 128, num_layers: int | None = None,
                  pooling: str = "cls", device: "torch.device | str" = "cpu") -> "Classifier":
        """A fresh classification head on a base encoder/decoder folder (optionally its first layers),
        on ``device`` (truncated first, so dropped layers never travel); the head reads ``pooling``
        (:func:`set_pooling`)."""
        import transformers

        from retrikt.progress import quiet_load_report

        with quiet_load_report():  # the head is new by design: say so in one line, not a table
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                base_dir, num_labels=task.num_labels, dtype="float32", output_loading_info=True,
                id2label=dict(enumerate(task.labels)), label2id={n: i for i, n in enumerate(task.labels)})
        _report_new_head(model, info, base_dir)
        if num_layers is not None:
            from retrikt.models import truncate_encoder

            truncate_encoder(model, num_layers)
        model, tok = _with_padding(model.to(device), transformers.AutoTokenizer.from_pretrained(base_dir))
        return cls(model, tok, task, max_length, pooling)

    @classmethod
    def load(cls, folder: str | Path, device: "torch.device | str" = "cpu") -> "Classifier":
        """A saved classifier, in eval mode, on ``device``."""
        import transformers

        meta = read_json(Path(folder) / paths.CLASSIFIER_META)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype="float32")
        model, tok = _with_padding(model.to(device).eval(), transformers.AutoTokenizer.from_pretrained(folder))
        return cls(model, tok, get_task(meta["task"]), meta["max_length"], meta.get("pooling", "cls"))

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        with atomic_dir(folder) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / paths.CLASSIFIER_META, {"task": self.task.name, "labels": list(self.task.labels),
                                                            "max_length": self.max_length, "pooling": self.pooling,
                                                            **(extra or {})})
        return Path(folder)

    # -- encoding and inference ---------------------------------------------------------------- #
    def texts(self, example: dict) -> tuple[str] | tuple[str, str]:
        """The text(s) this classifier's tokenizer is given for ``example``: the task's rendering, the
        second text of a pair prefixed with :data:`PAIR_SEPARATOR` (``self.pair_prefix``) where the
        tokenizer would otherwise run the two together. Its character offsets are shifted by that."""
        a, b = self.task.render(example)
        return (a,) if b is None else (a, self.pair_prefix + b)

    def encode(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Tokenised examples, on the model's device."""
        texts = [self.texts(ex) for ex in examples]
        kw = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if all(len(t) == 2 for t in texts):
            enc = self.tokenizer([t[0] for t in texts], [t[1] for t in texts], **kw)
        else:
            enc = self.tokenizer([t[0] for t in texts], **kw)
        return to_device(enc, self.model.device)

    def forward(self, examples: Sequence[dict], hidden: bool = False):
        enc = self.encode(examples)
        out = self.model(**enc, output_hidden_states=hidden)
        return out, enc

    @torch.no_grad()
    def _batched(self, examples: Sequence[dict], fn: Callable, batch_size: int, desc: str | None) -> np.ndarray:
        """``fn`` over batches of ``examples``, in eval mode; a progress bar (unit: example) if ``desc``."""
        was_training = self.model.training
        self.model.eval()
        parts = []
        with contextlib.ExitStack() as stack:
            b = stack.enter_context(bar(total=len(examples), desc=desc, unit="example")) if desc else None
            for i in range(0, len(examples), batch_size):
                parts.append(fn(examples[i:i + batch_size]))
                if b is not None:
                    b.update(len(parts[-1]))
        self.model.train(was_training)
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def logits(self, examples: Sequence[dict], batch_size: int = 32, desc: str | None = None) -> np.ndarray:
        """Logits ``[N, C]``; ``desc`` names a progress bar (leave it None for small or repeated calls)."""
        return self._batched(examples, lambda b: self.forward(b)[0].logits.float().cpu().numpy(), batch_size, desc)

    def predict_proba(self, examples: Sequence[dict], batch_size: int = 32, desc: str | None = None) -> np.ndarray:
        z = self.logits(examples, batch_size, desc)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def embed_tensor(self, examples: Sequence[dict]) -> torch.Tensor:
        """L2-normalised mean-pooled last hidden layer, with gradients (for training students)."""
        out, enc = self.forward(examples, hidden=True)
        return torch.nn.functional.normalize(mean_pool(out.hidden_states[-1], enc["attention_mask"]), dim=-1)

    def embed(self, examples: Sequence[dict], batch_size: int = 32, desc: str | None = None) -> np.ndarray:
        """L2-normalised embeddings ``[N, H]``; ``desc`` names a progress bar."""
        return self._batched(examples, lambda b: self.embed_tensor(b).float().cpu().numpy(), batch_size, desc)


def batches(n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool = True) -> Iterator[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def linear_warmup(optimizer, total_steps: int, warmup_ratio: float):
    warm = max(1, int(total_steps * warmup_ratio))

    def f(step: int) -> float:
        return (step + 1) / warm if step < warm else max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def evaluate(clf: Classifier, rows: Sequence[dict], batch_size: int = 32) -> tuple[dict[str, float], np.ndarray]:
    """Task metrics on labelled rows, and the class probabilities."""
    proba = clf.predict_proba(rows, batch_size)
    preds = proba.argmax(1).tolist()
    return clf.task.compute_metrics([r["label"] for r in rows], preds), proba


@dataclass
class Objective:
    """What the shared loop needs from a method: how many items an epoch covers, the loss of a
    batch of item indices, and validation class probabilities."""

    n_items: int
    loss: Callable[[list[int]], torch.Tensor]
    predict: Callable[[Sequence[dict]], np.ndarray]
    release: Callable[[], None] = lambda: None  # undoes what the method attached to the student (a hook)
    extra: Any = None  # what the method keeps for saving and serving (``retrikt``: its Retrieval)


def write_predictions(task: str, name: str, rows: list[dict], proba) -> None:
    """Validation predictions in the shared format evaluate reads (idx, gold, predicted, probabilities)."""
    atomic_write_json(paths.predictions(task, name), {
        "idx": [r.get("idx", i) for i, r in enumerate(rows)], "label": [r["label"] for r in rows],
        "pred": proba.argmax(1).tolist(), "proba": [[round(float(p), 6) for p in row] for row in proba]})


def ce_objective(clf: Classifier, train: Sequence[dict]) -> Objective:
    """Cross-entropy of ``clf`` on the gold labels of ``train``."""

    def loss(idx: list[int]) -> torch.Tensor:
        rows = [train[i] for i in idx]
        logits = clf.forward(rows)[0].logits
        return torch.nn.functional.cross_entropy(logits, torch.tensor([r["label"] for r in rows], device=logits.device))

    return Objective(len(train), loss, clf.predict_proba)


def fit(objective: Objective, student: Classifier, validation: Sequence[dict], *, epochs: int, lr: float,
        batch_size: int, seed: int, weight_decay: float, warmup_ratio: float,
        on_epoch: Callable[[dict], None] | None = None, desc: str = "train", dtype: str = "float32") -> list[dict]:
    """AdamW + linear warm-up/decay over ``objective``; one history row per epoch (validation metrics).

    ``dtype`` ``bfloat16``: the forward passes (loss and validation) run under ``torch.autocast``: matmuls
    in bf16, while softmax, layer norm and the losses stay float32, and so do the weights, gradients
    and AdamW state (the weights are their own float32 masters). On this 2-core AVX-512-bf16 CPU that
    is 1.65x (teacher) and 1.7x (students) per step with the fused AdamW (``benchmarks/bench_bf16.py``).
    AdamW always uses torch's fused kernel (``fused=True``: 10x faster than the per-tensor loop here).

    Progress (:mod:`retrikt.progress`): a bar over the epochs named ``desc`` and one per epoch over its
    batches with the running mean loss; off a terminal, one line per epoch (loss and validation metrics).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    task = student.task
    gen = torch.Generator().manual_seed(seed)  # CPU: it only shuffles indices
    params = [p for p in student.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)

    def cast():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(student.model.device.type, dtype=getattr(torch, dtype))

    steps = math.ceil(objective.n_items / batch_size)
    sched = linear_warmup(opt, epochs * steps, warmup_ratio)
    history = []
    with bar(total=epochs, desc=desc, unit="epoch") as run_bar:
        for epoch in range(1, epochs + 1):
            student.model.train()
            total, n = 0.0, 0
            with bar(total=steps, desc=f"{desc} epoch {epoch}/{epochs}", unit="batch") as epoch_bar:
                for idx in batches(objective.n_items, batch_size, gen):
                    with cast():
                        loss = objective.loss(idx)
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    total, n = total + loss.item() * len(idx), n + len(idx)
                    epoch_bar.update(1)
                    epoch_bar.set_postfix(loss=total / n)
                with cast():
                    preds = objective.predict(validation).argmax(1).tolist()
                metrics = task.compute_metrics([r["label"] for r in validation], preds)
                epoch_bar.set_postfix(**{f"val_{k}": v for k, v in metrics.items()})
            row = {"epoch": epoch, "train_loss": total / max(n, 1), **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(row)
            run_bar.update(1)
            run_bar.set_postfix(loss=row["train_loss"], **{f"val_{k}": v for k, v in metrics.items()})
            if on_epoch:
                on_epoch(row)
    student.model.eval()
    return history


def train_classifier(clf: Classifier, train: Sequence[dict], validation: Sequence[dict], *, epochs: int, lr: float,
                     batch_size: int, seed: int, weight_decay: float, warmup_ratio: float,
                     on_epoch: Callable[[dict], None] | None = None, desc: str = "train",
                     dtype: str = "float32") -> list[dict]:
    """Cross-entropy fine-tuning on gold labels (the teacher; the ``finetune`` student)."""
    return fit(ce_objective(clf, train), clf, validation, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
               weight_decay=weight_decay, warmup_ratio=warmup_ratio, on_epoch=on_epoch, desc=desc, dtype=dtype)
