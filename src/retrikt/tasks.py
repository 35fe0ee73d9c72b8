"""Task registry: the one place that knows every GLUE / SuperGLUE task RetriKT supports.

Examples are plain dicts with the Hugging Face ``datasets`` field names and integer labels (see
``shared/data/glue/README.md``). For each task a :class:`Task` knows

* its input fields and label names,
* how a classifier sees an example (:meth:`Task.render` -> ``(text_a, text_b or None)``),
* how the generator writes an example (:meth:`Task.serialise`, a line-based ``field: value``
  format without the label) and how generated text is read back (:meth:`Task.parse`),
* the generator's conditioning text for a label (:meth:`Task.condition`),
* its metrics (:meth:`Task.compute_metrics`; the first metric is the primary one).

Serialisation collapses every whitespace run to one space, so values never span lines, and
``parse(serialise(ex))`` equals the example's input fields with whitespace-normalised strings
(:func:`normalise_ws`). Tasks with more structure than free text:

COPA (choice task, label 0/1 = choice1/choice2 is the more plausible alternative)
    Serialised as ``premise``, ``question`` (``cause``/``effect``), ``choice1``, ``choice2`` lines.
    Classifier input: ``text_a`` = premise + " What was the cause?" / " What happened as a
    result?", ``text_b`` = ``"choice1: <c1> choice2: <c2>"``. Both alternatives are in one pair so
    that a single two-way cross-encoder (the same head shape as every other task) compares them
    jointly; scoring (premise, choice) pairs separately would need a multiple-choice head.
WSC (label 1 = the pronoun span2 refers to span1)
    ``text: Mark told Pete many lies about *himself* ...`` style: span1 (the candidate referent)
    is wrapped in ``*...*`` and span2 (the pronoun) in ``[...]``, inside the whitespace-normalised
    text; markers may nest (``*[their] mothers*``). Parse recovers the word indices from the
    marker positions and the span texts from the marked surface. When the dataset's span text
    differs from the marked surface (about 90 rows differ in case, e.g. ``The lawyer`` vs text
    ``the lawyer``; a few have the wrong index or attached punctuation), an extra
    ``candidate:`` / ``pronoun:`` line (span1_text / span2_text) carries the exact text, so every mirror
    row round-trips. The line names share no suffix with ``text`` (they were ``span1_text`` /
    ``span2_text``, and prompted SmolLM2 wrote ``text: text: ...``, every field on one line).
    Classifier input: ``text_a`` = the marked text, ``text_b`` = ``Does "<span2>" refer to "<span1>"?``.
WiC (label 1 = the word has the same sense in both sentences)
    ``word: <lemma>`` then ``sentence1``/``sentence2`` lines with the target occurrence wrapped in
    ``*...*``; parse recovers the character offsets (of the whitespace-normalised sentences).
    Classifier input: ``text_a`` = ``"<word>: <marked sentence1>"``, ``text_b`` = marked sentence2.
BoolQ
    ``question`` and ``passage`` (``"<title> -- <paragraph>"``) lines; classifier pair
    (question, passage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

METRICS = ("accuracy", "f1", "macro_f1", "mcc")
# input fields that hold integers (word indices, character offsets); every other input field is a string
INT_FIELDS = frozenset({"span1_index", "span2_index", "start1", "start2", "end1", "end2"})
_FIELD_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*:(.*)$")
_EOS = re.compile(r"</s>|<eos>|<pad>|<\|[A-Za-z_]+\|>")


def _from_confusion(cm, metric: str):
    """A metric for each confusion matrix in ``cm`` (``[B, C, C]``, gold x predicted)."""
    import numpy as np

    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    true_count, pred_count = cm.sum(axis=2), cm.sum(axis=1)
    if metric == "accuracy":
        return tp.sum(axis=1) / n
    if metric in ("f1", "macro_f1"):
        denom = true_count + pred_count  # = 2tp + fp + fn
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
        return f1[:, 1] if metric == "f1" else f1.mean(axis=1)
    if metric == "mcc":
        cov = tp.sum(axis=1) * n - (true_count * pred_count).sum(axis=1)
        denom = np.sqrt((n**2 - (pred_count**2).sum(axis=1)) * (n**2 - (true_count**2).sum(axis=1)))
        return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    raise ValueError(f"unknown metric {metric!r}")


def normalise_ws(text: str) -> str:
    """Collapse every whitespace run (newlines included) to one space and strip the ends."""
    return " ".join(text.split())


PARSE_FAILURES = ("missing_field", "extra_text", "unlocated_span", "invalid")


class _Unparsable(ValueError):
    """Raised by a task's ``_from_lines`` with one of :data:`PARSE_FAILURES` as its message."""


def _locate(words: Sequence[str], span: str) -> int:
    """Word index of the one occurrence of ``span`` (a word sequence, case-insensitive) in ``words``;
    raises :class:`_Unparsable` when it occurs nowhere or more than once (ambiguous)."""
    want = span.lower().split()
    low = [w.lower() for w in words]
    hits = [i for i in range(len(low) - len(want) + 1) if want and low[i:i + len(want)] == want]
    if len(hits) != 1:
        raise _Unparsable("unlocated_span")
    return hits[0]


def _read_lines(text: str, names: Sequence[str], optional: Sequence[str] = ()) -> tuple[dict[str, str], str]:
    """The ``name: value`` lines of a serialisation, strictly: ``(values, "ok")`` or ``({}, reason)``.

    The text (up to an EOS-like token such as ``</s>`` or ``<|endoftext|>``, if one was written out) must
    be exactly the wanted field lines, each once, in serialisation order (optional ones may be left
    out); names are case-insensitive and values whitespace-normalised. Any other line, a repeated or
    out-of-order field, text after the last field, or a value that carries a field name written as
    ``name:`` inside it (``text: text: ...``, a span line run into the text line) is ``"extra_text"``; a
    required field that is missing or empty is ``"missing_field"``. (No real row of a mirrored task has a
    field name followed directly by a colon in a value; SST-2's three ``sentence :`` have a space.)
    """
    order = {n.lower(): i for i, n in enumerate(names)}
    inline = re.compile(r"(?<![A-Za-z0-9_])(?:" + "|".join(map(re.escape, names)) + r"):", re.IGNORECASE)
    found: dict[str, str] = {}
    at = -1
    for line in _EOS.split(text, maxsplit=1)[0].splitlines():
        if not line.strip():
            continue
        m = _FIELD_LINE.match(line)
        i = order.get(m.group(1).lower()) if m else None
        if i is None or i <= at:
            return {}, "extra_text"
        if inline.search(m.group(2)):
            return {}, "extra_text"
        at, found[names[i]] = i, normalise_ws(m.group(2))
    if any(not found.get(n) for n in names if n not in optional):
        return {}, "missing_field"
    return found, "ok"


@dataclass(frozen=True)
class Task:
    """A classification task: fields, labels, metrics, classifier and generator text formats."""

    name: str
    hf_path: str
    hf_config: str
    mirror_dir: str
    text_fields: tuple[str, ...]
    extra_fields: tuple[str, ...]
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    description: str
    label_words: tuple[str, ...] = ()  # label phrases for condition(); defaults to the label names

    # Serialised line names (in order) when they differ from input_fields, and optional ones.
    _LINES: ClassVar[tuple[str, ...] | None] = None
    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if not self.labels or not self.metrics or set(self.metrics) - set(METRICS):
            raise ValueError(f"task {self.name!r}: needs labels and metrics from {METRICS}")
        if self.label_words and len(self.label_words) != len(self.labels):
            raise ValueError(f"task {self.name!r}: one label word per label")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def input_fields(self) -> tuple[str, ...]:
        return self.text_fields + self.extra_fields

    @property
    def line_names(self) -> tuple[str, ...]:
        """The field names of :meth:`serialise`'s lines, in order (one line each)."""
        return self._LINES or self.input_fields

    # -- classifier input ---------------------------------------------------------------------
    def render(self, ex: Mapping[str, Any]) -> tuple[str, str | None]:
        """Classifier input ``(text_a, text_b)``; ``text_b`` is None for single-sentence tasks."""
        texts = [normalise_ws(ex[f]) for f in self.text_fields]
        return texts[0], (texts[1] if len(texts) > 1 else None)

    # -- generator text -----------------------------------------------------------------------
    def serialise(self, ex: Mapping[str, Any]) -> str:
        """Generator target text: one ``field: value`` line per input field, no label."""
        return "\n".join(f"{k}: {v}" for k, v in self._lines(ex).items())

    def parse(self, text: str) -> dict[str, Any] | None:
        """Input fields read back from (generated) ``serialise`` text; None if unusable (see :meth:`read`)."""
        return self.read(text)[0]

    def read(self, text: str) -> tuple[dict[str, Any] | None, str]:
        """``(example, "ok")``, or ``(None, reason)`` with a reason of :data:`PARSE_FAILURES`: the text is
        not exactly the serialisation's lines (``missing_field``, ``extra_text``), or its values do not
        make a valid example (``invalid``)."""
        vals, why = _read_lines(text, self.line_names, self._OPTIONAL)
        if why != "ok":
            return None, why
        try:
            ex = self._from_lines(vals)
            if ex is not None:
                self.validate(ex)
        except _Unparsable as e:
            return None, str(e)
        except ValueError:
            ex = None
        return (ex, "ok") if ex is not None else (None, "invalid")

    def _lines(self, ex: Mapping[str, Any]) -> dict[str, str]:
        return {f: normalise_ws(ex[f]) for f in self.line_names}

    def _from_lines(self, vals: dict[str, str]) -> dict[str, Any] | None:
        return {f: vals[f] for f in self.input_fields}

    def condition(self, label: int) -> str:
        """Generator conditioning text naming the task and the label in words."""
        self._check_label(label)
        word = (self.label_words or self.labels)[label]
        return f"Task: {self.description}. Label: {word}.\n"

    # -- validation ---------------------------------------------------------------------------
    def validate(self, ex: Mapping[str, Any]) -> None:
        """Raise ValueError unless ``ex`` has well-typed input fields and a valid label (if any)."""
        if not isinstance(ex, Mapping):
            raise ValueError(f"{self.name}: example must be a dict, got {type(ex).__name__}")
        for f in self.input_fields:
            if f not in ex:
                raise ValueError(f"{self.name}: missing field '{f}'")
            v, want = ex[f], (int if f in INT_FIELDS else str)
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"{self.name}: field '{f}' must be {want.__name__}, got {type(v).__name__}")
            if want is str and not v.strip():
                raise ValueError(f"{self.name}: empty field '{f}'")
        if ex.get("label") is not None:
            self._check_label(ex["label"])
        self._check(ex)

    def _check(self, ex: Mapping[str, Any]) -> None:
        """Task-specific checks, after the field types are known to be right."""

    def _check_label(self, label: Any) -> None:
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.num_labels:
            raise ValueError(f"{self.name}: bad label {label!r} (expected an int in 0..{self.num_labels - 1})")

    # -- metrics ------------------------------------------------------------------------------
    # The one implementation of every metric: from confusion matrices, so that evaluate's paired
    # bootstrap scores thousands of resamples with the same arithmetic as a single evaluation.
    def compute_metrics(self, y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
        """Every metric in ``self.metrics`` as a plain float (f1: binary, positive class 1; macro_f1:
        mean over all labels; an undefined F1 or MCC counts 0, as sklearn's ``zero_division=0``)."""
        import numpy as np

        t, p = np.asarray([int(y) for y in y_true]), np.asarray([int(y) for y in y_pred])
        if not len(t) or len(t) != len(p):
            raise ValueError(f"{self.name}: need equal, non-empty y_true/y_pred (got {len(t)}, {len(p)})")
        if t.min() < 0 or p.min() < 0 or max(t.max(), p.max()) >= self.num_labels:
            raise ValueError(f"{self.name}: labels must be class ids in 0..{self.num_labels - 1}")
        cm = self.confusion(t, p)
        return {m: float(_from_confusion(cm, m)[0]) for m in self.metrics}

    def confusion(self, y_true, y_pred, rows=None):
        """Confusion matrices ``[B, gold, predicted]`` (counts) of the example subsets ``rows`` (``[B, m]``
        indices into the arrays; default: one subset, every example)."""
        import numpy as np

        y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
        rows = np.arange(len(y_true))[None] if rows is None else np.atleast_2d(rows)
        c = self.num_labels
        cells = y_true[rows] * c + y_pred[rows] + (np.arange(rows.shape[0]) * c * c)[:, None]
        return np.bincount(cells.ravel(), minlength=rows.shape[0] * c * c).reshape(rows.shape[0], c, c)

    def metric_on_rows(self, y_true, y_pred, rows, metric: str):
        """``metric`` on each example subset in ``rows`` (``[B, m]``): a ``[B]`` array, computed exactly as
        :meth:`compute_metrics` computes it on all examples."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        return _from_confusion(self.confusion(y_true, y_pred, rows), metric)


class CopaTask(Task):
    """COPA: pick the more plausible cause/effect; label 0/1 = choice1/choice2 (see module doc)."""

    _LINES = ("premise", "question", "choice1", "choice2")
    _QUESTIONS: ClassVar[dict[str, str]] = {"cause": "What was the cause?", "effect": "What happened as a result?"}

    def render(self, ex: Mapping[str, Any]) -> tuple[str, str | None]:
        premise, c1, c2 = (normalise_ws(ex[f]) for f in ("premise", "choice1", "choice2"))
        return f"{premise} {self._QUESTIONS[ex['question']]}", f"choice1: {c1} choice2: {c2}"

    def _from_lines(self, vals: dict[str, str]) -> dict[str, Any] | None:
        return {**super()._from_lines(vals), "question": vals["question"].lower()}

    def _check(self, ex: Mapping[str, Any]) -> None:
        if ex["question"] not in self._QUESTIONS:
            raise ValueError(f"{self.name}: question must be 'cause' or 'effect', got {ex['question']!r}")


class WscTask(Task):
    """WSC: span1 marked ``*...*``, span2 (pronoun) marked ``[...]`` inline, and both span texts on their
    own lines (see module doc). Parsing reads the spans from the marks; when the marks are broken (a
    generator may drop or add one) it locates each span text in the unmarked text instead, if it occurs
    there exactly once, and otherwise reports ``unlocated_span``."""

    _LINES = ("text", "candidate", "pronoun")        # span1_text, span2_text
    _SPAN_LINES: ClassVar[tuple[str, str]] = ("candidate", "pronoun")
    _OPTIONAL = _SPAN_LINES  # a missing span line is read from the marks instead
    _MARKS: ClassVar[tuple[tuple[str, str], ...]] = (("*", "*"), ("[", "]"))

    def _mark(self, ex: Mapping[str, Any]) -> str:
        """The normalised text with both spans marked."""
        words = ex["text"].split()
        text, events = " ".join(words), []
        for k, (opener, closer) in enumerate(self._MARKS, 1):
            i, span = ex[f"span{k}_index"], normalise_ws(ex[f"span{k}_text"])
            start = sum(len(w) + 1 for w in words[:i])
            region = " ".join(words[i : i + len(span.split())])
            end = start + (len(span) if region.lower().startswith(span.lower()) else len(region))
            # left-to-right order at one position: closers, then openers of longer spans first
            events += [(start, 1, -end, opener), (end, 0, -start, closer)]
        for pos, *_, mark in sorted(events, reverse=True):
            text = text[:pos] + mark + text[pos:]
        return text

    def _lines(self, ex: Mapping[str, Any]) -> dict[str, str]:
        return {"text": self._mark(ex), "candidate": normalise_ws(ex["span1_text"]),
                "pronoun": normalise_ws(ex["span2_text"])}

    def _from_lines(self, vals: dict[str, str]) -> dict[str, Any] | None:
        marked = vals["text"]
        if any(marked.count(c) != n for c, n in (("*", 2), ("[", 1), ("]", 1))):
            return self._located(vals)
        chars: list[str] = []
        pos: dict[str, list[int]] = {"*": [], "[": [], "]": []}
        for ch in marked:
            if ch in pos:
                pos[ch].append(len(chars))
            else:
                chars.append(ch)
        plain = "".join(chars)
        out: dict[str, Any] = {"text": normalise_ws(plain)}
        for k, (s, e) in enumerate((pos["*"], pos["["] + pos["]"]), 1):
            surface = normalise_ws(plain[s:e])
            if s > e or not surface:
                return self._located(vals)
            while plain[s].isspace():
                s += 1
            inside_word = s > 0 and not plain[s - 1].isspace()
            out[f"span{k}_index"] = len(plain[:s].split()) - inside_word
            out[f"span{k}_text"] = vals.get(self._SPAN_LINES[k - 1]) or surface
        return out

    def _located(self, vals: dict[str, str]) -> dict[str, Any]:
        """Marks unusable: each span text found in the unmarked text (exactly once), else unlocated_span."""
        text = normalise_ws(re.sub(r"[*\[\]]", "", vals["text"]))
        out: dict[str, Any] = {"text": text}
        for k in (1, 2):
            span = vals.get(self._SPAN_LINES[k - 1])
            if not span:
                raise _Unparsable("unlocated_span")
            out[f"span{k}_index"], out[f"span{k}_text"] = _locate(text.split(), span), span
        return out

    def render(self, ex: Mapping[str, Any]) -> tuple[str, str | None]:
        s1, s2 = normalise_ws(ex["span1_text"]), normalise_ws(ex["span2_text"])
        return self._mark(ex), f'Does "{s2}" refer to "{s1}"?'

    def _check(self, ex: Mapping[str, Any]) -> None:
        n = len(ex["text"].split())
        for f in ("span1_index", "span2_index"):
            if not 0 <= ex[f] < n:
                raise ValueError(f"{self.name}: {f}={ex[f]} outside the text's {n} words")


class WicTask(Task):
    """WiC: ``word`` line, then both sentences with the target occurrence marked ``*...*``; a sentence
    whose marks are unusable gets its offsets from the one whole-word occurrence of ``word`` in it,
    else ``unlocated_span``."""

    _LINES = ("word", "sentence1", "sentence2")
    _SPAN = re.compile(r"\*\s*(.*?)\s*\*")

    def _marked(self, ex: Mapping[str, Any], k: int) -> str:
        s, a, b = ex[f"sentence{k}"], ex[f"start{k}"], ex[f"end{k}"]
        return normalise_ws(f"{s[:a]}*{s[a:b]}*{s[b:]}")

    def _lines(self, ex: Mapping[str, Any]) -> dict[str, str]:
        return {"word": normalise_ws(ex["word"]), "sentence1": self._marked(ex, 1), "sentence2": self._marked(ex, 2)}

    def _from_lines(self, vals: dict[str, str]) -> dict[str, Any] | None:
        out: dict[str, Any] = {"word": vals["word"]}
        for k in (1, 2):
            marked = vals[f"sentence{k}"]
            if marked.count("*") == 2:
                marked = self._SPAN.sub(r"*\1*", marked)
                start = marked.index("*")
                end = marked.index("*", start + 1) - 1
            if marked.count("*") != 2 or end <= start:  # marks unusable: the word itself, if it occurs once
                marked = normalise_ws(marked.replace("*", ""))
                hits = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(vals['word'])}(?!\w)", marked, re.I)]
                if len(hits) != 1:
                    raise _Unparsable("unlocated_span")
                (start, end), marked = hits[0], marked[:hits[0][0]] + "*" + marked[hits[0][0]:]
            out.update({f"sentence{k}": marked.replace("*", ""), f"start{k}": start, f"end{k}": end})
        return out

    def render(self, ex: Mapping[str, Any]) -> tuple[str, str | None]:
        return f"{normalise_ws(ex['word'])}: {self._marked(ex, 1)}", self._marked(ex, 2)

    def _check(self, ex: Mapping[str, Any]) -> None:
        for k in (1, 2):
            s, a, b = ex[f"sentence{k}"], ex[f"start{k}"], ex[f"end{k}"]
            if not (0 <= a < b <= len(s)) or s[a:b] != s[a:b].strip():
                raise ValueError(f"{self.name}: offsets {a}:{b} do not mark a word in sentence{k}")


_NLI = ("entailment", "not_entailment")
_TF = ("False", "True")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cb", "super_glue", "cb", "cb", ("premise", "hypothesis"), (),
             ("entailment", "contradiction", "neutral"), ("accuracy", "macro_f1"),
             "natural language inference (CommitmentBank)"),
        CopaTask("copa", "super_glue", "copa", "copa", ("premise", "choice1", "choice2"), ("question",),
                 ("choice1", "choice2"), ("accuracy",),
                 "causal reasoning, choice of plausible alternatives (COPA)",
                 ("choice1 is more plausible", "choice2 is more plausible")),
        Task("boolq", "super_glue", "boolq", "boolq", ("question", "passage"), (), _TF, ("accuracy",),
             "yes/no question answering (BoolQ)", ("false, the answer is no", "true, the answer is yes")),
        WicTask("wic", "super_glue", "wic", "wic", ("sentence1", "sentence2"),
                ("word", "start1", "start2", "end1", "end2"), _TF, ("accuracy",),
                "word sense disambiguation in context (WiC)",
                ("false, different senses", "true, the same sense")),
        WscTask("wsc", "super_glue", "wsc", "wsc", ("text",),
                ("span1_index", "span2_index", "span1_text", "span2_text"), _TF, ("accuracy",),
                "pronoun coreference resolution (Winograd Schema Challenge)",
                ("false, the pronoun does not refer to the marked phrase",
                 "true, the pronoun refers to the marked phrase")),
        Task("rte", "glue", "rte", "rte", ("sentence1", "sentence2"), (), _NLI, ("accuracy",),
             "textual entailment recognition (RTE)", ("entailment", "not entailment")),
        Task("superglue_rte", "super_glue", "rte", "superglue_rte", ("premise", "hypothesis"), (), _NLI,
             ("accuracy",), "textual entailment recognition (RTE)", ("entailment", "not entailment")),
        Task("mrpc", "glue", "mrpc", "mrpc", ("sentence1", "sentence2"), (), ("not_equivalent", "equivalent"),
             ("f1", "accuracy"), "paraphrase identification (MRPC)", ("not equivalent", "equivalent")),
        Task("cola", "glue", "cola", "cola", ("sentence",), (), ("unacceptable", "acceptable"),
             ("mcc", "accuracy"), "grammatical acceptability (CoLA)"),
        Task("sst2", "glue", "sst2", "sst2", ("sentence",), (), ("negative", "positive"), ("accuracy",),
             "sentiment analysis (SST-2)"),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; UnknownNameError (a KeyError) listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        from retrikt.errors import UnknownNameError

        raise UnknownNameError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
