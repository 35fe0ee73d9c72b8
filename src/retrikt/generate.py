"""`generate` stage (RetriKT step 3): sample a knowledge store of soft-labelled task examples.

1. Prompt: the PPO-tuned soft prompt (``models/<task>/ppo``) when ``rl.enabled`` and it exists,
   else the step-1 prompt (``models/<task>/prompt``).
2. Conditioning labels: ``generate.num_samples`` of them, balanced (equal per label, remainder to
   the first labels) or drawn from the train label prior; seeded, shuffled.
3. Sample, parse (``task.parse``; unparsable samples are dropped), remove copies of train or
   validation examples (no leakage into the store), exact duplicates and near duplicates (Jaccard
   over word 3-grams >= ``near_dup_threshold`` against an entry already kept; the first is kept).
   Comparisons use the normalised serialisation (lower case, whitespace collapsed).
   Samples cut off by ``max_new_tokens`` (no EOS) are kept if they parse; ``truncated_rate`` and
   ``truncated_in_store`` count them (a high rate: the prompt has not learned to stop, or
   max_new_tokens is too small for the task).
4. The reward model (the task teacher) gives every entry soft labels; with
   ``filter_by_teacher`` only entries whose teacher argmax equals the conditioning label stay.

Writes ``data/store/<task>/entries.jsonl`` (``id`` 0..N-1, the task's input fields, ``label`` = the
conditioning label, ``soft_label`` = teacher probabilities, ``text`` = the raw sample),
``stats.json`` (= the stage metrics; wall-clock numbers go to ``run.set_timings`` only, so the
folder is byte-identical for a given seed) and ``preview.md`` (the first 20 entries). An empty store
is an error (:class:`GenerationError`): the index and the retrieval students need entries.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from retrikt import paths
from retrikt.classifier import Classifier
from retrikt.generator import load_with_prompt, sample_full, source_text
from retrikt.io import DataError, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from retrikt.params import Params
from retrikt.rl.rewards import corpus_self_bleu
from retrikt.tasks import Task, get_task

log = logging.getLogger(__name__)
SELF_BLEU_MAX = 200  # self-BLEU is O(n^2): computed on a seeded sample of at most this many entries
PREVIEW = 20


class GenerationError(DataError):
    """Nothing usable was generated (one-line message; the CLI exits 1)."""


# ------------------------------------------------------------------------------ pure helpers
def normalise(text: str) -> str:
    """Lower-cased text with every whitespace run collapsed to one space (the comparison key)."""
    return " ".join(text.lower().split())


def word_ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n words is one (shorter) gram."""
    words = normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def dedupe(texts: Sequence[str], threshold: float, n: int = 3) -> tuple[list[int], int, int]:
    """Indices of texts to keep, and the numbers of exact and near duplicates removed.

    A text is an exact duplicate if its normalised form equals a kept one's, a near duplicate if its
    word n-gram Jaccard similarity to some kept text is >= ``threshold``. An inverted index over
    n-grams finds the kept texts sharing grams, so only those are compared.
    """
    kept: list[int] = []
    seen: set[str] = set()
    grams_of: list[set] = []
    index: dict[tuple, list[int]] = defaultdict(list)  # gram -> positions in `kept`
    exact = near = 0
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in seen:
            exact += 1
            continue
        grams = word_ngrams(text, n)
        shared = Counter(k for g in grams for k in index.get(g, ()))
        if any(c / (len(grams) + len(grams_of[k]) - c) >= threshold for k, c in shared.items()):
            near += 1
            continue
        for g in grams:
            index[g].append(len(kept))
        kept.append(i)
        seen.add(key)
        grams_of.append(grams)
    return kept, exact, near


def draw_labels(n: int, num_labels: int, balance: bool, prior: Sequence[float], seed: int) -> list[int]:
    """``n`` conditioning labels: balanced (remainder to the first labels) or from ``prior``; shuffled."""
    rng = np.random.default_rng(seed)
    if balance:
        labels = [lab for lab in range(num_labels) for _ in range(n // num_labels + (lab < n % num_labels))]
        return [int(x) for x in rng.permutation(labels)]
    p = np.asarray(prior, dtype=float)
    return [int(x) for x in rng.choice(num_labels, size=n, p=p / p.sum())]


def label_prior(rows: Sequence[dict], num_labels: int) -> list[float]:
    counts = Counter(r["label"] for r in rows)
    return [counts[lab] / max(1, len(rows)) for lab in range(num_labels)]


def clean_samples(task: Task, texts: Sequence[str], train: Sequence[dict], validation: Sequence[dict],
                  threshold: float) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """Parse, de-leak and dedupe samples: the surviving ``(sample index, example)`` pairs, in order, and
    the counts ``parsed``, ``leaked_train``, ``leaked_validation``, ``exact_duplicates``, ``near_duplicates``.

    Leakage is checked first (every copy of a train/validation example counts as leaked), then exact
    and near duplicates among the rest.
    """
    parsed = [(i, ex) for i, ex in enumerate(task.parse(t) for t in texts) if ex is not None]
    known = {split: {normalise(task.serialise(r)) for r in rows}
             for split, rows in (("train", train), ("validation", validation))}
    counts = {"parsed": len(parsed), "leaked_train": 0, "leaked_validation": 0}
    clean = []
    for i, ex in parsed:
        key = normalise(task.serialise(ex))
        split = next((s for s, keys in known.items() if key in keys), None)
        if split:
            counts[f"leaked_{split}"] += 1
        else:
            clean.append((i, ex))
    unique, counts["exact_duplicates"], counts["near_duplicates"] = dedupe(
        [task.serialise(ex) for _, ex in clean], threshold)
    return [clean[k] for k in unique], counts


def _preview(task: Task, entries: list[dict]) -> str:
    parts = [f"# Store preview: {task.name} (first {min(PREVIEW, len(entries))} of {len(entries)} entries)\n"]
    for e in entries[:PREVIEW]:
        probs = ", ".join(f"{name} {p:.2f}" for name, p in zip(task.labels, e["soft_label"]))
        parts.append(f"## {e['id']}: conditioned on {task.labels[e['label']]} (teacher: {probs})\n\n"
                     f"```\n{task.serialise(e)}\n```\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------ the stage
def generate(params: Params, task_name: str, run) -> dict:
    task, gp = get_task(task_name), params.generate
    train = read_jsonl(paths.split_file(task.name, "train"))
    validation = read_jsonl(paths.split_file(task.name, "validation"))
    use_ppo = params.rl.enabled and (paths.ppo(task.name) / "adapter_config.json").exists()
    adapter = paths.ppo(task.name) if use_ppo else paths.prompt(task.name)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter}: no soft prompt (run the prompt_tune stage first)")
    model, tok = load_with_prompt(paths.base_model("generator"), adapter)

    labels = draw_labels(gp.num_samples, task.num_labels, gp.balance, label_prior(train, task.num_labels),
                         params.seed)
    log.info("generate: %d samples from %s", len(labels), adapter)
    t0 = time.time()
    drawn = sample_full(model, tok, [source_text(task, lab) for lab in labels], max_new_tokens=gp.max_new_tokens,
                        temperature=gp.temperature, top_p=gp.top_p, batch_size=gp.batch_size, seed=params.seed)
    seconds, texts = time.time() - t0, drawn.texts
    del model

    cands, counts = clean_samples(task, texts, train, validation, gp.near_dup_threshold)
    proba = Classifier.load(paths.teacher(task.name)).predict_proba([ex for _, ex in cands]) if cands else None
    agree = [int(proba[j].argmax()) == labels[i] for j, (i, _) in enumerate(cands)]
    keep = [j for j in range(len(cands)) if agree[j] or not gp.filter_by_teacher]
    if not keep:
        raise GenerationError(f"generate: 0 of {len(texts)} samples survived parsing/dedup"
                              f"{'/teacher filter' if gp.filter_by_teacher else ''} ({counts['parsed']} parsed, "
                              f"{counts['leaked_train'] + counts['leaked_validation']} copies of train/validation "
                              f"rows); raise generate.num_samples or train the prompt longer")

    entries = []
    for new_id, j in enumerate(keep):
        i, ex = cands[j]
        entries.append({"id": new_id, **{f: ex[f] for f in task.input_fields}, "label": labels[i],
                        "soft_label": [round(float(p), 6) for p in proba[j]], "text": texts[i]})

    serials = [task.serialise(e) for e in entries]
    if len(serials) > SELF_BLEU_MAX:
        serials = random.Random(params.seed).sample(serials, SELF_BLEU_MAX)

    n_parsed = counts["parsed"]
    per_label = Counter(e["label"] for e in entries)
    metrics = {
        "prompt": "ppo" if use_ppo else "prompt_tune",
        "samples": len(texts), **counts, "parse_rate": n_parsed / max(1, len(texts)),
        "leaked_removed": counts["leaked_train"] + counts["leaked_validation"],
        "exact_duplicate_rate": counts["exact_duplicates"] / max(1, n_parsed),
        "near_duplicate_rate": counts["near_duplicates"] / max(1, n_parsed),
        "teacher_agreement": float(np.mean(agree)), "teacher_filtered": len(cands) - len(keep),
        "size": len(entries), "label_counts": {name: per_label[lab] for lab, name in enumerate(task.labels)},
        "self_bleu": corpus_self_bleu(serials), "self_bleu_entries": len(serials),
        "truncated_rate": drawn.finished.count(False) / max(1, len(texts)),
        "truncated_in_store": sum(not drawn.finished[cands[j][0]] for j in keep),
        "generated_tokens": drawn.tokens,
    }
    out = paths.store(task.name)
    write_jsonl(out / "entries.jsonl", entries)
    atomic_write_json(out / "stats.json", metrics)
    preview = atomic_write_text(out / "preview.md", _preview(task, entries))
    run.log_artifact(preview)
    run.set_metrics(metrics)
    run.set_timings({"generation_seconds": seconds, "tokens_per_second": drawn.tokens / max(seconds, 1e-9)})
    log.info("generate: store of %d entries (parse rate %.2f, self-BLEU %.3f)", len(entries),
             metrics["parse_rate"], metrics["self_bleu"])
    return metrics
