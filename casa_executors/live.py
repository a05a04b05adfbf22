"""Watching a run: the ``on_progress`` callback and the partial output it receives.

The driver hands every chunk output it learns of to :class:`LiveOutput`, which adds it into an
accumulator of its own (a deep copy of the first, then coffea's ``iadd``), in arrival order. The
run's own output still comes from the fixed merge tree (:mod:`casa_executors.merge`), which never
sees this copy: the final output stays bit-identical, and a chunk's output enters the partial view
at most once (a chunk that runs again because its output was lost is already in it).

What it costs (only with ``on_progress``): one deep copy, one extra ``iadd`` per chunk in the
driver's thread, and, when outputs do not come back to the driver (a store, an engine's memory),
reading each one back (:meth:`casa_executors.outputs.Placement.peek`). The report's
``summary()["progress"]`` says how much time it took.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coffea.processor.accumulator import iadd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """What an ``on_progress`` callback receives.

    ``output``: the processor's output merged over the ``chunks_in_output`` chunks that have arrived
    so far (before ``postprocess``; ``None`` until one has). It is the driver's own copy, kept and added
    to between calls: read it (plot it, copy it), and what the callback changes in it shows in later
    calls, never in the run's output. Its floating-point sums may differ from the final output's in the
    last bits (it adds in arrival order, the run in its fixed tree). ``chunks_done``: chunks computed or restored from a
    checkpoint; ``failed``: chunks given up; ``final``: the run has ended and this is the last call.
    """

    output: Any
    chunks_done: int
    chunks_total: int
    chunks_in_output: int
    failed: int
    events: int
    elapsed_s: float
    final: bool = False


ProgressCallback = Callable[[Progress], Any]


def check_progress_options(callback: Any, interval: Any) -> None:
    from casa_executors.errors import ExecutorOptionError

    if callback is not None and not callable(callback):
        raise ExecutorOptionError(f"on_progress must be a function taking a casa_executors.Progress, got {callback!r}")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not math.isfinite(interval) \
            or interval < 0:
        raise ExecutorOptionError(f"progress_interval must be a number of seconds >= 0, got {interval!r}")


class LiveOutput:
    """The partial output of one processing run, and the throttled calls to the user's callback."""

    def __init__(self, callback: ProgressCallback, interval: float, leaves: int, unwrap: bool) -> None:
        self.callback, self.interval, self.unwrap = callback, interval, unwrap
        self.value: Any = None
        self.covered = bytearray(leaves)  # leaves whose output is in ``value``
        self.in_output = 0
        self.calls = 0
        self.add_s = 0.0  # copying, reading back and adding outputs
        self.callback_s = 0.0
        self.error: str = ""
        self._new = False
        self._t0 = self._last = time.perf_counter()

    def add(self, leaves: range, read: Callable[[], Any]) -> None:
        """The output of ``leaves`` (one node of the tree) arrived; ``read()`` gives it (a placement's peek)."""
        if self.callback is None:
            return
        covered = self.covered
        if any(covered[i] for i in leaves):
            # ran again after its output was lost: in already (all of it, unless adaptive chunking re-cut it)
            return
        t0 = time.perf_counter()
        try:
            output = read()
            if output is not None:
                # the run's merge adds into its children in place: the view owns a copy of the first
                self.value = copy.deepcopy(output) if self.value is None else iadd(self.value, output)
        except Exception as exc:  # e.g. a store read that failed: the view goes without it, the run is not touched
            log.warning("on_progress: could not add the output of chunks %d-%d to the partial output: %r",
                        leaves.start, leaves.stop - 1, exc)
            return
        finally:
            self.add_s += time.perf_counter() - t0
        for i in leaves:
            covered[i] = 1
        self.in_output += len(leaves)
        self._new = True

    def due(self) -> bool:
        return self._new and self.callback is not None and time.perf_counter() - self._last >= self.interval

    def call(self, done: int, total: int, failed: int, events: int, final: bool = False) -> None:
        """Hand the callback the partial output. An exception it raises is logged with its traceback and
        warned about, and the callback is not called again in this run; the run goes on."""
        if self.callback is None:
            return
        value = self.value
        if self.unwrap and isinstance(value, dict) and "out" in value:
            value = value["out"]  # Runner's wrapper: {"out": the processor's output, "processed": ...}
        progress = Progress(value, done, total, self.in_output, failed, events,
                            time.perf_counter() - self._t0, final)
        t0 = time.perf_counter()
        try:
            self.callback(progress)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("on_progress raised %s; it is not called again in this run", self.error, exc_info=True)
            warnings.warn(f"on_progress raised {self.error}; it is not called again in this run (the run goes on)",
                          RuntimeWarning, stacklevel=2)
            self.callback = None
        finally:
            self.callback_s += time.perf_counter() - t0
            self.calls += 1
            self._new = False
            self._last = time.perf_counter()

    def info(self) -> dict[str, Any]:
        return {"calls": self.calls, "add_s": round(self.add_s, 6), "callback_s": round(self.callback_s, 6),
                "chunks_in_output": self.in_output, "error": self.error}
