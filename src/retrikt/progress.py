"""Progress on long work, and a quiet log: the project's one API for both (tqdm underneath).

Use :func:`bar` around every loop that can take more than a few seconds (training batches,
sampling, rollouts, PPO updates, embedding, index building)::

    from retrikt.progress import bar

    for idx in (b := bar(batches, total=n_batches, desc="teacher epoch 1/6", unit="batch")):
        loss = step(idx)
        b.set_postfix(loss=loss)            # shown on the bar, and in the log line at the end

    with bar(total=num_samples, desc="generate: sampling", unit="sample") as b:
        while ...:
            b.update(len(chunk))              # counts need not be 1 per call
            b.set_postfix(parse_rate=0.41)

``bar(iterable=None, *, total=None, desc, unit="it", announce=None)`` returns a :class:`Bar`: iterate
it (it yields the iterable's items and counts one per item) or call ``update(n)``; ``set_postfix(**kv)``
sets the numbers shown (floats with 4 significant digits); ``close()`` (or leaving the ``with``, or the
end of the iteration) ends it. Bars nest: an epoch bar inside a run bar shows as a second line that
disappears when it closes. What the user sees depends on where stderr goes:

* **a terminal** (``sys.stderr.isatty()``): a live tqdm bar; log records printed meanwhile are routed
  through tqdm so they do not tear the bar.
* **anything else** (DVC's log, CI, a pipe): never a line per item. One INFO line (logger
  ``retrikt.progress``, on stderr through the CLI's logging set-up) when the bar closes, with the count,
  the time and the postfix: ``teacher epoch 1/6: 16/16 batch in 19.8 s (1.24 s/batch); loss 0.981``.
  The outermost open bar also logs a start line (``teacher: start, 6 epoch``) so a long phase shows what
  it is doing before it ends; pass ``announce=True``/``False`` to decide for any bar. A bar whose units
  are long (an RL update takes ~30 s) can pass ``log_every=N``: a line every N units, not only at the end.

``RETRIKT_PROGRESS`` overrides the choice: ``bar`` (always bars), ``log`` (always lines), ``off``
(nothing), ``auto`` (the default, as above).

Library noise. :func:`configure` (called once by the CLI before any heavy import) turns off, when
bars are not shown, the progress bars that transformers, huggingface_hub and datasets draw themselves
("Loading weights", "Converting and de-quantizing GGUF tensors", "Writing model shards"): on a pipe they
would print one line per refresh. It also keeps FAISS's loader from logging its CPU-feature probing.
:func:`quiet_load_report` hides transformers' LOAD REPORT table for a load whose missing weights are
expected (a fresh classification head); the caller states what it expected in one line instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger("retrikt.progress")
ENV = "RETRIKT_PROGRESS"
_MODES = ("auto", "bar", "log", "off")
_open: list["Bar"] = []  # bars open now, outermost first
_redirect: contextlib.ExitStack | None = None  # logging routed through tqdm while a terminal bar is open


def mode() -> str:
    """``bar``, ``log`` or ``off``: what :func:`bar` does now (``RETRIKT_PROGRESS``, else stderr's kind)."""
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in _MODES:
        raise ValueError(f"{ENV}={want!r}: expected one of {', '.join(_MODES)}")
    if want != "auto":
        return want
    stream = sys.stderr
    return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "log"


QUIET_LOGGERS = ("faiss.loader",)  # INFO chatter on import ("Loading faiss with AVX512 support ...")


def configure() -> None:
    """Silence third-party progress bars when ours are not bars, and the INFO chatter of
    :data:`QUIET_LOGGERS`. Call before transformers/tqdm are imported (tqdm reads ``TQDM_DISABLE`` at
    import); later calls also switch off the ones already loaded where a library offers a switch."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if mode() == "bar":
        return
    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt_count(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:.4g}"


class Bar:
    """One progress bar (see the module docstring). Create it with :func:`bar`."""

    def __init__(self, iterable: Iterable | None, total: float | None, desc: str, unit: str,
                 announce: bool | None, log_every: int | None = None) -> None:
        if log_every is not None and log_every < 1:
            raise ValueError(f"bar {desc!r}: log_every must be >= 1, got {log_every}")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n: float = 0
        self.log_every, self._logged_at = log_every, 0.0
        self.postfix: dict[str, Any] = {}
        self.mode = mode()
        self._t0 = time.perf_counter()
        self._closed = False
        self._tqdm = None
        outermost = not _open
        _open.append(self)
        if self.mode == "bar":
            self._start_tqdm(outermost)
        elif self.mode == "log" and (outermost if announce is None else announce):
            what = f", {_fmt_count(total)} {unit}" if total is not None else ""
            log.info("%s: start%s", desc, what)

    def _start_tqdm(self, outermost: bool) -> None:
        global _redirect
        from tqdm.auto import tqdm

        if outermost:
            from tqdm.contrib.logging import logging_redirect_tqdm

            _redirect = contextlib.ExitStack()
            root = logging.getLogger()
            _redirect.enter_context(logging_redirect_tqdm(loggers=[root]))
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            size = os.terminal_size((0, 0))
        # a terminal that reports a 0 x 0 size (some pseudo-terminals) would get no bar at all from tqdm
        sized = size.columns > 0 and size.lines > 0
        self._tqdm = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=outermost, file=sys.stderr,
                          dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                          mininterval=0.25, disable=False)

    # -- the API ---------------------------------------------------------------------------------- #
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError(f"bar {self.desc!r}: nothing to iterate (created with total= only)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.mode == "log" and self.log_every and self.n - self._logged_at >= self.log_every \
                and (self.total is None or self.n < self.total):  # the end gets the closing line
            self._logged_at = self.n
            log.info("%s", self.summary())

    def set_postfix(self, **values: Any) -> None:
        """Numbers to show beside the bar (and in the closing log line); later calls update them."""
        self.postfix.update(values)
        if self._tqdm is not None:
            self._tqdm.set_postfix({k: _fmt_value(v) for k, v in self.postfix.items()}, refresh=False)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._tqdm is not None:
            self._tqdm.set_description(desc, refresh=False)

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self._t0

    def summary(self) -> str:
        """The closing line: ``desc: n/total unit in t (rate); key value, ...``."""
        seconds = self.elapsed
        count = _fmt_count(self.n) + (f"/{_fmt_count(self.total)}" if self.total is not None else "")
        text = f"{self.desc}: {count} {self.unit} in {_fmt_seconds(seconds)}"
        if self.n > 0 and seconds > 0:
            per = seconds / self.n
            text += f" ({per:.3g} s/{self.unit})" if per >= 1 else f" ({self.n / seconds:.3g} {self.unit}/s)"
        if self.postfix:
            text += "; " + ", ".join(f"{k} {_fmt_value(v)}" for k, v in self.postfix.items())
        return text

    def close(self) -> None:
        global _redirect
        if self._closed:
            return
        self._closed = True
        if self in _open:
            _open.remove(self)
        if self._tqdm is not None:
            self._tqdm.close()
            if not _open and _redirect is not None:
                _redirect.close()
                _redirect = None
        elif self.mode == "log":
            log.info("%s", self.summary())

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str, unit: str = "it",
        announce: bool | None = None, log_every: int | None = None) -> Bar:
    """A progress bar over ``iterable`` (or ``total`` units counted with ``update``); see the module
    docstring. ``total`` defaults to ``len(iterable)`` when it has one. ``log_every``: in log mode, a
    line every that many units as well as the closing one."""
    return Bar(iterable, total, desc, unit, announce, log_every)


class _DropLoadReport(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.dropped += 1
            return False
        return True


@contextlib.contextmanager
def quiet_load_report() -> Iterator[_DropLoadReport]:
    """Hide transformers' LOAD REPORT table (a warning listing MISSING/UNEXPECTED weights) for the
    loads inside the block. Only for loads whose gaps are expected; say what was expected instead."""
    logger = logging.getLogger("transformers.modeling_utils")
    flt = _DropLoadReport()
    logger.addFilter(flt)
    try:
        yield flt
    finally:
        logger.removeFilter(flt)
