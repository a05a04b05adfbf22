"""The one loop every backend shares.

``Driver`` is a coffea executor (``ExecutorBase``): ``Runner`` calls it once to
preprocess files and once to process chunks. It submits tasks to its backend,
collects them as they complete, retries, merges in a fixed tree, draws the
progress bar and fills the report. Backends only run tasks.

What to do is decided by the run's rules, :class:`casa_executors.state.RunState`:
which chunks a task carries, how many are in flight, retries, the merge tree and
its tail, checkpoints, adaptive chunking, ``skipbadfiles``, lost outputs. ``_Run``
is the shell around them: it turns finished futures into events and the
instructions the rules return into submissions, merges, the progress bar and the
report.

Where outputs live and where the tree's merges run is the placement's business
(:mod:`casa_executors.outputs`): in this process, in a store the workers share
(merge tasks on the engine; the checkpoint when there is one), or in the
engine's memory. The rules only see the outputs' handles and sizes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import queue
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle
from coffea.processor import accumulate
from coffea.processor.executor import ExecutorBase

from casa_executors.adaptive import ADAPTIVE_FANIN, Grains, adaptable
from casa_executors.backends.base import DEFAULT_IDLE_TIMEOUT, Backend
from casa_executors.backends.iterative import IterativeBackend
from casa_executors.checkpoint import Checkpoint
from casa_executors.errors import ExecutorOptionError, WorkerLost, annotate, describe
from casa_executors.heap import old_heap_frozen
from casa_executors.internals import exception_chain as _exception_chain
from casa_executors.internals import runner_raises_returned, unwrap_runner_retries
from casa_executors.live import LiveOutput, ProgressCallback, check_progress_options
from casa_executors.merge import Group, MergeFailed, Node, node_key
from casa_executors.options import make_router
from casa_executors.outputs import EnginePlacement, Lost, StorePlacement, check_merge_option, choose
from casa_executors.progress import ProgressBar
from casa_executors.report import DONE, Phase, Report
from casa_executors.source import open_files
from casa_executors.state import (
    Cancel,
    CheckpointRestored,
    ChunksDone,
    Failed,
    Finish,
    GiveUp,
    LostTooOften,
    MergedHere,
    MergeDone,
    MergeHere,
    MergeTaskFailed,
    Ok,
    OutputsLost,
    Requeue,
    Rules,
    RunState,
    SubmitChunks,
    SubmitMerge,
    TaskFailed,
    Tick,
    WorkersChanged,
)
from casa_executors.task import ChunkResult, ChunkTask, ErrorInfo, Fold, TaskBatch

if TYPE_CHECKING:
    from casa_executors.xcache.router import CacheRouter

NOT_RUN = "NotRun"
log = logging.getLogger(__name__)
# coffea's Runner raises an exception an executor returns (setting its partial_output) when
# skipbadfiles does not cover it; then the driver returns the run-stopping failure instead of raising it
_RUNNER_RAISES_RETURNED = runner_raises_returned()


@dataclass
class Driver(ExecutorBase):
    """A coffea executor (``processor.Runner(executor=...)``) that runs its tasks on ``backend``.

    Build it with a factory, ``casa_executors.futures(...)``, ``dask(...)`` and the others: their ``help()``
    documents every option (the fields below that are options are :class:`casa_executors.options.DriverOptions`).
    """

    backend: Backend = field(default_factory=IterativeBackend)
    retries: int = 3
    recoverable: bool = False
    merge_fanin: int | None = None  # 8; 2 with target_task_s (more task sizes fit inside a file)
    chunks_per_task: int | None = None
    cache: str | list[str] | None = None
    cache_mode: str = "plain"
    cache_spares: int = 0  # further caches (next on the hash ring) tried before the origin
    token: Any = field(default=None, repr=False)
    router: Any = field(default=None, repr=False)  # built from cache/cache_mode/token
    report: Report = field(default_factory=Report, repr=False)
    checkpoint: str | None = None  # a folder or fsspec URL the workers can write: runs resume from it
    checkpoint_restart: bool = False  # a checkpoint of another run there is deleted, not refused
    store: str | None = None  # where workers put outputs to merge them (a folder or URL they all reach)
    merge: str = "auto"  # "workers": merge on the engine (or fail), "driver": in this process
    target_task_s: float | None = None  # adaptive chunking: tasks of about this many seconds (adaptive.py)
    # duplicate stragglers (state.Rules.speculate): the first copy back wins, the others are cancelled and their
    # results dropped; not for backends in this process, nor with a store or checkpoint (copies write one key)
    speculate: bool = False
    # False: no optimisation that rests on coffea/uproot internals (kept TTrees, NanoEvents forms, kept baskets),
    # on the driver and the workers; so does CASA_EXECUTORS_INTERNALS=0 in either's environment (internals.py)
    internals: bool = True
    # a function called with a casa_executors.Progress (the merged partial output and counts) while the
    # processing runs, from the driver's thread, at most every progress_interval seconds and once at the end;
    # off (None) by default: the partial output costs a copy and an extra add per chunk (casa_executors.live)
    on_progress: ProgressCallback | None = field(default=None, repr=False)
    progress_interval: float = 1.0
    # seconds an engine started for coffea's preprocessing call stays up for the processing call of the same
    # Runner call (then stopped when processing ends); if none comes, it stops after this idle time. 0: stop
    # after each call. An engine the user passed in (client=, cluster=, session=, config=) is never stopped
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    # the run id of a preprocessing call not yet followed by processing; Runner's copies of this executor
    # share the list, so the processing of the same Runner call reads the files preprocessing opened
    _file_runs: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, Backend):
            raise ExecutorOptionError(f"backend must be a casa_executors Backend, got {self.backend!r}")
        if self.merge_fanin is None:
            self.merge_fanin = ADAPTIVE_FANIN if self.target_task_s is not None else 8
        for name, low in (("retries", 0), ("merge_fanin", 2), ("cache_spares", 0)):
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
        for name in ("checkpoint", "store"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if value is not None and (not isinstance(value, str) or not value):
                raise ExecutorOptionError(f"{name} must be a folder or an fsspec URL (root://..., file://...), "
                                          f"got {value!r}")
        if self.store is not None and self.checkpoint is not None:
            raise ExecutorOptionError("give store= or checkpoint=, not both: a checkpoint is where the outputs go")
        if not isinstance(self.internals, bool):
            raise ExecutorOptionError(f"internals must be True or False, got {self.internals!r}")
        idle = self.idle_timeout
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not math.isfinite(idle) or idle < 0:
            raise ExecutorOptionError(f"idle_timeout must be a number of seconds >= 0, got {idle!r}")
        if not isinstance(self.speculate, bool):
            raise ExecutorOptionError(f"speculate must be True or False, got {self.speculate!r}")
        if not isinstance(self.checkpoint_restart, bool):
            raise ExecutorOptionError(f"checkpoint_restart must be True or False, got {self.checkpoint_restart!r}")
        check_merge_option(self.merge)
        check_progress_options(self.on_progress, self.progress_interval)
        target = self.target_task_s
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not math.isfinite(target) or target <= 0):
            raise ExecutorOptionError(f"target_task_s must be a positive number of seconds (or None), got {target!r}")

    def _make_router(self) -> CacheRouter | None:
        return make_router(self.cache, self.cache_mode, self.token, self.cache_spares)

    @property
    def fanin(self) -> int:
        """``merge_fanin`` as ``__post_init__`` settled it."""
        assert self.merge_fanin is not None
        return self.merge_fanin

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
        run_id = self._file_run(name)
        if not items:
            if name == "processing":
                self.backend.end_idle()  # nothing to process: an engine preprocessing left up goes now
            self.report.begin(name, self.backend.name, self.backend.workers, items)
            return accumulator, 0
        grains = None
        if name == "processing" and self.target_task_s is not None and adaptable(items):
            grains = Grains.split(items, self.fanin)  # the leaves of the tree: tasks are its nodes
        t0 = time.perf_counter()
        # the engine preprocessing starts stays up for the processing of the same Runner call (Runner calls
        # this executor twice), which stops it; processing always stops what it owns
        keep_for = self.idle_timeout if name == "preprocessing" else 0.0
        with old_heap_frozen(), self.backend.session(keep_for):  # full GC passes skip the user's heap meanwhile
            # begun once the engine is up: an external cluster's size is known only when connected
            phase = self.report.begin(name, self.backend.name, self.backend.workers,
                                      grains.leaves if grains else items, grains)
            run = _Run(self, phase, work, skipbadfiles, grains, run_id, from_runner=work is not function)
            log.info("%s: %d items on %s", name, len(phase.items), self.backend.describe())
            try:
                merged = run.drive()
            finally:
                phase.wall_s = time.perf_counter() - t0
                phase.ended = time.time()
                log.info("%s: %s in %.2f s", name, run.counts_text(), phase.wall_s)
        if run.live is not None:  # the last call, once the run's clock has stopped: its drawing is not the run's
            run.progress(final=True)
            phase.progress = run.live.info()
        if name == "preprocessing":
            self._file_runs.append(run_id)
            if run.abort is not None:  # Runner raises it: no processing call follows to take the engine over
                self.backend.end_idle()
        if grains is not None and isinstance(merged, dict) and isinstance(merged.get("processed"), set):
            # coffea's list of processed items names the user's items, not the ranges tasks read
            merged["processed"] = grains.processed([r.status in DONE for r in phase.rows])
        out = merged if accumulator is None else accumulate([merged], accumulator)
        return self._outcome(run, out, from_runner=work is not function, result_type=result_type)

    def _file_run(self, name: str) -> str:
        """The run id workers keep files open for (a worker closes a run's files when another run's task
        comes). Runner preprocesses its files, then processes them at once: the same id, so a worker
        thread's chunks of a file it read the metadata of use the source it opened then. Any other call
        gets a new one: between calls files may be replaced, so workers open them again (their TTrees are
        kept across calls, by UUID: ``source.OpenFiles``)."""
        carried = self._file_runs.pop() if self._file_runs else None
        return carried if carried and name == "processing" else uuid.uuid4().hex

    def _outcome(self, run: _Run, out: Any, from_runner: bool, result_type: bool) -> tuple[Any, Any]:
        """What Runner gets back (or what is raised), with coffea's semantics.

        A failure that stops the run raises the worker's own exception (see ``_Run.error``). In
        processing, Runner itself raises it with ``partial_output`` set to the processor's
        (post-processed) output, as it does for coffea's recoverable executors. With
        ``use_result_type`` the first failure ``skipbadfiles`` matched becomes Runner's ``Err``.
        """
        processing = run.phase.name == "processing"
        runner_raises = from_runner and processing and out is not None and _RUNNER_RAISES_RETURNED
        if run.abort is not None:
            err = run.error(out, from_runner)
            if runner_raises:
                return out, err
            raise err
        if run.skipped and result_type and from_runner:
            err = run.error(out, from_runner, *run.skipped[0])
            if runner_raises:
                return out, err  # Runner: Err(err, value=output)
            raise err  # preprocessing (Runner ignores what it returns) or no output: Runner.run makes it Err(err)
        if run.skipped:
            rows = run.phase.ranges()
            warnings.warn(
                f"{sum(r.status == 'failed' for r in rows)} of {len(rows)} {run.phase.name} items failed and were "
                "left out "
                f"(first: {run.describe(run.skipped[0][0], run.skipped[0][1])}); "
                "see executor.report.failures()",
                stacklevel=3,
            )
        if from_runner and processing and isinstance(out, dict) and isinstance(out.get("metrics"), dict):
            out["metrics"]["casa_executors"] = self.report.summary()  # savemetrics: coffea's metrics plus ours
        return out, 0


class _ChunkJob:
    __slots__ = ("data", "future", "task")

    def __init__(self, task: int, future: Future, data: Any) -> None:
        self.task, self.future, self.data = task, future, data


class _MergeJob:
    __slots__ = ("future", "group", "task")

    def __init__(self, task: int, future: Future, group: Group) -> None:
        self.task, self.future, self.group = task, future, group


class _Run:
    """One executor call: the shell around its rules (:class:`casa_executors.state.RunState`).

    It turns finished futures into events, and the instructions the rules return into
    submissions, merges (through the placement), the progress bar and the report."""

    def __init__(self, driver: Driver, phase: Phase, work: Any, skipbadfiles: Any,
                 grains: Grains | None, run_id: str, from_runner: bool = False) -> None:
        self.driver, self.phase, self.skipbadfiles = driver, phase, skipbadfiles
        # on_progress: the partial output of the processing (preprocessing's is file metadata)
        self.live = (LiveOutput(driver.on_progress, driver.progress_interval, len(phase.items), unwrap=from_runner)
                     if driver.on_progress is not None and phase.name == "processing" else None)
        self.backend = driver.backend
        n = len(phase.items)
        self.spec = work if self.backend.in_process else cloudpickle.dumps(work)
        self.run_id = run_id  # workers keep files open between this run's chunks only (Driver._file_run)
        self.checkpoint: Checkpoint | None = None
        if driver.checkpoint is not None and phase.name == "processing":
            self.checkpoint = Checkpoint(driver.checkpoint, restart=driver.checkpoint_restart)
            self.checkpoint.open(phase.items, work, driver.fanin)
        self.grains = grains
        self._workers_asked = -math.inf
        self.jobs: dict[int, _ChunkJob | _MergeJob] = {}  # by task id
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.abort: tuple[int, BaseException] | None = None
        self.skipped: list[tuple[int, BaseException]] = []
        self.result: Any = None
        self.finished = False
        self.corrupt: list[str] = []
        # a store placement may make a temporary folder: drive() removes it (or this, on a failure here)
        self.placement = choose(self.backend, phase.name, driver.compression, driver.merge, driver.store,
                                self.checkpoint)
        if self.placement.name == "driver" and self.backend.in_process:
            self.placement.compression = None  # nothing leaves this process
        try:
            self.state = RunState(n, self._rules(n), self._skippable_error, grains)
            self.bar = ProgressBar(
                bool(driver.status), driver.desc, driver.unit, n, self.backend.describe()
            )
        except BaseException:
            self.placement.close(False)
            raise

    def _rules(self, n: int) -> Rules:
        return run_rules(self.driver, self.placement, n, self.phase.name, adaptive=self.grains is not None)

    @property
    def attempts(self) -> list[int]:
        return self.state.attempts

    def drive(self) -> Any:
        try:
            events: list[Any] = [Tick(time.monotonic()), *self._workers()]
            if self.checkpoint is not None:
                events.append(CheckpointRestored(tuple(self._begin(self.checkpoint))))
            self._carry_out(self.state.handle_all(events))
            while not self.finished:
                if not self.jobs:
                    raise RuntimeError("casa_executors: the merge tree is incomplete with nothing left to run")
                try:
                    keys = [self.done.get(timeout=0.25)]
                except queue.Empty:
                    self.bar.refresh()
                    self._carry_out(self.state.handle(Tick(time.monotonic())))
                    self.progress()
                    continue
                with contextlib.suppress(queue.Empty):  # and whatever else has finished meanwhile
                    while True:
                        keys.append(self.done.get_nowait())
                events = [Tick(time.monotonic()), *self._workers(), *self._events(keys)]
                self._carry_out(self.state.handle_all(events))
                self.progress()
        finally:
            self.bar.close()
            for job in self.jobs.values():
                with contextlib.suppress(Exception):  # e.g. parsl's AppFuture.cancel raises
                    job.future.cancel()
            self.jobs.clear()
            # the caller's own thread keeps no file open after a run, but for the processing that follows
            if self.backend.in_process and self.phase.name == "processing":
                open_files().close()
            self._close()
        return self.result

    def counts(self) -> tuple[int, int]:
        """Items done (computed or restored) and failed so far."""
        rows = self.phase.rows
        done = sum(1 for r in rows if r.status in DONE)
        return done, sum(1 for r in rows if r.status == "failed")

    def counts_text(self) -> str:
        done, failed = self.counts()
        return f"{done}/{len(self.phase.rows)} done" + (f", {failed} failed" if failed else "")

    def progress(self, final: bool = False) -> None:
        """Call on_progress if it is due (or the run has ended)."""
        live = self.live
        if live is None or not (final or live.due()):
            return
        done, failed = self.counts()
        live.call(done, len(self.phase.rows), failed, self.bar.events, final)

    def _workers(self) -> list[WorkersChanged]:
        # adaptive chunking sizes tasks by the workers (asked each time: a cluster grows and shrinks);
        # speculation presumes when tasks start from them (asked at most once a second: it may be a call)
        if self.grains is None:
            if not self.state.rules.speculate or time.monotonic() < self._workers_asked + 1.0:
                return []
            self._workers_asked = time.monotonic()
        return [WorkersChanged(self.backend.workers)]

    # -- the start and the end ---------------------------------------------------------
    def _begin(self, checkpoint: Checkpoint) -> list[tuple[int, int]]:
        """With a checkpoint: the nodes it holds (the rules run only the other chunks)."""
        restored, _, leftovers = checkpoint.resolve(self.state.tree)
        checkpoint.store.remove(leftovers)  # below restored nodes, temporary, partial: a kill's debris
        for level, index in restored:
            span = self.state.tree.span(level, index)
            self.bar.events += Report.restore(self.phase, span)
            self.bar.refresh(advance=len(span))
            if self.live is not None:
                key = node_key(level, index)
                self.live.add(span, functools.partial(self.placement.peek, key))
        return restored

    def _close(self) -> None:
        try:
            self.placement.close(self.finished)
        finally:
            self.phase.merge = self.placement.info()
            if self.checkpoint is not None:
                self.phase.checkpoint = {
                    "url": self.checkpoint.url, "run_key": self.checkpoint.identity.get("run_key", ""),
                    "restored": sum(1 for r in self.phase.ranges() if r.status == "restored"),
                    "corrupt": list(self.corrupt), "restarted": self.checkpoint.restarted,
                }

    # -- futures into events -------------------------------------------------------------
    def _events(self, keys: list[int]) -> list[Any]:
        """The events of finished tasks (chunk tasks first, their results in one collect)."""
        jobs = [job for job in map(self.jobs.pop, keys, itertools.repeat(None)) if job is not None]
        chunks = [job for job in jobs if isinstance(job, _ChunkJob)]
        events: list[Any] = []
        won: set[int] = set()  # copies (speculation) of a task whose result is in this batch already
        for job, value in zip(chunks, self.placement.collect([job.future for job in chunks])):
            copies = self.state.copies(job.task)
            if won.intersection(copies):
                continue  # the rules cancel it when they see the other copy's result
            event = self._chunks_event(job, value)
            if event is not None:
                events.append(event)
                if copies and type(event) is ChunksDone:
                    won.add(job.task)
        return events + [self._merge_event(job) for job in jobs if isinstance(job, _MergeJob)]

    def _chunks_event(self, job: _ChunkJob, value: Any) -> Any:
        nodes = self.state.task_nodes(job.task)
        if nodes is None:
            return None  # cancelled meanwhile: its duplicate won
        results = self._results(value, [i for _, i in nodes])
        if results is not value and self.state.duplicated(job.task):
            return TaskFailed(job.task, _exception_of(results[0]))  # the other copy goes on
        tree, outcomes = self.state.tree, list[Ok | Failed]()
        for position, (r, (level, index)) in enumerate(zip(results, nodes)):
            span = tree.span(level, index)  # the leaves this task covered: chunk ``index`` when level is 0
            Report.attempt(self.phase, r, span)
            if r.merge_error is not None:  # a task's own merge (Fold): as a merge task's failure, not retried
                raise r.merge_error.exception()
            if r.error is not None:
                outcomes.append(Failed(r.error.exception()))
                log.info("%s item %d: attempt %d failed on %s (%s)", self.phase.name, index, r.attempt,
                         r.worker or self.backend.describe(), r.error.type_name)
                continue
            self.bar.advance(r.events, len(span))
            handle = None
            if not r.merged:  # else its output is in the node another result of the batch carries
                if r.node is not None:
                    level, index = 1, r.node
                    self.placement.folded += 1
                handle = self.placement.leaf(r, job.data, position, level, index)
                if self.live is not None:
                    self.live.add(tree.span(level, index), functools.partial(self.placement.peek, handle))
            outcomes.append(Ok(handle, r.output_bytes, r.events, r.wall_s, r.worker, r.node, r.merged))
        return ChunksDone(job.task, tuple(outcomes))

    def _merge_event(self, job: _MergeJob) -> Any:
        group = job.group
        try:
            handle = self.placement.merged(group, job.future)
        except Lost as exc:
            return MergeTaskFailed(job.task, str(exc), tuple(exc.nodes), self._resolve(exc))
        except MergeFailed:
            raise
        except BaseException as exc:  # the engine lost the merge task
            why = f"a merge task failed on the engine: {type(exc).__name__}: {exc}"
            lost = Lost(self.placement.lost_children(group), why)
            return MergeTaskFailed(job.task, why, tuple(lost.nodes), self._resolve(lost))
        return MergeDone(job.task, handle)

    def _resolve(self, exc: Lost) -> tuple[tuple[int, int], ...]:
        """Outputs are gone or corrupt: remove the corrupt ones; what the checkpoint still holds below them."""
        if exc.corrupt and isinstance(self.placement, StorePlacement):  # only a store's outputs can be corrupt
            self.corrupt += exc.corrupt
            self.placement.store.remove(exc.corrupt)
        if self.checkpoint is None:
            return ()
        return tuple(node for lost in exc.nodes
                     for node in self.checkpoint.resolve(self.state.tree, lost.level, lost.index)[0])

    # -- instructions into actions -------------------------------------------------------
    def _carry_out(self, instructions: list[Any]) -> None:
        self.bar.retries = self.state.retried
        todo = deque(instructions)
        while todo and not self.finished:
            first = todo.popleft()
            kind = type(first)
            if kind in (SubmitChunks, SubmitMerge):  # with those that follow, in one call to the engine
                same = [first]
                while todo and type(todo[0]) is kind:
                    same.append(todo.popleft())
                (self._submit_chunks if kind is SubmitChunks else self._submit_merges)(same)
            elif kind is MergeHere:
                todo += self.state.handle(self._merge_here(first))
            elif kind is Finish:
                todo += self._finish(first.root)
            elif kind is GiveUp:
                self._give_up(first)
            elif kind is Requeue:
                self._requeue(first.index)
            elif kind is Cancel:
                job = self.jobs.pop(first.task, None)
                if job is not None:
                    with contextlib.suppress(Exception):
                        job.future.cancel()

    def _submit_chunks(self, submits: list[SubmitChunks]) -> None:
        for priority in sorted({s.priority for s in submits}, reverse=True):  # one call per priority, in order
            same = [s for s in submits if s.priority == priority]
            batches = [TaskBatch(self.spec, [self._task(level, index) for level, index in s.nodes],
                                 self.placement.compression, self.driver.router, run=self.run_id,
                                 folds=[Fold(*f) for f in s.folds], internals=self.driver.internals,
                                 then=self._then(s.nodes))
                       for s in same]
            try:
                submitted = self.placement.submit_chunks(batches, priority)
            except Exception as exc:  # the engine refused the tasks themselves
                submitted = [(_failed(exc), None) for _ in batches]
            for s, (future, data) in zip(same, submitted):
                self._track(_ChunkJob(s.task, future, data))

    def _submit_merges(self, submits: list[SubmitMerge]) -> None:
        calls: dict[tuple[Any, int], list[tuple[SubmitMerge, Any]]] = {}
        for s in submits:
            fn, arg = self.placement.merge_call(s.group)
            calls.setdefault((fn, s.priority), []).append((s, arg))
        for (fn, priority), pairs in calls.items():
            try:
                futures = self.backend.submit_together(fn, [arg for _, arg in pairs], priority)
            except Exception as exc:  # the engine refused the tasks themselves
                futures = [_failed(exc) for _ in pairs]
            for (s, _), future in zip(pairs, futures):
                self._track(_MergeJob(s.task, future, s.group))

    def _then(self, nodes: tuple[tuple[int, int], ...]) -> Any:
        """The chunk the worker will most likely run after a task of ``nodes``, which it reads ahead
        (``casa_executors.prefetch``): known only on a backend that runs one task at a time, in order."""
        if (self.grains is not None or self.phase.name != "processing" or not self.backend.in_process
                or self.backend.max_inflight() != 1 or not nodes):
            return None
        level, index = nodes[-1]
        return self.phase.items[index + 1] if level == 0 and index + 1 < len(self.phase.items) else None

    def _task(self, level: int, index: int) -> ChunkTask:
        """The task computing node (level, index): a chunk, or (adaptive chunking) the one range of a
        file its leaves make."""
        item = self.phase.range_item(self.state.tree.span(level, index))
        return ChunkTask(index, item, self.state.attempt(level, index), level)

    def _track(self, job: _ChunkJob | _MergeJob) -> None:
        self.jobs[job.task] = job
        key = job.task
        job.future.add_done_callback(lambda _: self.done.put(key))

    def _merge_here(self, order: MergeHere) -> Any:
        """Merge a group in this process: the event saying how it went."""
        try:
            handle = self.placement.merge_here(order.group, root=order.root)
        except Lost as exc:
            return OutputsLost(tuple(exc.nodes), str(exc), order.group, self._resolve(exc))
        return MergedHere(order.group, handle)

    def _finish(self, root: Node) -> list[Any]:
        try:
            self.result = self.placement.fetch(root)
        except Lost as exc:
            return self.state.handle(OutputsLost(tuple(exc.nodes), str(exc), None, self._resolve(exc)))
        self.finished = True
        if self.checkpoint is not None and root.complete:
            self.checkpoint.write_manifest(complete=True)
        return []

    def _give_up(self, order: GiveUp) -> None:
        i = order.index
        if order.reason == "not_run":
            assert self.abort is not None  # the item that stopped the run
            Report.give_up(self.phase, i, "failed", NOT_RUN, f"not run: the run stopped after "
                           f"{self.describe(*self.abort)}")
            return
        exc = self._exception(order.error)
        if order.reason == "lost":
            Report.give_up(self.phase, i, "failed", "WorkerLost",
                           f"its output was lost {order.error.times} times: {order.error.why}")
        else:
            Report.give_up(self.phase, i, "failed")
        self.bar.failures += 1
        self.bar.advance()
        if order.skipped:
            self.skipped.append((i, exc))
        elif self.abort is None:
            self.abort = (i, exc)

    def _requeue(self, i: int) -> None:
        """Chunk ``i`` was done, but its output was lost."""
        row = self.phase.rows[i]
        self.bar.refresh(advance=-1)
        self.bar.events -= row.events
        log.info("%s item %d: its output was lost; running it again", self.phase.name, i)
        Report.requeue(self.phase, i)

    @staticmethod
    def _exception(error: Any) -> BaseException:
        return WorkerLost(str(error)) if isinstance(error, LostTooOften) else error

    def _skippable_error(self, error: Any) -> bool:
        return self._skippable(self._exception(error))

    def _results(self, value: Any, indices: list[int]) -> list[ChunkResult]:
        """A batch's results; ``value`` is what its task returned, or the exception it failed with."""
        try:
            if isinstance(value, BaseException):
                raise value
            if isinstance(value, list) and sorted(r.index for r in value) == sorted(indices):
                return value
            raise RuntimeError(f"the worker returned {type(value).__name__}, not the results of the batch")
        except BaseException as exc:
            info = ErrorInfo.capture(exc)  # engine-level: a lost worker, a cancelled task
            return [ChunkResult(i, self.attempts[i] + 1, error=info) for i in indices]

    def _skippable(self, exc: BaseException) -> bool:
        skip = self.skipbadfiles
        allowed = (OSError,) if skip is True else (skip or ())
        matches = bool(allowed) and any(isinstance(c, allowed) for c in _exception_chain(exc))
        if self.phase.name == "preprocessing":
            return bool(skip) and (self.driver.recoverable or matches)
        return self.driver.recoverable or matches

    def describe(self, index: int, exc: BaseException) -> str:
        item = self.phase.range_item(self.phase.range_of(index)[0])
        root = _exception_chain(exc)[-1]
        return f"{self.phase.name} of {_place(item)} (after {self.attempts[index]} attempt(s)): {describe(root)}"

    def error(self, out: Any, from_runner: bool, index: int | None = None,
              exc: BaseException | None = None) -> BaseException:
        """The failure of item ``index`` (default: the one that stopped the run): the exception its last
        attempt raised, itself, with the chunk's attributes (``errors.CHUNK_ATTRIBUTES``) and a note
        naming the chunk, its attempts and where to look (``errors.annotate``)."""
        if index is None or exc is None:
            assert self.abort is not None  # no item given: the one that stopped the run
            index, exc = self.abort
        leaves, row = self.phase.range_of(index)  # adaptive chunking: the range that ran as one task
        item = self.phase.range_item(leaves)
        rows = self.phase.ranges()
        failed = [r for r in rows if r.status not in DONE]
        dataset = f" (dataset {item.dataset})" if getattr(item, "dataset", None) else ""
        worker = f"; last attempt on {row.worker}" + (f" ({row.host})" if row.host else "") if row.worker else ""
        if self.phase.name == "processing":
            partial = out.get("out") if from_runner and isinstance(out, dict) else out
        else:
            partial = None if from_runner else out  # Runner's file metadata is not the user's output
        root = _exception_chain(exc)[-1]
        notes = [
            f"casa_executors: {self.phase.name} of {_place(item)}{dataset} failed after "
            f"{self.attempts[index]} attempt(s) on {self.backend.describe()}{worker}: {describe(root)}",
            f"{len(failed)} of {len(rows)} {self.phase.name} items did not complete: "
            "executor.report.failures() lists them; .partial_output holds the output of the others "
            "(recoverable=True or Runner(skipbadfiles=...) keep going past such failures)",
        ]
        return annotate(exc, notes, partial_output=partial, item=item, attempts=self.attempts[index],
                        worker=row.worker, host=row.host, phase=self.phase.name, report=self.driver.report)


def run_rules(driver: Driver, placement: Any, n: int, phase: str = "processing", adaptive: bool = False) -> Rules:
    """The rules of a run of ``n`` items with ``driver``'s options on its backend and ``placement`` (also what
    ``casa_benchmarks.facility_sim`` simulates). ``adaptive``: tasks are planned (adaptive chunking)."""
    backend = driver.backend
    # planned tasks are already the size they should be: one a task unless chunks_per_task says otherwise;
    # else the backend's batch shrinks with the work left (guided self-scheduling; asked once: an external
    # cluster's size is a call)
    batch = driver.chunks_per_task or (1 if adaptive else backend.batch_size(n, phase))
    engine = isinstance(placement, EnginePlacement)
    return Rules(
        retries=driver.retries, fanin=driver.fanin, batch=batch,
        guided=not driver.chunks_per_task and not adaptive,
        guided_split=None if driver.chunks_per_task or adaptive else backend.guided_split(n),
        window=placement.window(max(backend.max_inflight(), 1)),
        retry_at_once=backend.in_process,
        merges_here=placement.merges_here,
        tail_here=placement.tail_allowed if engine else placement.tail_here,
        # an engine keeps outputs as objects with compression=None: their sizes are unknown
        tail_bytes=None if engine and placement.compression is None else placement.tail_bytes,
        tail_only_small=engine,
        merge_fallback_here=placement.name == "store",  # the store still has a failed merge's children
        target_task_s=driver.target_task_s,
        # copies of a task would write the same key in a store; in this process they would run one after the other
        speculate=driver.speculate and not backend.in_process and placement.name in ("engine", "driver"),
    )


def _place(item: Any) -> str:
    """Where a work item reads: its file, and its entry range if it has one."""
    where = getattr(item, "filename", str(item))
    start, stop = getattr(item, "entrystart", None), getattr(item, "entrystop", None)
    return f"{where} entries {start}-{stop}" if start is not None else where


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


def _exception_of(result: ChunkResult) -> BaseException:
    """The exception of a failed result."""
    assert result.error is not None
    return result.error.exception()
