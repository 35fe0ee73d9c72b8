"""`generate` stage (RetriKT step 3): build the knowledge store of soft-labelled task examples.

``generate.source: llm`` (the method):

1. Prompt: the RL-tuned soft prompt (``models/<task>/rl``) when ``rl.enabled`` and it was kept,
   else the step-1 prompt (``models/<task>/prompt``).
2. Conditioning labels: ``generate.num_samples`` of them, balanced (equal per label, remainder to
   the first labels) or drawn from the train label prior; seeded, shuffled.
3. Sample (:mod:`retrikt.sampling`: ``generate.batch_size`` decode slots, compute ``generate.dtype``,
   ``max_new_tokens`` as given or ``auto``, sized from the task's train rows), then keep a sample only
   if it ended — with EOS, or, with ``generate.end_at_last_line``, at the newline after its last field
   line (what follows is cut, and counted: ``cut_at_last_line``; ``eos_rate`` is the share the model
   ended itself) — and parses strictly (:meth:`retrikt.tasks.Task.read`: exactly the serialisation's
   lines; the failure reasons are counted). A sample cut by the budget is ``unfinished``: never in the
   store.

``generate.source: oracle`` (a diagnostic beyond the paper): the entries are real train rows that
``data.train_limit`` left out (``spare.jsonl``), at most ``num_samples`` of them (seeded), their gold
labels dropped. It separates "is the generated store good enough" from "does retrieval beat KD given
a good store".

Then, for both sources: remove copies of train or validation examples (no leakage into the store),
exact duplicates and near duplicates (Jaccard over word 3-grams >= ``near_dup_threshold`` against an
entry already kept; the first is kept), comparing normalised serialisations. The reward model (the
task teacher) gives every entry soft labels; with ``filter_by_teacher`` only entries whose teacher
argmax equals the conditioning label stay. A store smaller than ``generate.min_entries`` stops the
stage with one line giving the parse and truncation rates.

Writes ``data/store/<task>/entries.jsonl`` (``id`` 0..N-1, the task's input fields, ``label`` = the
conditioning label (null for oracle entries), ``soft_label`` = teacher probabilities, ``text`` = the
raw sample), ``stats.json`` (= the stage metrics; wall-clock numbers go to ``run.set_timings`` only,
so the folder is byte-identical for a given seed, device, dtype and thread count) and ``preview.md``.
Metrics include the store's self-BLEU next to that of as many real train rows, and the length
distribution (generator tokens) of the store next to the train split's.
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
from retrikt.device import resolve_device, resolve_dtype
from retrikt.io import (
    DataError,
    MissingInputError,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    write_jsonl,
)
from retrikt.llm import (
    draw_labels,
    label_prior,
    length_budget,
    load_tokenizer,
    load_with_prompt,
    sample_full,
    source_text,
    target_lengths,
)
from retrikt.params import Params
from retrikt.progress import bar
from retrikt.rl.rewards import corpus_self_bleu
from retrikt.sampling import field_name_tokens
from retrikt.tasks import PARSE_FAILURES, Task, get_task, normalise_ws

log = logging.getLogger(__name__)
SELF_BLEU_MAX = 200  # self-BLEU is O(n^2): computed on a seeded sample of at most this many entries
PREVIEW = 20


class GenerationError(DataError):
    """Nothing usable was generated (one-line message; the CLI exits 1)."""


# ------------------------------------------------------------------------------ pure helpers
def normalise(text: str) -> str:
    """Lower-cased text with every whitespace run collapsed to one space (the comparison key)."""
    return normalise_ws(text.lower())


def word_ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n words is one (shorter) gram."""
    words = normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def jaccard(a: set, b: set, shared: int | None = None) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets). ``shared`` is |a ∩ b| where the caller has counted it
    already (:func:`dedupe`, from its inverted index), so the sets are not intersected again."""
    inter = len(a & b) if shared is None else shared
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


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
        if any(jaccard(grams, grams_of[k], c) >= threshold for k, c in shared.items()):
            near += 1
            continue
        for g in grams:
            index[g].append(len(kept))
        kept.append(i)
        seen.add(key)
        grams_of.append(grams)
    return kept, exact, near


def clean_examples(task: Task, examples: Sequence[dict], train: Sequence[dict], validation: Sequence[dict],
                   threshold: float) -> tuple[list[int], dict[str, int]]:
    """De-leak and dedupe parsed examples: the indices that survive, in order, and the counts
    ``leaked_train``, ``leaked_validation``, ``exact_duplicates``, ``near_duplicates``.

    Leakage is checked first (every copy of a train/validation example counts as leaked), then exact
    and near duplicates among the rest.
    """
    known = {split: {normalise(task.serialise(r)) for r in rows}
             for split, rows in (("train", train), ("validation", validation))}
    counts = {"leaked_train": 0, "leaked_validation": 0}
    clean = []
    for i, ex in enumerate(examples):
        key = normalise(task.serialise(ex))
        split = next((s for s, keys in known.items() if key in keys), None)
        if split:
            counts[f"leaked_{split}"] += 1
        else:
            clean.append(i)
    unique, counts["exact_duplicates"], counts["near_duplicates"] = dedupe(
        [task.serialise(examples[i]) for i in clean], threshold)
    return [clean[k] for k in unique], counts


def _preview(task: Task, entries: list[dict]) -> str:
    parts = [f"# Store preview: {task.name} (first {min(PREVIEW, len(entries))} of {len(entries)} entries)\n"]
    for e in entries[:PREVIEW]:
        probs = ", ".join(f"{name} {p:.2f}" for name, p in zip(task.labels, e["soft_label"]))
        cond = f"conditioned on {task.labels[e['label']]}" if e["label"] is not None else "real train row"
        parts.append(f"## {e['id']}: {cond} (teacher: {probs})\n\n"
                     f"```\n{task.serialise(e)}\n```\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------ the stage
def _quantiles(values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {"median": 0.0, "p05": 0.0, "p95": 0.0}
    q = np.percentile(np.asarray(values, dtype=float), [5, 50, 95])
    return {"p05": float(q[0]), "median": float(q[1]), "p95": float(q[2])}


def _self_bleu_sample(task: Task, rows: Sequence[dict], seed: int) -> tuple[float, int]:
    """Self-BLEU of the serialisations of at most SELF_BLEU_MAX rows (seeded sample)."""
    serials = [task.serialise(r) for r in rows]
    if len(serials) > SELF_BLEU_MAX:
        serials = random.Random(seed).sample(serials, SELF_BLEU_MAX)
    return corpus_self_bleu(serials), len(serials)


def _sample_llm(params: Params, task: Task, train: list[dict]) -> tuple[list[tuple[dict, int | None, str]],
                                                                       dict, dict]:
    """LLM samples that ended and parsed: ``(example, conditioning label, raw text)``, counts, timings."""
    gp = params.generate
    use_rl = params.rl.enabled and (paths.rl(task.name) / paths.ADAPTER_FILE).exists()
    adapter = paths.rl(task.name) if use_rl else paths.prompt(task.name)
    if not (adapter / paths.ADAPTER_FILE).exists():
        raise MissingInputError(f"{adapter}: no soft prompt (run the prompt_tune stage first)")
    device = resolve_device(params.device)
    dtype = resolve_dtype(gp.dtype, device)
    model, tok = load_with_prompt(paths.base_model("generator"), adapter, device=device)
    budget = length_budget(gp.max_new_tokens, tok, task, train)
    forced = gp.force_field_names and field_name_tokens(tok, task.line_names) is not None
    if gp.force_field_names and not forced:
        log.warning("generate: this tokenizer merges line breaks with text: field names are not forced")
    labels = draw_labels(np.random.default_rng(params.seed), gp.num_samples, task.num_labels,
                         "balanced" if gp.balance else "prior", label_prior(train, task.num_labels))
    log.info("generate: %d samples from %s (max_new_tokens %d, %s)", len(labels), adapter, budget, dtype)
    t0 = time.time()
    with bar(total=len(labels), desc=f"generate {task.name}: sampling", unit="sample") as b:
        drawn = sample_full(model, tok, [source_text(task, lab) for lab in labels], max_new_tokens=budget,
                            temperature=gp.temperature, top_p=gp.top_p, batch_size=gp.batch_size, seed=params.seed,
                            dtype=dtype, stop_lines=len(task.line_names) if gp.end_at_last_line else None,
                            field_names=task.line_names if forced else None, on_done=lambda _: b.update(1))
        b.set_postfix(tokens_per_s=drawn.tokens / max(time.time() - t0, 1e-9))
    seconds = time.time() - t0
    del model
    ended = Counter(drawn.ended)
    failures = Counter({"unfinished": ended["budget"]})
    kept = []
    for text, how, lab in zip(drawn.texts, drawn.ended, labels):
        if how == "budget":
            continue
        ex, why = task.read(text)
        if ex is None:
            failures[why] += 1
        else:
            kept.append((ex, lab, text))
    counts = {"prompt": "rl" if use_rl else "prompt_tune", "samples": len(labels), "max_new_tokens": budget,
              "finished_rate": 1 - failures["unfinished"] / max(1, len(labels)),
              "eos_rate": ended["eos"] / max(1, len(labels)), "cut_at_last_line": ended["lines"],
              "field_names_forced": int(forced),
              "parse_failures": {k: failures[k] for k in ("unfinished", *PARSE_FAILURES)},
              "generated_tokens": drawn.tokens}
    timings = {"generation_seconds": seconds, "tokens_per_second": drawn.tokens / max(seconds, 1e-9)}
    return kept, counts, timings


def _sample_oracle(params: Params, task: Task) -> tuple[list[tuple[dict, int | None, str]], dict, dict]:
    """Real train rows outside the low-resource subset, gold labels dropped (seeded, at most num_samples)."""
    spare = read_jsonl(paths.spare_file(task.name))
    if not spare:
        raise GenerationError(f"generate: source oracle needs train rows outside the training subset, but "
                              f"{paths.spare_file(task.name)} is empty; set data.train_limit below the train size")
    if len(spare) > params.generate.num_samples:
        spare = random.Random(params.seed).sample(spare, params.generate.num_samples)
    kept = [({f: r[f] for f in task.input_fields}, None, task.serialise(r)) for r in spare]
    return kept, {"prompt": "oracle", "samples": len(kept)}, {}


def generate(params: Params, task_name: str, run) -> dict:
    task, gp = get_task(task_name), params.generate
    train = read_jsonl(paths.split_file(task.name, "train"))
    validation = read_jsonl(paths.split_file(task.name, "validation"))
    if gp.source == "oracle":
        drawn, counts, timings = _sample_oracle(params, task)
    else:
        drawn, counts, timings = _sample_llm(params, task, train)
    n_samples = counts["samples"]

    cands, clean = clean_examples(task, [ex for ex, _, _ in drawn], train, validation, gp.near_dup_threshold)
    teacher = Classifier.load(paths.teacher(task.name), resolve_device(params.device))
    proba = (teacher.predict_proba([drawn[i][0] for i in cands], desc=f"generate {task.name}: soft labels")
             if cands else np.zeros((0, task.num_labels)))
    conditioned = [drawn[i][1] for i in cands]
    agree = [lab is not None and int(p.argmax()) == lab for p, lab in zip(proba, conditioned)]
    keep = [j for j in range(len(cands)) if agree[j] or not gp.filter_by_teacher]
    rates = (f"{len(drawn)} of {n_samples} samples complete and parsed"
             + (f", {counts['parse_failures']['unfinished']} unfinished at max_new_tokens {counts['max_new_tokens']}"
                if "parse_failures" in counts else ""))
    if len(keep) < gp.min_entries:
        raise GenerationError(f"generate: a store of {len(keep)} entries is below generate.min_entries "
                              f"({gp.min_entries}): {rates}, {clean['leaked_train'] + clean['leaked_validation']} "
                              f"copies of train/validation rows, {clean['exact_duplicates'] + clean['near_duplicates']}"
                              " duplicates; raise generate.num_samples or tune the prompt longer")

    entries = []
    for new_id, j in enumerate(keep):
        i = cands[j]
        ex, lab, text = drawn[i]
        entries.append({"id": new_id, **{f: ex[f] for f in task.input_fields}, "label": lab,
                        "soft_label": [round(float(p), 6) for p in proba[j]], "text": text})

    per_label = Counter(e["label"] for e in entries)
    teacher_label = Counter(int(np.argmax(e["soft_label"])) for e in entries)
    store_bleu, n_bleu = _self_bleu_sample(task, entries, params.seed)
    train_bleu, n_train_bleu = _self_bleu_sample(task, train, params.seed)
    gen_tok = load_tokenizer(paths.base_model("generator"))
    metrics = {
        **counts, "complete_parsed": len(drawn), "parse_rate": len(drawn) / max(1, n_samples), **clean,
        "leaked_removed": clean["leaked_train"] + clean["leaked_validation"],
        "teacher_agreement": float(np.mean([agree[j] for j in keep])) if gp.source == "llm" else None,
        "teacher_filtered": len(cands) - len(keep), "size": len(entries),
        "label_counts": {name: per_label[lab] for lab, name in enumerate(task.labels)} if gp.source == "llm" else None,
        "teacher_label_counts": {name: teacher_label[lab] for lab, name in enumerate(task.labels)},
        "truncated_in_store": 0,  # unfinished samples never enter the store
        "self_bleu": store_bleu, "self_bleu_train": train_bleu, "self_bleu_rows": min(n_bleu, n_train_bleu),
        "length_tokens": _quantiles(target_lengths(gen_tok, task, entries)),
        "length_tokens_train": _quantiles(target_lengths(gen_tok, task, train)),
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    out = paths.store(task.name)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / paths.ENTRIES_FILE, entries)
        atomic_write_json(tmp / paths.STORE_STATS, metrics)
        atomic_write_text(tmp / paths.STORE_PREVIEW, _preview(task, entries))
    run.log_artifact(out / paths.STORE_PREVIEW)
    run.set_metrics(metrics)
    if timings:
        run.set_timings(timings)
    log.info("generate: store of %d entries (%s; self-BLEU %.3f vs train %.3f)", len(entries), rates,
             store_bleu, train_bleu)
    return metrics
