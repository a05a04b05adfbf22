"""The one loop every backend shares.

``Driver`` is a coffea executor (``ExecutorBase``): ``Runner`` calls it once to
preprocess files and once to process chunks. It submits tasks to its backend,
collects them as they complete, retries, merges in a fixed tree, draws the
progress bar and fills the report. Backends only run tasks.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import time
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import cloudpickle
from coffea.processor import accumulate
from coffea.processor.executor import ExecutorBase
from coffea.util import _exception_chain

from casa_executors.backends.base import Backend
from casa_executors.backends.iterative import IterativeBackend
from casa_executors.errors import ChunkError, ExecutorOptionError
from casa_executors.merge import TreeMerger
from casa_executors.progress import ProgressBar
from casa_executors.report import Phase, Report
from casa_executors.task import ChunkResult, ChunkTask, ErrorInfo, TaskBatch, decompress, run_batch

NOT_RUN = "NotRun"


def unwrap_runner_retries(function: Any) -> tuple[Any, Any, bool]:
    """Take coffea Runner's in-worker retry loop off ``function``.

    Runner wraps the work in ``automatic_retries(retries, skipbadfiles, f)``;
    the driver retries across workers instead, so a chunk is attempted exactly
    ``retries + 1`` times. Returns ``(f, skipbadfiles, use_result_type)``.
    """
    if isinstance(function, partial) and getattr(function.func, "__qualname__", "") == "Runner.automatic_retries":
        _, skipbadfiles, inner = function.args[:3]
        return inner, skipbadfiles, bool(function.keywords.get("use_result_type", False))
    return function, False, False


@dataclass
class Driver(ExecutorBase):
    backend: Backend = field(default_factory=IterativeBackend)
    retries: int = 3
    recoverable: bool = False
    merge_fanin: int = 8
    chunks_per_task: int | None = None
    cache: str | list[str] | None = None
    cache_mode: str = "plain"
    token: Any = field(default=None, repr=False)
    router: Any = field(default=None, repr=False)  # built from cache/cache_mode/token
    report: Report = field(default_factory=Report, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, Backend):
            raise ExecutorOptionError(f"backend must be a casa_executors Backend, got {self.backend!r}")
        for name, low in (("retries", 0), ("merge_fanin", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ExecutorOptionError(f"{name} must be a whole number >= {low}, got {value!r}")
        if self.chunks_per_task is not None and (
            not isinstance(self.chunks_per_task, int) or self.chunks_per_task < 1
        ):
            raise ExecutorOptionError(f"chunks_per_task must be a whole number >= 1, got {self.chunks_per_task!r}")
        if self.compression is not None and not (isinstance(self.compression, int) and 0 <= self.compression <= 16):
            raise ExecutorOptionError(f"compression must be None or a level 0-16, got {self.compression!r}")
        if self.router is None:
            self.router = self._make_router()

    def _make_router(self):
        if self.cache is None:
            if self.token not in (None, False):
                raise ExecutorOptionError("token= is only used with cache=; give cache= too")
            return None
        from casa_executors.xcache.router import CacheRouter
        from casa_executors.xcache.tokens import discover_token

        token = discover_token(self.token) if self.token is not False else None
        try:
            return CacheRouter(self.cache, mode=self.cache_mode, token=token)
        except ValueError as exc:
            raise ExecutorOptionError(str(exc)) from None

    # `with executor:` keeps the engine up across several Runner calls
    def __enter__(self) -> Driver:
        self.backend.hold()
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.release()

    def close(self) -> None:
        self.backend.stop()

    def __call__(self, items: Any, function: Any, accumulator: Any):
        items = list(items)
        work, skipbadfiles, result_type = unwrap_runner_retries(function)
        name = "preprocessing" if self.desc == "Preprocessing" else "processing"
        if not items:
            self.report.begin(name, self.backend.name, self.backend.workers, items)
            return accumulator, 0
        t0 = time.perf_counter()
        with self.backend.session():
            # begun once the engine is up: an external cluster's size is known only when connected
            phase = self.report.begin(name, self.backend.name, self.backend.workers, items)
            run = _Run(self, phase, work, skipbadfiles)
            try:
                merged = run.drive()
            finally:
                phase.wall_s = time.perf_counter() - t0
        out = merged if accumulator is None else accumulate([merged], accumulator)
        if run.abort is not None:
            raise run.error(out)
        if run.skipped:
            warnings.warn(
                f"{len(run.skipped)} of {len(items)} {phase.name} items failed and were left out "
                f"(first: {run.describe(run.skipped[0][0], run.skipped[0][1])}); "
                "see executor.report.failures()",
                stacklevel=2,
            )
        return out, (run.skipped[0][1] if result_type and run.skipped else 0)


class _Run:
    """The state of one executor call."""

    def __init__(self, driver: Driver, phase: Phase, work: Any, skipbadfiles: Any) -> None:
        self.driver, self.phase, self.skipbadfiles = driver, phase, skipbadfiles
        self.backend = driver.backend
        n = len(phase.items)
        self.spec = work if self.backend.in_process else cloudpickle.dumps(work)
        self.compression = None if self.backend.in_process else driver.compression
        self.merger = TreeMerger(n, driver.merge_fanin)
        self.attempts = [0] * n
        self.todo: deque[int] = deque(range(n))
        self.inflight: dict[int, tuple[Future, list[int]]] = {}
        self.keys = itertools.count()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.abort: tuple[int, BaseException] | None = None
        self.skipped: list[tuple[int, BaseException]] = []
        self.batch = driver.chunks_per_task or self.backend.batch_size(n)
        self.limit = max(self.backend.max_inflight(), 1)
        self.bar = ProgressBar(
            bool(driver.status), driver.desc, driver.unit, n, self.backend.describe()
        )

    def drive(self) -> Any:
        try:
            while self.todo or self.inflight:
                self._submit_more()
                try:
                    key = self.done.get(timeout=0.25)
                except queue.Empty:
                    self.bar.refresh()
                    continue
                future, indices = self.inflight.pop(key)
                for result in self._results(future, indices):
                    self._handle(result)
        finally:
            self.bar.close()
            for future, _ in self.inflight.values():
                with contextlib.suppress(Exception):  # e.g. parsl's AppFuture.cancel raises
                    future.cancel()
        return self.merger.result if self.merger.done else self.merger.partial()

    def _submit_more(self) -> None:
        if self.abort is not None:
            while self.todo:
                i = self.todo.popleft()
                Report.give_up(self.phase, i, "failed", NOT_RUN,
                               f"not run: the run stopped after {self.describe(*self.abort)}")
                self.merger.add(i, None)
            return
        while self.todo and len(self.inflight) < self.limit:
            take = [self.todo.popleft() for _ in range(min(self.batch, len(self.todo)))]
            tasks = [ChunkTask(i, self.phase.items[i], self.attempts[i] + 1) for i in take]
            batch = TaskBatch(self.spec, tasks, self.compression, self.driver.router)
            key = next(self.keys)
            try:
                future = self.backend.submit(run_batch, batch)
            except Exception as exc:  # the engine refused the task itself
                future = Future()
                future.set_exception(exc)
            self.inflight[key] = (future, take)
            future.add_done_callback(lambda f, key=key: self.done.put(key))

    def _results(self, future: Future, indices: list[int]) -> list[ChunkResult]:
        try:
            results = future.result()
            if isinstance(results, list) and sorted(r.index for r in results) == sorted(indices):
                return results
            raise RuntimeError(f"the worker returned {type(results).__name__}, not the results of the batch")
        except BaseException as exc:
            info = ErrorInfo.capture(exc)  # engine-level: a lost worker, a cancelled task
            return [ChunkResult(i, self.attempts[i] + 1, error=info) for i in indices]

    def _handle(self, r: ChunkResult) -> None:
        i = r.index
        self.attempts[i] += 1
        Report.attempt(self.phase, r)
        if r.ok:
            self.merger.add(i, decompress(r.output))
            self.bar.advance(r.events)
            return
        exc = r.error.exception()
        if self.attempts[i] <= self.driver.retries and self.abort is None:
            self.todo.append(i)
            self.bar.retries += 1
            return
        Report.give_up(self.phase, i, "failed")
        self.merger.add(i, None)
        self.bar.failures += 1
        self.bar.advance()
        if self._skippable(exc):
            self.skipped.append((i, exc))
        elif self.abort is None:
            self.abort = (i, exc)

    def _skippable(self, exc: BaseException) -> bool:
        skip = self.skipbadfiles
        allowed = (OSError,) if skip is True else (skip or ())
        matches = bool(allowed) and any(isinstance(c, allowed) for c in _exception_chain(exc))
        if self.phase.name == "preprocessing":
            return bool(skip) and (self.driver.recoverable or matches)
        return self.driver.recoverable or matches

    def describe(self, index: int, exc: BaseException) -> str:
        item = self.phase.items[index]
        where = getattr(item, "filename", str(item))
        start, stop = getattr(item, "entrystart", None), getattr(item, "entrystop", None)
        span = f" entries {start}-{stop}" if start is not None else ""
        root = _exception_chain(exc)[-1]
        return (f"{self.phase.name} of {where}{span} (after {self.attempts[index]} attempt(s)): "
                f"{type(root).__name__}: {root}")

    def error(self, partial_output: Any) -> ChunkError:
        index, exc = self.abort
        failed = sum(1 for r in self.phase.rows if r.status != "ok")
        err = ChunkError(
            f"{self.describe(index, exc)}. {failed} of {len(self.phase.rows)} items did not complete; "
            "executor.report.failures() lists them (use recoverable=True or Runner(skipbadfiles=...) "
            "to keep the output of the good ones)",
            partial_output=partial_output,
        )
        err.__cause__ = exc
        return err
