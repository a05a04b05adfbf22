"""The worker side of a chunk: run it, measure it, and never raise.

Every backend ships a :class:`TaskBatch` to a worker and gets back a list of
:class:`ChunkResult`. Exceptions travel as data (:class:`ErrorInfo`), so that
Spark, Work Queue, Parsl and Dask all hand the driver the same thing, and so
that the original exception type reaches the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from casa_executors import prefetch
from casa_executors.errors import PackedException, RemoteError, describe, pack, text, unpack
from casa_executors.heap import old_heap_frozen
from casa_executors.internals import allowed, env_allows
from casa_executors.merge import MergeFailed, node_key
from casa_executors.merge import fold as fold_outputs
from casa_executors.source import ChunkIO, Router, keep_files_open, metering, open_files
from casa_executors.store import Store, decode, encode
from casa_executors.xcache.tokens import redact

TRACEBACK_NOTE_LINES = 40  # of a worker's traceback, added as a note to the exception the driver rebuilds


@dataclass(frozen=True)
class ChunkTask:
    index: int
    item: Any  # a coffea WorkItem or FileMeta
    attempt: int
    level: int = 0  # the task computes node (level, index) of the merge tree (> 0: adaptive chunking)


@dataclass(frozen=True)
class Fold:
    """Tasks ``start`` to ``start + count - 1`` of a batch are all the leaves of node ``(1, index)`` of the
    merge tree: when all succeed, the worker merges their outputs into that node (in chunk order, as a
    merge task would) and returns it instead of each, so the node needs no merge task and no store
    writes of its leaves. A failed leaf leaves the others returned one by one."""

    index: int
    start: int
    count: int


@dataclass
class TaskBatch:
    function: bytes | Callable[[Any], Any]  # cloudpickled once by the driver
    tasks: list[ChunkTask]
    compression: int | None = None
    router: Router | None = None
    store: Store | None = None  # write each output there (key ``nodes/0/<index>``) and return only its size
    run: str = ""  # the driver's run: a worker keeps files open between the chunks of one run
    # called on the worker with the results before they are returned (Dask: pushes their metadata)
    notify: Callable[[list[ChunkResult]], None] | None = None
    folds: list[Fold] = field(default_factory=list)
    # optimisations resting on coffea/uproot internals (the executor's ``internals``, and-ed with the
    # environment here and again on the worker: casa_executors.internals)
    internals: bool = True
    then: Any = None  # the item the driver will most likely hand this worker next (read ahead: prefetch)

    def __post_init__(self) -> None:
        self.internals = bool(self.internals) and env_allows()


@dataclass
class ErrorInfo:
    """An exception as data: its text always, and each exception of its chain packed so that the
    driver rebuilds it as its own type, with its arguments, attributes and worker traceback
    (:func:`casa_executors.errors.pack`; no ``__init__`` is called, no class is made). An element
    the driver cannot rebuild comes back as a :class:`~casa_executors.errors.RemoteError` with its text.
    """

    type_name: str
    message: str
    traceback: str  # the whole chain, formatted on the worker (redacted): for logs and the report
    chain: list[PackedException] = field(default_factory=list)  # the raised exception first, its root cause last
    live: BaseException | None = field(default=None, repr=False, compare=False)  # in-process only

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "live"}  # never pickled: it holds frames

    def exception(self) -> BaseException:
        """The original exception: the object itself when it never left this process, else rebuilt
        with its chain of causes and its worker traceback."""
        if self.live is not None:
            return self.live
        if not self.chain:
            return RemoteError(self.type_name, self.message)
        top = unpack(self.chain)
        if top.__traceback__ is None and self.traceback:  # tblib could not carry it: its text, then
            lines = self.traceback.rstrip("\n").splitlines()
            cut = "\n".join(lines[-TRACEBACK_NOTE_LINES:])
            more = f" (last {TRACEBACK_NOTE_LINES} of {len(lines)} lines)" if len(lines) > TRACEBACK_NOTE_LINES else ""
            with contextlib.suppress(Exception):
                top.add_note(f"worker traceback{more}:\n{cut}")
        return top

    @classmethod
    def capture(cls, exc: BaseException, secrets: Sequence[str] = (), live: bool = False) -> ErrorInfo:
        """``live``: the ErrorInfo stays in this process, keep the exception object itself, unless it
        mentions a secret, or its chain holds what cannot leave this process (a lock, an open file,
        an uproot file or basket, an attribute that does not pickle): then the driver too gets it
        rebuilt from its copy, as from a worker, and the exception it raises pickles (tblib's reducers,
        which parsl and distributed install on import, pickle every ``__cause__`` and ``__context__``)."""
        try:
            full = "".join(traceback.format_exception(exc))
        except Exception:  # traceback copes with a broken __str__; this is for anything stranger
            full = describe(exc)
        chain = pack(exc, secrets)
        keep = live and not any(s and s in full for s in secrets) and all(p.whole for p in chain)
        return cls(type(exc).__name__, redact(text(exc), secrets), redact(full, secrets), chain,
                   exc if keep else None)


@dataclass
class ChunkResult:
    index: int
    attempt: int
    output: Any = None  # compressed bytes when the batch asked for compression; None when stored
    error: ErrorInfo | None = None
    output_bytes: int = 0  # size of the encoded output, wherever it went
    worker: str = ""
    host: str = ""
    started: float = 0.0  # wall clock (time.time(), comparable across hosts) when the chunk began
    ended: float = 0.0  # and when it ended
    wall_s: float = 0.0
    cpu_s: float = 0.0
    events: int = 0
    bytes_read: int = 0
    endpoints: list[str] = field(default_factory=list)
    failovers: list[str] = field(default_factory=list)
    # the worker process's peak resident memory (bytes) when the chunk ended, and how much the chunk raised it
    peak_rss: int = 0
    peak_rss_rise: int = 0
    node: int | None = None  # the output is node (1, node) of the tree: this task's chunks of it, merged (Fold)
    merged: bool = False  # the output went into the node another result of this batch carries
    merge_error: ErrorInfo | None = None  # the chunks ran, but their outputs could not be added together

    @property
    def ok(self) -> bool:
        return self.error is None




def worker_name() -> str:
    """A name for the worker running this task, as its engine knows it; inside a Slurm job
    ``slurm:<SLURM_JOB_ID>/<name>``, so that the site's accounting can be joined with the report."""
    name = _engine_worker_name()
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm:{job}/{name}" if job else name


def _engine_worker_name() -> str:
    name = os.environ.get("CASA_WORKER_NAME")
    if name:
        return name
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            return get_worker().address
        except Exception:
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


_loaded: tuple[bytes, Callable[[Any], Any]] | None = None


def _function(spec: bytes | Callable[[Any], Any]) -> Callable[[Any], Any]:
    global _loaded
    if callable(spec):
        return keep_files_open(spec)
    if _loaded is None or _loaded[0] != spec:
        _loaded = (spec, keep_files_open(cloudpickle.loads(spec)))
    return _loaded[1]


def _compress(output: Any, level: int | None) -> Any:
    return output if level is None else encode(output, level)


def decompress(payload: Any) -> Any:
    return decode(payload) if isinstance(payload, bytes) else payload


# ru_maxrss is in KiB on Linux, in bytes on macOS
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (``getrusage``'s ``ru_maxrss``).

    The high-water mark, not a sample: it sees a spike inside a chunk that a reading of the current
    RSS at its end (psutil) would miss, it is what a batch system's or Dask nanny's memory limit acts
    on, and it costs one system call. It only grows over a process's life, so a chunk's own peak
    shows as the rise it caused (``ChunkResult.peak_rss_rise``); threads of one process share it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def _events(item: Any) -> int:
    start, stop = getattr(item, "entrystart", None), getattr(item, "entrystop", None)
    return stop - start if start is not None and stop is not None else 0


def run_chunk(function: Callable[[Any], Any], task: ChunkTask, batch: TaskBatch, keep: bool = False) -> tuple[
        ChunkResult, Any]:
    """Run one task; its output is stored or encoded into the result, or with ``keep`` returned as it is."""
    ahead = prefetch.current()
    io = ChunkIO(batch.router) if ahead is None else ahead.io_for(task)  # bytes read ahead are metered there
    result = ChunkResult(task.index, task.attempt, worker=worker_name(), host=socket.gethostname())
    rss0 = peak_rss()
    result.started = time.time()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    output = None
    try:
        with metering(io), (contextlib.nullcontext() if ahead is None else ahead.chunk(task, io)):
            output = function(task.item)
        if not keep:
            _place(result, output, batch, task.level, task.index)
            output = None
        result.events = _events(task.item)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        result.error = ErrorInfo.capture(exc, io.secrets(), live=True)
    result.wall_s = time.perf_counter() - wall0
    result.cpu_s = time.process_time() - cpu0
    result.ended = result.started + result.wall_s
    result.peak_rss = peak_rss()
    result.peak_rss_rise = result.peak_rss - rss0
    result.bytes_read = io.bytes_read
    result.endpoints = io.endpoints
    result.failovers = [redact(f, io.secrets()) for f in io.failovers]
    return result, output


def _place(result: ChunkResult, output: Any, batch: TaskBatch, level: int, index: int) -> None:
    """Store the output as node (level, index), or encode it into the result."""
    if batch.store is not None:
        result.output_bytes = batch.store.put_output(node_key(level, index), output, batch.compression)
    else:
        result.output = _compress(output, batch.compression)
        result.output_bytes = len(result.output) if isinstance(result.output, bytes) else 0


def run_node(function: Callable[[Any], Any], fold: Fold, tasks: list[ChunkTask], batch: TaskBatch) -> list[
        ChunkResult]:
    """Run all the leaves of node (1, ``fold.index``) and, when all succeed, merge them into the node
    (carried by the first result). The outputs are held until the last leaf: at most a fan-in of them."""
    runs = [run_chunk(function, task, batch, keep=True) for task in tasks]
    results = [r for r, _ in runs]
    secrets = ChunkIO(batch.router).secrets()  # a store's error may name a token-bearing URL
    if all(r.ok for r in results):
        first = results[0]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            node = fold_outputs(o for _, o in runs)
        except Exception as exc:  # the first output is now half-added: nothing of it can be returned
            first.merge_error = ErrorInfo.capture(MergeFailed(f"cannot add chunk outputs: {exc!r}"))
            for r in results[1:]:
                r.merged = True
        else:
            runs.clear()
            try:
                _place(first, node, batch, 1, fold.index)
            except Exception as exc:  # e.g. the store is unwritable: the leaves failed, as run_chunk's would
                for r in results:
                    r.error = ErrorInfo.capture(exc, secrets)
            else:
                first.node = fold.index
                for r in results[1:]:
                    r.merged = True
        merge_s = time.perf_counter() - wall0
        first.wall_s += merge_s
        first.cpu_s += time.process_time() - cpu0
        results[-1].ended += merge_s  # the worker merged right after the last leaf (its time is the first's)
        return results
    for r, output in runs:
        if r.ok:
            try:
                _place(r, output, batch, 0, r.index)
            except Exception as exc:
                r.error = ErrorInfo.capture(exc, secrets)
    return results


def run_batch(batch: TaskBatch) -> list[ChunkResult]:
    """Entry point on every worker: run the chunks of one batch in order."""
    if batch.router is not None:
        from casa_executors.xcache.client_env import apply_client_env

        apply_client_env()
    open_files(batch.run)
    try:
        function = _function(batch.function)
    except Exception as exc:
        info = ErrorInfo.capture(exc)
        results = [ChunkResult(t.index, t.attempt, error=info, worker=worker_name()) for t in batch.tasks]
    else:
        folds = {f.start: f for f in batch.folds}
        results, position = [], 0
        # full GC passes skip the worker's imports and kept trees meanwhile
        with old_heap_frozen(), allowed(batch.internals) as on, prefetch.reading_ahead(
                batch.tasks, batch.router, on, batch.run, batch.then):
            while position < len(batch.tasks):
                fold = folds.get(position)
                if fold is None:
                    results.append(run_chunk(function, batch.tasks[position], batch)[0])
                    position += 1
                else:
                    results += run_node(function, fold, batch.tasks[position:position + fold.count], batch)
                    position += fold.count
    if batch.notify is not None:
        batch.notify(results)
    return results


def strip_outputs(results: list[ChunkResult]) -> list[ChunkResult]:
    """The results without their outputs (which stay where the engine keeps them)."""
    return [dataclasses.replace(r, output=None) for r in results]
