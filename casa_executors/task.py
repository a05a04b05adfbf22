"""The worker side of a chunk: run it, measure it, and never raise.

Every backend ships a :class:`TaskBatch` to a worker and gets back a list of
:class:`ChunkResult`. Exceptions travel as data (:class:`ErrorInfo`), so that
Spark, Work Queue, Parsl and Dask all hand the driver the same thing, and so
that the original exception type reaches the user.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from casa_executors.errors import RemoteError
from casa_executors.merge import node_key
from casa_executors.source import ChunkIO, Router, metering
from casa_executors.store import Store, decode, encode
from casa_executors.xcache.tokens import redact


@dataclass(frozen=True)
class ChunkTask:
    index: int
    item: Any  # a coffea WorkItem or FileMeta
    attempt: int


@dataclass
class TaskBatch:
    function: bytes | Callable[[Any], Any]  # cloudpickled once by the driver
    tasks: list[ChunkTask]
    compression: int | None = None
    router: Router | None = None
    store: Store | None = None  # write each output there (key ``nodes/0/<index>``) and return only its size


@dataclass
class ErrorInfo:
    type_name: str
    message: str
    traceback: str
    pickled: bytes | None = None

    def exception(self) -> BaseException:
        """The original exception, with its chain of causes, when it survived pickling."""
        if self.pickled is not None:
            try:
                chain = pickle.loads(self.pickled)
                for outer, inner in itertools.pairwise(chain):
                    outer.__cause__ = inner
                return chain[0]
            except Exception:
                pass
        return RemoteError(self.type_name, self.message, self.traceback)

    @classmethod
    def capture(cls, exc: BaseException, secrets: Sequence[str] = ()) -> ErrorInfo:
        full = "".join(traceback.format_exception(exc))
        pickled = None
        if not any(s and s in full for s in secrets):  # else the objects themselves carry a secret
            pickled = pickle.dumps([_portable(e) for e in _chain(exc)])
        return cls(type(exc).__name__, redact(str(exc), secrets), redact(full, secrets), pickled)


@dataclass
class ChunkResult:
    index: int
    attempt: int
    output: Any = None  # compressed bytes when the batch asked for compression; None when stored
    error: ErrorInfo | None = None
    output_bytes: int = 0  # size of the encoded output, wherever it went
    worker: str = ""
    host: str = ""
    started: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    events: int = 0
    bytes_read: int = 0
    endpoints: list[str] = field(default_factory=list)
    failovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 16:
        out.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return out


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it pickles round-trip, else a RemoteError with its text."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc):
            return exc
    except Exception:
        pass
    return RemoteError(type(exc).__name__, str(exc))


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
        return spec
    if _loaded is None or _loaded[0] != spec:
        _loaded = (spec, cloudpickle.loads(spec))
    return _loaded[1]


def _compress(output: Any, level: int | None) -> Any:
    return output if level is None else encode(output, level)


def decompress(payload: Any) -> Any:
    return decode(payload) if isinstance(payload, bytes) else payload


def _events(item: Any) -> int:
    start, stop = getattr(item, "entrystart", None), getattr(item, "entrystop", None)
    return stop - start if start is not None and stop is not None else 0


def run_chunk(function: Callable[[Any], Any], task: ChunkTask, batch: TaskBatch) -> ChunkResult:
    io = ChunkIO(batch.router)
    result = ChunkResult(task.index, task.attempt, worker=worker_name(), host=socket.gethostname())
    result.started = time.time()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        with metering(io):
            output = function(task.item)
        if batch.store is not None:
            result.output_bytes = batch.store.put_output(node_key(0, task.index), output, batch.compression)
        else:
            result.output = _compress(output, batch.compression)
            result.output_bytes = len(result.output) if isinstance(result.output, bytes) else 0
        result.events = _events(task.item)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        result.error = ErrorInfo.capture(exc, io.secrets())
    result.wall_s = time.perf_counter() - wall0
    result.cpu_s = time.process_time() - cpu0
    result.bytes_read = io.bytes_read
    result.endpoints = io.endpoints
    result.failovers = [redact(f, io.secrets()) for f in io.failovers]
    return result


def run_batch(batch: TaskBatch) -> list[ChunkResult]:
    """Entry point on every worker: run the chunks of one batch in order."""
    if batch.router is not None:
        from casa_executors.xcache.client_env import apply_client_env

        apply_client_env()
    try:
        function = _function(batch.function)
    except Exception as exc:
        info = ErrorInfo.capture(exc)
        return [ChunkResult(t.index, t.attempt, error=info, worker=worker_name()) for t in batch.tasks]
    return [run_chunk(function, task, batch) for task in batch.tasks]


def strip_outputs(results: list[ChunkResult]) -> list[ChunkResult]:
    """The results without their outputs (which stay where the engine keeps them)."""
    return [dataclasses.replace(r, output=None) for r in results]
