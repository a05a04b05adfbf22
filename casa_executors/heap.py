"""Full garbage collections leave alone the heap a process had before a run.

CPython's cyclic collector scans every tracked object on a full (oldest-generation) pass. A process
that has imported coffea holds 110-180k of them before its first chunk (the module state of coffea,
awkward, numba, uproot; distributed's on a dask worker), so a full pass takes 50-100 ms on this
machine's cores, and a light query triggers one every 20-40 chunks: on ADL Q1 at chunks of 100k, about
a tenth of a worker's time, and most of the spread between two workers' shares of one run. While a
run (in the submitting process) or a task (on a worker) lasts, the objects alive when it began are
set aside (``gc.freeze``) and given back after (``gc.unfreeze``), so full passes scan only what the
run made. Garbage among the set-aside objects is collected by the first full pass after the run.

The young generation is collected less often meanwhile: CPython collects it every 700 net allocations
of container objects, 3-4 times in each chunk of ADL Q1 at 100k events (coffea and awkward make
thousands per chunk, for NanoEvents' form and layout). While a run lasts its threshold is at least
:data:`YOUNG`; given back after. Measured in docs/performance.md (CPU and peak memory).

One freeze per process, counted: runs and tasks on several threads of a process share it, and the
last to end gives the heap back. A process whose owner froze objects itself (``gc.get_freeze_count()``
above 0 when we would start) or turned the collector off is left as it is: unfreezing would undo
theirs. No library does this; CPython's own advice for the same cost in forking servers is
``gc.freeze``.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # runs and tasks of this process under way
_frozen = False  # whether the first of them froze the heap (then the last one unfreezes it)
_thresholds: tuple[int, ...] | None = None  # the collector's thresholds before the first of them raised them

YOUNG = 10_000  # the young generation's threshold while runs last (CPython's default is 700)


@contextlib.contextmanager
def old_heap_frozen() -> Iterator[None]:
    """Objects alive now are out of the cyclic collector's sight, and its young generation is collected
    less often, until the last overlapping run ends."""
    global _depth, _frozen, _thresholds
    with _lock:
        if _depth == 0:
            _frozen = gc.isenabled() and gc.get_freeze_count() == 0
            if _frozen:
                gc.freeze()
            before = gc.get_threshold()
            # a threshold of 0 means the collector is off; one already above ours is its owner's choice
            if gc.isenabled() and 0 < before[0] < YOUNG:
                _thresholds = before
                gc.set_threshold(YOUNG, *before[1:])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _frozen:
                gc.unfreeze()
                _frozen = False
            if _depth == 0 and _thresholds is not None:
                if gc.get_threshold()[0] == YOUNG:  # else someone set their own since: theirs stays
                    gc.set_threshold(*_thresholds)
                _thresholds = None
