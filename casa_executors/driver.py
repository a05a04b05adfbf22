"""The one loop every backend shares.

``Driver`` is a coffea executor (``ExecutorBase``): ``Runner`` calls it once to
preprocess files and once to process chunks. It submits tasks to its backend,
collects them as they complete, retries, merges in a fixed tree, draws the
progress bar and fills the report. Backends only run tasks.

Where outputs live and where the tree's merges run is the placement's business
(:mod:`casa_executors.outputs`): in this process, in a store the workers share
(merge tasks on the engine; the checkpoint when there is one), or in the
engine's memory. The loop below is the same for all: chunk batches and merge
tasks go to the same engine, ready merges first; a merge whose inputs were lost
or found corrupt sends the chunks below it back to the queue.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

import cloudpickle
from coffea.processor import accumulate
from coffea.processor.executor import ExecutorBase

from casa_executors.adaptive import ADAPTIVE_FANIN, Grains, Planner, Todo, adaptable
from casa_executors.backends.base import Backend
from casa_executors.backends.iterative import IterativeBackend
from casa_executors.checkpoint import Checkpoint
from casa_executors.errors import ExecutorOptionError, WorkerLost, annotate, describe
from casa_executors.heap import old_heap_frozen
from casa_executors.internals import exception_chain as _exception_chain
from casa_executors.internals import runner_raises_returned, unwrap_runner_retries
from casa_executors.merge import Group, MergeFailed, MergeTree, Node, node_key
from casa_executors.outputs import Lost, check_merge_option, choose
from casa_executors.progress import ProgressBar
from casa_executors.report import DONE, Phase, Report
from casa_executors.source import open_files
from casa_executors.task import ChunkResult, ChunkTask, ErrorInfo, Fold, TaskBatch

NOT_RUN = "NotRun"
log = logging.getLogger(__name__)
# coffea's Runner raises an exception an executor returns (setting its partial_output) when
# skipbadfiles does not cover it; then the driver returns the run-stopping failure instead of raising it
_RUNNER_RAISES_RETURNED = runner_raises_returned()


@dataclass
class Driver(ExecutorBase):
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
    # False: no optimisation that rests on coffea/uproot internals (kept TTrees, NanoEvents forms, kept baskets),
    # on the driver and the workers; so does CASA_EXECUTORS_INTERNALS=0 in either's environment (internals.py)
    internals: bool = True
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
        if not isinstance(self.checkpoint_restart, bool):
            raise ExecutorOptionError(f"checkpoint_restart must be True or False, got {self.checkpoint_restart!r}")
        check_merge_option(self.merge)
        target = self.target_task_s
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not math.isfinite(target) or target <= 0):
            raise ExecutorOptionError(f"target_task_s must be a positive number of seconds (or None), got {target!r}")

    def _make_router(self):
        if self.cache is None:
            if self.token not in (None, False):
                raise ExecutorOptionError("token= is only used with cache=; give cache= too")
            return None
        from casa_executors.xcache.router import CacheRouter
        from casa_executors.xcache.tokens import discover_token

        token = discover_token(self.token) if self.token is not False else None
        try:
            return CacheRouter(self.cache, mode=self.cache_mode, token=token, spares=self.cache_spares)
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
        run_id = self._file_run(name)
        if not items:
            self.report.begin(name, self.backend.name, self.backend.workers, items)
            return accumulator, 0
        grains = None
        if name == "processing" and self.target_task_s is not None and adaptable(items):
            grains = Grains.split(items, self.merge_fanin)  # the leaves of the tree: tasks are its nodes
        t0 = time.perf_counter()
        with old_heap_frozen(), self.backend.session():  # full GC passes skip the user's heap meanwhile
            # begun once the engine is up: an external cluster's size is known only when connected
            phase = self.report.begin(name, self.backend.name, self.backend.workers,
                                      grains.leaves if grains else items, grains)
            run = _Run(self, phase, work, skipbadfiles, grains, run_id)
            try:
                merged = run.drive()
            finally:
                phase.wall_s = time.perf_counter() - t0
        if name == "preprocessing":
            self._file_runs.append(run_id)
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
    __slots__ = ("data", "future", "nodes")

    def __init__(self, future: Future, nodes: list[tuple[int, int]], data: Any) -> None:
        # the tree nodes its tasks compute, (level, index): chunks are leaves, (0, i)
        self.future, self.nodes, self.data = future, nodes, data


class _MergeJob:
    __slots__ = ("future", "group")

    def __init__(self, future: Future, group: Group) -> None:
        self.future, self.group = future, group


class _Run:
    """The state of one executor call."""

    def __init__(self, driver: Driver, phase: Phase, work: Any, skipbadfiles: Any,
                 grains: Grains | None, run_id: str) -> None:
        self.driver, self.phase, self.skipbadfiles = driver, phase, skipbadfiles
        self.backend = driver.backend
        n = len(phase.items)
        self.spec = work if self.backend.in_process else cloudpickle.dumps(work)
        self.run_id = run_id  # workers keep files open between this run's chunks only (Driver._file_run)
        self.checkpoint: Checkpoint | None = None
        if driver.checkpoint is not None and phase.name == "processing":
            self.checkpoint = Checkpoint(driver.checkpoint, restart=driver.checkpoint_restart)
            self.checkpoint.open(phase.items, work, driver.merge_fanin)
        self.tree = MergeTree(n, driver.merge_fanin)
        self.merges: deque[Group] = deque()  # ready groups waiting for a slot on the engine
        self.attempts = [0] * n
        self.failures = [0] * n  # failed attempts: a chunk fails for good after retries + 1
        self.losses = [0] * n  # outputs lost after the chunk was done (recomputed up to retries + 1 times)
        # adaptive chunking: a task is the node the planner picks (else one leaf, a chunk, per task)
        self.planner = Planner(grains, self.tree, driver.target_task_s, driver.retries) if grains else None
        self.todo = self._todo(range(n))
        self.inflight: dict[int, _ChunkJob | _MergeJob] = {}
        self.chunk_jobs = 0  # of them, chunk batches (the others are merges)
        self.keys = itertools.count()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.abort: tuple[int, BaseException] | None = None
        self.skipped: list[tuple[int, BaseException]] = []
        self.result: Any = None
        self.finished = False
        self.corrupt: list[str] = []
        # planned tasks are already the size they should be: one a task unless chunks_per_task says otherwise
        self.batch = driver.chunks_per_task or (1 if self.planner else self.backend.batch_size(n, phase.name))
        # the backend's batch shrinks with the work left (guided self-scheduling; asked once: an external
        # cluster's size is a call), a batch fixed by chunks_per_task or the planner does not
        self.guided = not driver.chunks_per_task and not self.planner
        self.limit = max(self.backend.max_inflight(), 1)
        # a store placement may make a temporary folder: drive() removes it (or this, on a failure here)
        self.placement = choose(self.backend, phase.name, driver.compression, driver.merge, driver.store,
                                self.checkpoint)
        if self.placement.name == "driver" and self.backend.in_process:
            self.placement.compression = None  # nothing leaves this process
        self.window = self.placement.window(self.limit)  # chunk tasks kept submitted
        try:
            self.bar = ProgressBar(
                bool(driver.status), driver.desc, driver.unit, n, self.backend.describe()
            )
        except BaseException:
            self.placement.close(False)
            raise

    def drive(self) -> Any:
        try:
            self._begin()
            while not self.finished:
                self._submit_more()
                if self.finished:
                    break
                if not self.inflight:
                    raise RuntimeError("casa_executors: the merge tree is incomplete with nothing left to run")
                try:
                    keys = [self.done.get(timeout=0.25)]
                except queue.Empty:
                    self.bar.refresh()
                    continue
                with contextlib.suppress(queue.Empty):  # and whatever else has finished meanwhile
                    while True:
                        keys.append(self.done.get_nowait())
                jobs = [self.inflight.pop(key) for key in keys]
                chunks = [job for job in jobs if isinstance(job, _ChunkJob)]
                self.chunk_jobs -= len(chunks)
                values = self.placement.collect([job.future for job in chunks])
                for job, value in zip(chunks, values):
                    for position, result in enumerate(self._results(value, [i for _, i in job.nodes])):
                        self._handle(result, job, position)
                for job in jobs:
                    if isinstance(job, _MergeJob):
                        self._merged(job)
        finally:
            self.bar.close()
            for job in self.inflight.values():
                with contextlib.suppress(Exception):  # e.g. parsl's AppFuture.cancel raises
                    job.future.cancel()
            self.inflight.clear()
            # the caller's own thread keeps no file open after a run, but for the processing that follows
            if self.backend.in_process and self.phase.name == "processing":
                open_files().close()
            self._close()
        return self.result

    # -- the start and the end ---------------------------------------------------------
    def _begin(self) -> None:
        """With a checkpoint: restore what it holds, run only the other chunks."""
        if self.checkpoint is None:
            return
        restored, todo, leftovers = self.checkpoint.resolve(self.tree)
        self.checkpoint.store.remove(leftovers)  # below restored nodes, temporary, partial: a kill's debris
        self.todo = self._todo(sorted(todo))
        for level, index in restored:
            span = self.tree.span(level, index)
            self.bar.events += Report.restore(self.phase, span)
            self.bar.refresh(advance=len(span))
        for level, index in restored:
            self._put(Node(level, index, node_key(level, index), True))

    def _finish(self) -> None:
        root = self.tree.root
        try:
            self.result = self.placement.fetch(root)
        except Lost as exc:
            self.tree.root = None
            self._lose(exc, None)
            return
        self.finished = True
        if self.checkpoint is not None and root.complete:
            self.checkpoint.write_manifest(complete=True)

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

    # -- the merge tree --------------------------------------------------------------
    def _put(self, node: Node) -> None:
        for group in self.tree.put(node):
            if not self.placement.merges_here:
                self.merges.append(group)
                continue
            self._merge_here(group)
        if self.tree.root is not None and not self.finished:
            self._finish()

    def _tail(self) -> bool:
        """The run's last merges: the driver merges them itself.
        A merge task would cost the engine's round trip (~80 ms a Spark job here, 10-20 ms on Work Queue)
        for work as serial as it is here. Two cases:
        - one group ready and nothing else to run: at most one group per level of the tree (each of at
          most a fan-in of outputs) comes this way, however many chunks the run has;
        - every chunk is in and the run's outputs are small in all (``Placement.small``): all the groups
          ready from then on, the few the last chunks completed and the parents of merges still on the
          engine; what they read is bounded by the outputs' total."""
        if not self.placement.tail_here or self.todo:
            return False
        if len(self.merges) == 1 and not self.inflight:
            return True
        return not self.chunk_jobs and self.placement.small

    def _merge_here(self, group: Group) -> None:
        """Merge ``group`` in this process and put the result in the tree."""
        try:
            handle = self.placement.merge_here(group, root=group.level == self.tree.top)
        except Lost as exc:
            self._lose(exc, group)
            return
        self._put(Node(group.level, group.index, handle, group.complete))

    def _merged(self, job: _MergeJob) -> None:
        group = job.group
        try:
            handle = self.placement.merged(group, job.future)
        except Lost as exc:
            self._lose(exc, group)
            return
        except MergeFailed:
            raise
        except BaseException as exc:  # the engine lost the merge task
            self._merge_failed(group, exc)
            return
        self._put(Node(group.level, group.index, handle, group.complete))

    def _merge_failed(self, group: Group, exc: BaseException) -> None:
        why = f"a merge task failed on the engine: {type(exc).__name__}: {exc}"
        lost = self.placement.lost_children(group)
        if lost:
            self._lose(Lost(lost, why), group)
            return
        group.attempts += 1
        if group.attempts <= self.driver.retries:
            self.merges.appendleft(group)
        elif self.placement.name == "store":  # the store still has the children: merge them here
            self._merge_here(group)
        else:
            self._lose(Lost([c for c in group.children if c.handle is not None], why), group)

    def _lose(self, exc: Lost, group: Group | None) -> None:
        """Outputs are gone or corrupt: plan their subtrees again (restore what the store has, rerun the rest)."""
        gone = {(n.level, n.index) for n in exc.nodes}
        if group is not None:
            self.tree.put_back([c for c in group.children if (c.level, c.index) not in gone])
        if exc.corrupt:
            self.corrupt += exc.corrupt
            self.placement.store.remove(exc.corrupt)
        for node in exc.nodes:
            if self.checkpoint is not None:
                restored, todo, _ = self.checkpoint.resolve(self.tree, node.level, node.index)
            else:
                restored, todo = [], list(self.tree.span(node.level, node.index))
            for i in todo:
                self._rerun(i, exc)
            for level, index in restored:
                self._put(Node(level, index, node_key(level, index), True))

    def _rerun(self, i: int, exc: Lost) -> None:
        row = self.phase.rows[i]
        if row.status not in DONE:  # it had failed: it still has no output
            self._put(Node(0, i, None, False))
            return
        self.losses[i] += 1
        self.bar.refresh(advance=-1)
        self.bar.events -= row.events
        if self.losses[i] > self.driver.retries + 1:
            Report.give_up(self.phase, i, "failed", "WorkerLost", f"its output was lost {self.losses[i]} times: {exc}")
            self._give_up(i, WorkerLost(f"the output of this chunk was lost {self.losses[i]} times: {exc}"))
            return
        log.info("%s item %d: its output was lost (%s); running it again", self.phase.name, i, type(exc).__name__)
        Report.requeue(self.phase, i)
        self.todo.appendleft(i)

    # -- chunks ------------------------------------------------------------------------
    def _submit_more(self) -> None:
        if self.abort is not None and self.todo:
            why = f"not run: the run stopped after {self.describe(*self.abort)}"
            while self.todo:
                i = self.todo.popleft()
                Report.give_up(self.phase, i, "failed", NOT_RUN, why)
                self._put(Node(0, i, None, False))
        while self.merges and self._tail():
            self._merge_here(self.merges.popleft())
        if self.merges:  # at once: a merge frees what its children hold, and there are few of them
            groups, calls = list(self.merges), {}
            self.merges.clear()
            for group in groups:
                fn, arg = self.placement.merge_call(group)
                calls.setdefault(fn, []).append((group, arg))
            for fn, pairs in calls.items():
                try:
                    futures = self.backend.submit_together(fn, [arg for _, arg in pairs])
                except Exception as exc:  # the engine refused the tasks themselves
                    futures = [_failed(exc) for _ in pairs]
                for (group, _), future in zip(pairs, futures):
                    self._track(_MergeJob(future, group))
        takes, batches = [], []
        workers = self.backend.workers if self.planner else 1  # asked once: an external cluster's size is a call
        batch = math.ceil(self.batch * len(self.todo) / len(self.phase.items)) if self.guided else self.batch
        while self.todo and len(self.inflight) + len(takes) < self.window:
            take = []
            while self.todo and len(take) < batch:
                take.append(self.planner.next(self.todo, workers) if self.planner else (0, self.todo.popleft()))
            tasks = [self._task(level, index) for level, index in take]
            takes.append(take)
            batches.append(TaskBatch(self.spec, tasks, self.placement.compression, self.driver.router,
                                     run=self.run_id, folds=[] if self.planner else self._folds(take),
                                     internals=self.driver.internals))
        if not batches:
            return
        try:
            submitted = self.placement.submit_chunks(batches)
        except Exception as exc:  # the engine refused the tasks themselves
            submitted = [(_failed(exc), None) for _ in batches]
        for take, (future, data) in zip(takes, submitted):
            self._track(_ChunkJob(future, take, data))

    def _folds(self, take: list[tuple[int, int]]) -> list[Fold]:
        """The runs of a batch that are all the leaves of a level-1 node, in order: its task merges them."""
        folds, position = [], 0
        if self.tree.top < 1:  # a single chunk: no node above it
            return folds
        while position < len(take):
            children = self.tree.children(1, take[position][1] // self.tree.fanin)
            run = take[position:position + len(children)]
            if len(children) > 1 and [index for _, index in run] == list(children):
                folds.append(Fold(children.start // self.tree.fanin, position, len(children)))
                position += len(children)
            else:
                position += 1
        return folds

    def _todo(self, leaves: Any) -> Todo:
        return self.planner.todo(leaves) if self.planner else Todo(leaves)

    def _task(self, level: int, index: int) -> ChunkTask:
        """The task computing node (level, index): a chunk, or (adaptive chunking) the one range of a
        file its leaves make."""
        span = self.tree.span(level, index)
        item = self.phase.range_item(span)
        return ChunkTask(index, item, max(self.attempts[i] for i in span) + 1, level)

    def _track(self, job: _ChunkJob | _MergeJob) -> None:
        key = next(self.keys)
        self.inflight[key] = job
        self.chunk_jobs += isinstance(job, _ChunkJob)
        job.future.add_done_callback(lambda f, key=key: self.done.put(key))

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

    def _handle(self, r: ChunkResult, job: _ChunkJob, position: int) -> None:
        level, index = job.nodes[position]
        span = self.tree.span(level, index)  # the leaves this task covered: chunk ``index`` when level is 0
        for i in span:
            self.attempts[i] += 1
        Report.attempt(self.phase, r, span)
        if r.merge_error is not None:  # a task's own merge (Fold): as a merge task's failure, not retried
            raise r.merge_error.exception()
        if r.ok:
            if self.planner:
                self.planner.finished(r.events, r.wall_s, r.worker)
            self.bar.advance(r.events, len(span))
            if r.merged:  # its output is in the node another result of the batch carries
                return
            if r.node is not None:
                level, index = 1, r.node
                self.placement.folded += 1
            self._put(Node(level, index, self.placement.leaf(r, job.data, position, level, index), True))
            return
        exc = r.error.exception()
        retry, stop = [], []  # a leaf fails for good after retries + 1 failed attempts, alone or in a range
        for i in span:
            self.failures[i] += 1
            (retry if self.failures[i] <= self.driver.retries and self.abort is None else stop).append(i)
        if self.planner:
            self.planner.failed(level, span, self.failures)
        if retry:
            log.info("%s item %d: attempt %d failed on %s (%s); retrying", self.phase.name, retry[0], r.attempt,
                     r.worker or self.backend.describe(), r.error.type_name)
            # in this thread a chunk is retried at once, as coffea's IterativeExecutor does: a run that
            # stops on it has run exactly the chunks before it; elsewhere the retry goes to the back
            for i in (reversed(retry) if self.backend.in_process else retry):
                (self.todo.appendleft if self.backend.in_process else self.todo.append)(i)
            self.bar.retries += 1
        for i in stop:
            Report.give_up(self.phase, i, "failed")
            self._give_up(i, exc)

    def _give_up(self, i: int, exc: BaseException) -> None:
        self.bar.failures += 1
        self.bar.advance()
        if self._skippable(exc):
            self.skipped.append((i, exc))
        elif self.abort is None:
            self.abort = (i, exc)
        self._put(Node(0, i, None, False))

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
        if index is None:
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


def _place(item: Any) -> str:
    """Where a work item reads: its file, and its entry range if it has one."""
    where = getattr(item, "filename", str(item))
    start, stop = getattr(item, "entrystart", None), getattr(item, "entrystop", None)
    return f"{where} entries {start}-{stop}" if start is not None else where


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future
