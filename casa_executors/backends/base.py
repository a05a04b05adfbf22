"""What a backend is: a compute engine behind a ``concurrent.futures``-like surface.

A backend starts (or attaches to) its engine, runs ``fn(arg)`` somewhere and
hands back a future; the driver does everything else. Subclasses implement
``submit`` and, when they own resources, ``_start``/``_stop``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

from casa_executors.errors import ExecutorOptionError

REPO = str(Path(__file__).resolve().parents[2])
log = logging.getLogger(__name__)


MAX_DEFAULT_WORKERS = 4
# seconds an engine started for coffea's preprocessing call stays up waiting for the processing call of the
# same Runner call (Driver.idle_timeout); Runner makes the second call as soon as it has built the chunks
DEFAULT_IDLE_TIMEOUT = 60.0


def default_workers() -> int:
    """Workers of a local engine when ``workers=`` is not given: one per core, at most 4
    (the machine stays usable, and more rarely pays off for one analysis on one node)."""
    return min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)


def worker_pythonpath() -> str:
    """PYTHONPATH for worker processes: this checkout first, then the caller's own."""
    return os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


class Backend(ABC):
    name: ClassVar[str]
    in_process: ClassVar[bool] = False  # runs in the driver's process: no pickling
    # results stay on the workers until fetched, and futures can be task arguments (Dask): outputs
    # then stay in worker memory and merge there (outputs.EnginePlacement)
    holds_results: ClassVar[bool] = False
    # batch_size: tasks per worker of what is left to submit, and chunks a task carries at most (progress,
    # retries and a lost worker's work stay fine-grained). 2 beat 4 on ADL Q1 by 0.10-0.24 in efficiency on
    # futures, parsl and Work Queue (fewer round trips in the shrinking tail), even on Q6/Q8 and on dask
    # (docs/performance.md)
    tasks_per_worker: ClassVar[int] = 2
    max_chunks_per_task: ClassVar[int | None] = 32
    # does the engine start a task submitted with ``priority=1`` before every task queued with 0, first in,
    # first out among equals? The driver's rules presume so (retries of lost chunks, merges and speculative
    # copies are sent with 1: ``state.SubmitChunks.priority``); ``submit`` then takes ``priority=`` and the
    # engine is given it (Dask ``priority=``, Work Queue ``specify_priority``). Elsewhere it is dropped.
    honours_priority: ClassVar[bool] = False

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ExecutorOptionError(f"{self.name}: workers must be a whole number >= 1, got {workers!r}")
        self._workers = workers
        self._running = False
        self._held = 0  # `with executor:` blocks that keep the engine up
        self._active = 0  # sessions (executor calls) running now
        self._life_lock = threading.RLock()  # start, stop and the idle timer's stop, one at a time
        self._idle: threading.Timer | None = None  # armed while an engine waits for the next call
        self.starts = 0  # engine starts so far (the log says each, with its time)
        self.stopped = threading.Event()  # set while the engine is not running: a waiter sees the idle stop
        self.stopped.set()

    # -- what a backend implements --------------------------------------------
    @abstractmethod
    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        """Run ``fn(arg)`` on a worker; the future's result is its return value."""

    def submit_many(self, fn: Callable[[Any], Any], args: list[Any], priority: int = 0) -> list[Future]:
        """``submit`` for each of ``args`` (an engine may send them in one message: Dask's ``map``).
        A task the engine refuses is a failed future. ``priority``: see ``honours_priority``."""
        futures = []
        given = {"priority": priority} if self.honours_priority else {}
        for arg in args:
            try:
                futures.append(self.submit(fn, arg, **given))
            except Exception as exc:
                failed: Future = Future()
                failed.set_exception(exc)
                futures.append(failed)
        return futures

    def submit_together(self, fn: Callable[[Any], Any], args: list[Any], priority: int = 0) -> list[Future]:
        """Short tasks ready at the same time (the merges the driver just found ready): an engine whose
        every task is a costly job of its own (Spark) runs them as one; here each is its own task."""
        return Backend.submit_many(self, fn, args, priority)

    def submit_held(self, fn: Callable[[Any], Any], strip: Callable[[Any], Any],
                    args: list[Any], priority: int = 0) -> list[tuple[Future, Any]]:
        """For engines that hold results (``holds_results``): per arg, (a future of ``strip`` of its result —
        what the driver waits on —, the future holding the full result, left on the engine). Here a second
        task per arg; an engine may bring the stripped result another way (Dask: an event)."""
        held = self.submit_many(fn, args, priority)
        return list(zip(self.submit_many(strip, held, priority), held))

    def _start(self) -> None:
        """Start or attach to the engine."""

    def _stop(self) -> None:
        """Stop whatever ``_start`` started (by PID where there are processes)."""

    @classmethod
    def unavailable(cls) -> str | None:
        """None if the engine can run here, else why not."""
        return None

    @property
    def workers(self) -> int:
        return self._workers or 1

    def batch_size(self, n_chunks: int, phase: str = "processing") -> int:
        """How many items the next task carries, given the ``n_chunks`` of the phase still to submit
        (chunks; files when ``phase`` is "preprocessing").

        About ``tasks_per_worker`` tasks per worker of what is left (guided self-scheduling): a task's
        fixed costs (the engine's round trip, opening the file and reading its tree, writing and merging
        the output) are paid once per several short chunks, and tasks shrink to single chunks towards the
        end, so no core waits on a long last task. Preprocessing (a file's metadata: milliseconds) is one
        task per worker. Workers are counted as the driver keeps tasks in flight (``max_inflight``), so an
        adaptive cluster still starting counts at its maximum."""
        workers = max(self.max_inflight() // 2, 1)
        tasks = workers * (1 if phase == "preprocessing" else self.tasks_per_worker)
        per_task = max(math.ceil(n_chunks / tasks), 1)
        while per_task > 1 and math.ceil(n_chunks / per_task) < min(n_chunks, workers):
            per_task -= 1  # rounding up left a worker without a task (4 chunks, 3 workers, a task each)
        return min(per_task, self.max_chunks_per_task) if self.max_chunks_per_task else per_task

    def guided_split(self, n_chunks: int) -> int | None:
        """Guided self-scheduling task by task, for runs whose tasks start at their cap: a task then takes
        at most 1/(``tasks_per_worker`` x workers) of the chunks left (that number is returned), so tasks
        keep ``max_chunks_per_task`` chunks until the work left is that many tasks a worker, then shrink to
        single chunks; no core waits on a long last task. Worked out once a round instead, one round
        queued the whole run at the engine as waves of equal tasks and ran the last wave part-full
        (``python -m casa_benchmarks.facility_sim``).
        None for shorter runs: they keep ``batch_size`` for a whole round, as more, smaller tasks would
        cost more in engine round trips than they win back in balance."""
        workers = max(self.max_inflight() // 2, 1)
        cap = self.max_chunks_per_task
        tasks = workers * self.tasks_per_worker
        return tasks if cap is not None and n_chunks > cap * tasks else None

    def max_inflight(self) -> int:
        """How many tasks the driver keeps submitted at once."""
        return 2 * self.workers

    def describe(self) -> str:
        """The engine as it is, for messages: ``futures(2 workers)``."""
        return f"{self.name}({plural(self.workers, 'worker')})"

    @property
    def workers_local(self) -> bool:
        """Do all workers run on this machine (so a temporary folder here is a store they share)?"""
        return self.in_process

    # -- lifetime --------------------------------------------------------------
    def start(self) -> None:
        with self._life_lock:
            if not self._running:
                t0 = time.perf_counter()
                self._start()
                self._running = True
                self.starts += 1
                self.stopped.clear()
                log.info("%s started in %.1f s", self.describe(), time.perf_counter() - t0)

    def stop(self) -> None:
        with self._life_lock:
            self._disarm()
            if self._running:
                self._running = False
                t0 = time.perf_counter()
                try:
                    self._stop()
                finally:
                    self.stopped.set()
                log.info("%s stopped in %.1f s", self.name, time.perf_counter() - t0)

    def hold(self) -> None:
        with self._life_lock:
            self._disarm()  # an engine left up by a call is the holder's now
            self.start()
            self._held += 1

    def release(self) -> None:
        with self._life_lock:
            self._held = max(self._held - 1, 0)
            if self._held == 0 and self._active == 0:
                self.stop()

    @property
    def idle(self) -> bool:
        """Is the engine up only because a call left it for the next one (the idle timer runs)?"""
        return self._idle is not None

    @contextlib.contextmanager
    def session(self, keep_for: float = 0.0) -> Iterator[Backend]:
        """The engine for one executor call: started if needed, stopped after unless held.

        ``keep_for`` > 0 (coffea's preprocessing call): an engine this call started stays up for the call
        that follows (the processing of the same Runner call), and stops by itself if none comes within
        ``keep_for`` seconds (or when the interpreter exits). A call finding such an engine takes it over.
        A call that fails stops it at once."""
        with self._life_lock:
            owned = self._disarm() or not self._running  # ours to stop: left by a call, or started now
            self.start()
            self._active += 1
        ok = False
        try:
            yield self
            ok = True
        finally:
            with self._life_lock:
                self._active -= 1
                if owned and self._held == 0 and self._active == 0:
                    if ok and keep_for > 0:
                        self._arm(keep_for)
                    else:
                        self.stop()

    def end_idle(self) -> None:
        """Stop an engine a call left up for this one (a processing call with nothing to process)."""
        with self._life_lock:
            if self._disarm() and self._held == 0 and self._active == 0:
                self.stop()

    def _arm(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._idle_over)
        timer.daemon = True  # the interpreter's exit does not wait for it: _stop_idle_engines stops the engine
        timer.name = f"casa-executors-idle-{self.name}"
        self._idle = timer
        _IDLE.add(self)
        _register_exit_hook()
        log.info("%s: kept up for the next call, at most %g s", self.describe(), seconds)
        timer.start()

    def _disarm(self) -> bool:
        """Cancel the idle timer; was it armed?"""
        timer, self._idle = self._idle, None
        _IDLE.discard(self)
        if timer is None:
            return False
        timer.cancel()
        return True

    def _idle_over(self) -> None:
        with self._life_lock:
            if self._idle is not threading.current_thread():
                return  # taken over by a call (or stopped) meanwhile
            log.info("%s: no call came within the idle time; stopping it", self.describe())
            self.stop()


_IDLE: weakref.WeakSet[Backend] = weakref.WeakSet()  # engines waiting for a next call
_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Registered on first use, after the engines' libraries registered theirs: atexit runs it before them."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(_stop_idle_engines)


def _stop_idle_engines() -> None:
    for backend in list(_IDLE):
        with contextlib.suppress(Exception):
            backend.stop()


def plural(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def resolved(fn: Callable[[Any], Any], arg: Any) -> Future:
    """Run now, in this thread, and return the finished future."""
    future: Future = Future()
    try:
        future.set_result(fn(arg))
    except BaseException as exc:
        future.set_exception(exc)
    return future
