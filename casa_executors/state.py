"""The driver's rules as a state machine: events in, instructions out.

:class:`RunState` decides everything about one executor call — which chunks a
task carries, how many tasks are in flight, retries, the merge tree and where
its merges run, checkpoints, adaptive chunking, ``skipbadfiles``, recomputing
lost outputs, duplicating stragglers — and does nothing else: no engine, thread,
clock, progress bar or I/O. The driver's loop (:mod:`casa_executors.driver`) and
the facility simulator (``casa_benchmarks/facility_sim.py``) are shells around it:
they turn what happens into events, feed them to :meth:`RunState.handle`, and
carry out the instructions it returns. Modelled on distributed's
``WorkerState.handle_stimulus``.

Outputs are opaque *handles* here (the output itself, a store key, an engine
future: the shell's placement, :mod:`casa_executors.outputs`, knows); the state
sees only their sizes. Time comes in as data (:class:`Tick`).

Events (frozen dataclasses)
    :class:`Tick` (now), :class:`WorkersChanged` (workers, window),
    :class:`CheckpointRestored` (nodes; before anything else),
    :class:`ChunksDone` (task, one :class:`Ok` or :class:`Failed` per node),
    :class:`TaskFailed` (task, error: lost worker, cancelled),
    :class:`MergeDone` (task, handle), :class:`MergeTaskFailed` (task, why, lost children),
    :class:`MergedHere` (group, handle), :class:`OutputsLost` (nodes, why).

Instructions (frozen dataclasses)
    :class:`SubmitChunks` (task, nodes, folds, priority), :class:`SubmitMerge` (task, group, priority),
    :class:`MergeHere` (group), :class:`Cancel` (task), :class:`Requeue` (chunk),
    :class:`GiveUp` (chunk, error, reason, skipped), :class:`Finish` (root).

The rules
    * **Tasks.** Chunk ``i`` is leaf ``(0, i)`` of the fixed merge tree; a task
      computes one or more nodes. Waiting chunks go out in order, ``batch`` a task
      (``guided``: the batch shrinks with the work left, ``batch * waiting / n``),
      while fewer than ``window`` tasks (merges included) are in flight. A batch's
      run of all the leaves of a level-1 node is a *fold*: its task merges them.
      With adaptive chunking (``grains``), :class:`~casa_executors.adaptive.Planner`
      picks the node each task computes.
    * **Retries.** A chunk is attempted at most ``retries + 1`` times; a failed
      one goes to the back of the queue (``retry_at_once``: to the front, as
      coffea's iterative executor). An engine-level failure (lost worker) counts
      as an attempt of each chunk of the task, and its chunks go to the front.
      A task carrying a chunk that failed or was lost before is sent with
      ``priority=1``, as are merge tasks and duplicates: an engine that honours
      priorities (Dask, Work Queue) runs them before the queued chunk tasks.
    * **Where tasks are.** The engine says when a task ends, not when it starts:
      once :class:`WorkersChanged` has said how many workers there are, tasks are
      presumed to start first in, first out (priority first), one a worker;
      before that, when they are submitted. Speculation dates tasks from that; a
      task that ends while presumed queued is dated from the last end before it.
    * **Giving up.** A chunk out of attempts is given up: ``skipped`` when the
      ``skippable`` predicate accepts its error (``skipbadfiles``), else the run
      *aborts*: no more retries, waiting chunks are given up as ``not_run``, and
      the run ends once what runs has come back.
    * **Merges.** A group of the tree whose children are all in is merged here at
      once (``merges_here``), else it becomes a merge task, submitted at once. The
      *tail rule* merges here the run's last groups (``tail_here``): when nothing
      waits, either one group is ready with nothing in flight, or no chunk task is
      in flight and the outputs are small in all (``tail_bytes``). A merge task
      that fails is retried ``retries`` times, then merged here
      (``merge_fallback_here``: its inputs are in a store) or its inputs are lost.
    * **Lost outputs.** A node whose output is gone sends the chunks below it back
      to the queue (at the front), except what the checkpoint holds below it;
      a chunk whose output is lost more than ``retries + 1`` times is given up.
    * **Speculation** (``speculate``). The expected length of a task is its chunks
      times the median seconds a chunk took in finished tasks (from their presumed
      start, once ``speculate_after`` have finished, not updated once nothing
      waits: the last tasks out are the slow ones). A chunk task running longer
      than ``speculate_factor`` x (its chunks + 2) x that (and longer than
      ``speculate_min_s``) gets a duplicate with the same nodes, at once, while
      chunks still wait: at most ``speculate_share`` of the workers' worth of tasks
      have copies then (when nothing waits, as many as the window has room for).
      A copy of a task that straggled already gets a further copy after once (its
      chunks + 2) x the median, up to four copies. Merge tasks likewise, against
      the median merge. When nothing waits and presumed workers are idle, a task
      past its expected length gets a copy (MapReduce's backup tasks). With
      speculation and the guided split, a task takes at most 1/((2 x factor + 1) x
      workers) of the chunks left, so that a straggler caught late in the run, and
      a copy that straggles too, end about with the run. The first copy to finish
      wins and the others are cancelled (a result that still comes is ignored), so
      every node enters the tree once; an engine-level failure of one copy while
      another runs is dropped, and the tasks still running are watched again at once
      (a straggler gets a new copy). A task and its copies count as one attempt.
    * **The end.** When the root is in, :class:`Finish`; if fetching it fails, the
      shell reports the root lost and the chunks run again.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from casa_executors.adaptive import Grains, Planner, Todo
from casa_executors.merge import Group, MergeTree, Node, node_key

NodeId = tuple[int, int]  # (level, index) in the merge tree; chunk i is (0, i)


# -- events ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """The time now, in seconds on any monotonic clock (the rules never read one)."""

    now: float


@dataclass(frozen=True, slots=True)
class WorkersChanged:
    """The engine has ``workers`` workers now; ``window``: how many tasks to keep in flight from now on."""

    workers: int
    window: int | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRestored:
    """The checkpoint holds these nodes: they are in the tree, the chunks below them do not run.
    Must come before any other event."""

    nodes: tuple[NodeId, ...]


@dataclass(frozen=True, slots=True)
class Ok:
    """A node a chunk task computed. ``nbytes``: its encoded size (for the tail rule).
    ``node``: the task merged a fold's leaves into node ``(1, node)`` and this carries it;
    ``merged``: this node's output went into the fold another outcome carries."""

    handle: Any
    nbytes: int = 0
    events: int = 0
    wall_s: float = 0.0
    worker: str = ""
    node: int | None = None
    merged: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """A node a chunk task could not compute; ``error`` is opaque here (see ``skippable``)."""

    error: Any


Outcome = Ok | Failed


@dataclass(frozen=True, slots=True)
class ChunksDone:
    """A chunk task came back: one outcome per node of its :class:`SubmitChunks`, in order."""

    task: int
    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """A chunk task failed as a whole on the engine (lost worker, cancelled, refused)."""

    task: int
    error: Any


@dataclass(frozen=True, slots=True)
class MergeDone:
    task: int
    handle: Any


@dataclass(frozen=True, slots=True)
class MergeTaskFailed:
    """A merge task failed. ``lost``: children whose outputs went with it (then it is not retried:
    the chunks below them run again); ``restored``: nodes the checkpoint holds below those."""

    task: int
    why: str
    lost: tuple[Node, ...] = ()
    restored: tuple[NodeId, ...] = ()


@dataclass(frozen=True, slots=True)
class MergedHere:
    """The shell merged ``group`` (a :class:`MergeHere`) into ``handle``."""

    group: Group
    handle: Any


@dataclass(frozen=True, slots=True)
class OutputsLost:
    """Outputs the run counted on are gone or corrupt: ``nodes`` (anything with ``level`` and
    ``index``) held in the tree, or the root (its fetch failed). ``group``: the :class:`MergeHere`
    that found them (its other children are held again). ``restored``: nodes the checkpoint holds
    below the lost ones (the shell resolves them; empty without a checkpoint). Children of a merge
    *task* are reported by its :class:`MergeTaskFailed` instead."""

    nodes: tuple[Any, ...]
    why: str
    group: Group | None = None
    restored: tuple[NodeId, ...] = ()


Event = (Tick | WorkersChanged | CheckpointRestored | ChunksDone | TaskFailed | MergeDone | MergeTaskFailed
         | MergedHere | OutputsLost)


# -- instructions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitChunks:
    """Run a task computing ``nodes`` (each the range of chunks below it, in order); ``folds``:
    ``(index, start, count)``: nodes ``start..start+count-1`` are all the leaves of node
    ``(1, index)``, the task merges them (``task.Fold``)."""

    task: int
    nodes: tuple[NodeId, ...]
    folds: tuple[tuple[int, int, int], ...] = ()
    priority: int = 0  # 1: a retry of a lost task or a duplicate of a straggler; an engine may run it first


@dataclass(frozen=True, slots=True)
class SubmitMerge:
    """Merge ``group.children`` (in order) into node ``(group.level, group.index)`` on the engine."""

    task: int
    group: Group
    priority: int = 1  # merges go first: they free what their children hold, and they are short


@dataclass(frozen=True, slots=True)
class MergeHere:
    """Merge ``group`` in the shell's process now; answer with :class:`MergedHere` (or
    :class:`OutputsLost` with ``group``). ``root``: it is the tree's top."""

    group: Group
    root: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """Task ``task`` is not needed any more (its duplicate won); its result will be ignored."""

    task: int


@dataclass(frozen=True, slots=True)
class Requeue:
    """Chunk ``index`` was done, but its output was lost: it no longer counts as done."""

    index: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Chunk ``index`` failed for good. ``reason``: "failed" (out of attempts), "lost" (its output
    was lost too often: ``error`` is a :class:`LostTooOften`) or "not_run" (the run aborted first;
    ``error`` is None). ``skipped``: the run goes on without it (else it is what aborted the run,
    or came after that)."""

    index: int
    error: Any
    reason: str
    skipped: bool


@dataclass(frozen=True, slots=True)
class Finish:
    """Every node is in: fetch ``root`` (on failure: :class:`OutputsLost` with it)."""

    root: Node


Instruction = SubmitChunks | SubmitMerge | MergeHere | Cancel | Requeue | GiveUp | Finish


@dataclass(frozen=True, slots=True)
class LostTooOften:
    """The error of a chunk given up because its output was lost ``times`` times."""

    times: int
    why: str

    def __str__(self) -> str:
        return f"the output of this chunk was lost {self.times} times: {self.why}"


# -- configuration -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rules:
    """The knobs of the rules (see the module docstring)."""

    retries: int = 3
    fanin: int = 8
    batch: int = 1  # chunks a task (the first one, when guided)
    guided: bool = False
    # guided: a task takes at most 1/guided_split of the chunks left, worked out for every task (guided
    # self-scheduling); None: the batch is worked out once a round of submissions
    guided_split: int | None = None
    window: int = 1  # tasks in flight (merge tasks included)
    retry_at_once: bool = False
    merges_here: bool = True
    tail_here: bool = True
    tail_bytes: int | None = 16 << 20  # None: output sizes unknown, never "small"
    tail_only_small: bool = False  # the tail rule only applies when the outputs are small (engine memory)
    merge_fallback_here: bool = False
    target_task_s: float | None = None  # adaptive chunking (with grains)
    speculate: bool = False
    # a task running this many times its expected length is a straggler: 1.5 (Spark's default multiplier) kept
    # the simulated facility within 1.15x its bound at 100-10,000 workers with faults, 2 not at 10,000
    # (docs/driver-rules.md); below, no-fault runs lose more to copies (1.25: 1.06x)
    speculate_factor: float = 1.5
    speculate_min_s: float = 10.0  # ... and longer than this
    speculate_after: int = 20  # finished tasks before their seconds per chunk count
    speculate_share: float = 0.05  # duplicates in flight while chunks wait: at most this share of the workers


# chunk states
WAITING, RUNNING, DONE, RESTORED, FAILED = range(5)
_DURATION_SAMPLES = 128  # the most recent: the median follows the run
SLACK_CHUNKS = 2  # a task may run speculate_factor x (its chunks + this) x the seconds a chunk takes
MAX_COPIES = 4  # of a task in flight at once: the original and three duplicates


class _Queue:
    """The chunks waiting, in order: requeued ones first, then the never-run ones (a range: no
    memory per chunk), then retries. ``adaptive.Todo`` plays this part for a planner."""

    __slots__ = ("_back", "_fresh", "_front", "_stop")

    def __init__(self, leaves: Iterable[int]) -> None:
        self._front: deque[int] = deque()
        self._back: deque[int] = deque()
        if isinstance(leaves, range) and leaves.step == 1:
            self._fresh, self._stop = leaves.start, leaves.stop
        else:
            self._fresh = self._stop = 0
            self._front.extend(leaves)

    def __len__(self) -> int:
        return len(self._front) + (self._stop - self._fresh) + len(self._back)

    def __bool__(self) -> bool:
        return self._fresh < self._stop or bool(self._front) or bool(self._back)

    def popleft(self) -> int:
        if self._front:
            return self._front.popleft()
        if self._fresh < self._stop:
            self._fresh += 1
            return self._fresh - 1
        return self._back.popleft()

    def appendleft(self, leaf: int) -> None:
        self._front.appendleft(leaf)

    def append(self, leaf: int) -> None:
        self._back.append(leaf)


class _Task:
    """A chunk task in flight."""

    __slots__ = ("copies", "folds", "leaves", "nodes", "started", "submitted")

    def __init__(self, nodes: tuple[NodeId, ...], folds: tuple[tuple[int, int, int], ...], leaves: int,
                 submitted: float) -> None:
        self.nodes, self.folds, self.leaves, self.submitted = nodes, folds, leaves, submitted
        self.started: float | None = None  # presumed (see RunState._presume_starts); None: still queued
        self.copies: list[int] | None = None  # every copy in flight (shared by them), while duplicates run


class _Durations:
    """Recent seconds per chunk of finished tasks, and their median (recomputed now and then)."""

    __slots__ = ("count", "median", "samples")

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.count = 0
        self.median = math.inf

    def add(self, seconds: float) -> None:
        if len(self.samples) < _DURATION_SAMPLES:
            self.samples.append(seconds)
        else:
            self.samples[self.count % _DURATION_SAMPLES] = seconds
        self.count += 1
        if self.count < 64 or self.count % 16 == 0:
            ordered = sorted(self.samples)
            self.median = ordered[len(ordered) // 2]


class RunState:
    """The rules of one executor call over ``n`` chunks (see the module docstring).

    ``skippable(error) -> bool``: may the run go on without a chunk that failed with ``error``
    (``skipbadfiles``)? ``grains``: adaptive chunking (with ``rules.target_task_s``).
    Read-only for shells: ``tree``, ``attempts``, ``failures``, ``losses`` (per chunk),
    ``abort`` and ``skipped`` (``(chunk, error)``), ``retried``, ``running``, ``finished``.
    """

    def __init__(self, n: int, rules: Rules | None = None, skippable: Callable[[Any], bool] | None = None,
                 grains: Grains | None = None) -> None:
        self.rules = rules = rules or Rules()
        if n < 1:
            raise ValueError(f"a run needs at least one chunk, got {n}")
        if rules.retries < 0 or rules.batch < 1 or rules.window < 1:
            raise ValueError(f"retries >= 0, batch >= 1 and window >= 1 are needed, got {rules}")
        self.n = n
        self.skippable = skippable or (lambda error: False)
        self.tree = MergeTree(n, rules.fanin)
        self.planner = (Planner(grains, self.tree, rules.target_task_s, rules.retries)
                        if grains is not None else None)
        self.todo: _Queue | Todo = self._queue(range(n))
        self.status = bytearray(n)  # WAITING ...
        self.attempts = [0] * n
        self.failures = [0] * n  # failed attempts: a chunk fails for good after retries + 1
        self.losses = [0] * n  # outputs lost after the chunk was done
        self.abort: tuple[int, Any] | None = None
        self.skipped: list[tuple[int, Any]] = []
        self.retried = 0  # failed attempts sent again
        self.speculated = 0  # duplicates submitted
        self.output_bytes = 0
        self.window = rules.window
        self.workers = 1
        self.now = 0.0
        self.finished = False  # the root is in (Finish given)
        self._merges: deque[Group] = deque()  # ready, waiting to be submitted
        self._chunk_tasks: dict[int, _Task] = {}
        self._merge_tasks: dict[int, Group] = {}
        self._here = 0  # MergeHere given, not answered yet
        self._next_task = 0
        # where tasks are, presumed (the engine starts them first in, first out, priority first, one a worker)
        self._workers_known = False  # no WorkersChanged yet: every task is presumed started when submitted
        self._queued: deque[int] = deque()  # tasks presumed queued at the engine, in the order it starts them
        self._queued_first: deque[int] = deque()  # the same, with priority
        self._busy = 0  # tasks presumed running (chunk and merge tasks)
        self._merges_started: dict[int, float] = {}  # merge task -> presumed start
        # stragglers
        self._rate = _Durations()  # seconds per chunk of finished chunk tasks, from their presumed start
        self._merge_rate = _Durations()  # seconds a merge task lasts
        self._merge_copies: dict[int, list[int]] = {}  # merge task -> every copy in flight (shared by them)
        self._watch: list[tuple[float, int]] = []  # heap (when it is a straggler, task) of running tasks
        self._watch_idle: list[tuple[float, int]] = []  # heap (when it is late, task): for idle workers
        self._watched: set[int] = set()  # tasks (chunk or merge) with an entry in _watch: one at most
        self._unwatched: list[int] = []  # started before the rate counted
        self._pairs = 0  # tasks with a duplicate in flight
        self._last_end = 0.0  # when a chunk task last came back
        self._started = False
        self._out: list[Instruction] = []
        self._handlers: dict[type, Callable[[Any], None]] = {
            Tick: self._tick, WorkersChanged: self._workers_changed, CheckpointRestored: self._restored,
            ChunksDone: self._chunks_done, TaskFailed: self._task_failed, MergeDone: self._merge_done,
            MergeTaskFailed: self._merge_failed, MergedHere: self._merged_here, OutputsLost: self._outputs_lost,
        }

    # -- the interface ---------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; the instructions it leads to, in the order to carry them out."""
        return self.handle_all((event,))

    def handle_all(self, events: Iterable[Event]) -> list[Instruction]:
        """Apply several events that happened together (then decide once what to submit)."""
        out = self._out = []
        for event in events:
            try:
                handler = self._handlers[type(event)]
            except KeyError:
                raise TypeError(f"not an event of RunState: {event!r}") from None
            handler(event)
        self._started = True
        self._submit_more()
        return out

    @property
    def running(self) -> int:
        """Tasks in flight (chunk tasks, their duplicates, merge tasks) and merges here not answered."""
        return len(self._chunk_tasks) + len(self._merge_tasks) + self._here

    def task_nodes(self, task: int) -> tuple[NodeId, ...] | None:
        """The nodes a chunk task in flight computes (None: not in flight, e.g. cancelled)."""
        t = self._chunk_tasks.get(task)
        return t.nodes if t is not None else None

    def copies(self, task: int) -> list[int]:
        """The copies in flight of chunk task ``task`` (itself included; empty when it has none)."""
        t = self._chunk_tasks.get(task)
        return list(t.copies) if t is not None and t.copies is not None else []

    def duplicated(self, task: int) -> bool:
        """Does a duplicate of chunk task ``task`` (or the task it duplicates) run?"""
        t = self._chunk_tasks.get(task)
        return t is not None and t.copies is not None

    def attempt(self, level: int, index: int) -> int:
        """The attempt number a task computing node (level, index) makes (1 the first time)."""
        return max(self.attempts[i] for i in self.tree.span(level, index)) + 1

    # -- events ------------------------------------------------------------------------------------
    def _tick(self, e: Tick) -> None:
        self.now = e.now

    def _workers_changed(self, e: WorkersChanged) -> None:
        self.workers = max(e.workers, 1)
        self._workers_known = True
        if e.window is not None:
            self.window = max(e.window, 1)

    def _restored(self, e: CheckpointRestored) -> None:
        if self._started:
            raise ValueError("CheckpointRestored must come before any other event")
        covered = bytearray(self.n)
        for level, index in e.nodes:
            for i in self.tree.span(level, index):
                covered[i] = 1
                self.status[i] = RESTORED
        self.todo = self._queue([i for i in range(self.n) if not covered[i]])
        for level, index in e.nodes:
            self._put(Node(level, index, node_key(level, index), True))

    def _chunks_done(self, e: ChunksDone) -> None:
        task = self._chunk_tasks.pop(e.task, None)
        if task is None:
            return  # cancelled: its duplicate won
        if len(e.outcomes) != len(task.nodes):
            raise ValueError(f"task {e.task} computes {len(task.nodes)} nodes, {len(e.outcomes)} outcomes came")
        self._ended(task)
        if task.copies is not None:
            for key in task.copies:
                if key != e.task:
                    self._ended(self._chunk_tasks.pop(key))
                    self._out.append(Cancel(key))
            self._pairs -= 1
        if self.rules.speculate and (self.todo or self._rate.count < 64):
            # once nothing waits, the tasks still out are the slow ones: the rate stays as it was. A task that
            # ends while presumed queued had a worker the presumption did not see free (Dask gives a worker
            # a second task, which waits behind a straggler there): it began no earlier than the last end
            begun = task.started if task.started is not None else max(task.submitted, self._last_end)
            self._rate_add((self.now - begun) / task.leaves)
        self._last_end = self.now
        for (level, index), outcome in zip(task.nodes, e.outcomes):
            self._outcome(level, index, outcome)

    def _task_failed(self, e: TaskFailed) -> None:
        task = self._chunk_tasks.pop(e.task, None)
        if task is None:
            return
        self._ended(task)
        if task.copies is not None:  # the other copies go on: this one is as if never sent
            task.copies.remove(e.task)
            others = task.copies
            if len(others) == 1:
                self._chunk_tasks[others[0]].copies = None
                self._pairs -= 1
            for key in others:  # a copy of a straggler was lost: the one it was copied from gets another
                self._rewatch(key)
            return
        failed, first = Failed(e.error), []
        for level, index in task.nodes:
            self._outcome(level, index, failed, first)
        for i in reversed(first):  # a lost worker, not the chunks' fault: they go first, in order
            self.todo.appendleft(i)

    def _merge_done(self, e: MergeDone) -> None:
        group = self._merge_tasks.pop(e.task, None)
        if group is None:
            return  # cancelled: its duplicate won
        started = self._merge_ended(e.task)
        if self.rules.speculate and started is not None and (self.todo or self._merge_rate.count < 64):
            self._merge_rate.add(self.now - started)
            if self._merge_rate.count == self.rules.speculate_after:
                self._watch_unwatched()
        copies = self._merge_copies.pop(e.task, None)
        if copies is not None:
            for key in copies:
                if key != e.task:
                    del self._merge_copies[key], self._merge_tasks[key]
                    self._merge_ended(key)
                    self._out.append(Cancel(key))
            self._pairs -= 1
        self._put(Node(group.level, group.index, e.handle, group.complete))

    def _merge_failed(self, e: MergeTaskFailed) -> None:
        group = self._merge_tasks.pop(e.task, None)
        if group is None:
            return  # cancelled: its duplicate won
        self._merge_ended(e.task)
        copies = self._merge_copies.pop(e.task, None)
        if copies is not None:  # the other copies go on (and say for themselves if the children are gone)
            copies.remove(e.task)
            if len(copies) == 1:
                del self._merge_copies[copies[0]]
                self._pairs -= 1
            for key in copies:  # as for chunk tasks: the one a lost copy was copied from is watched again
                self._rewatch(key)
            return
        if e.lost:
            self._lose(e.lost, e.why, group, e.restored)
            return
        group.attempts += 1
        if group.attempts <= self.rules.retries:
            self._merges.appendleft(group)
        elif self.rules.merge_fallback_here:  # a store still has the children
            self._merge_here(group)
        else:
            self._lose([c for c in group.children if c.handle is not None], e.why, group, ())

    def _merged_here(self, e: MergedHere) -> None:
        self._here -= 1
        group = e.group
        self._put(Node(group.level, group.index, e.handle, group.complete))

    def _outputs_lost(self, e: OutputsLost) -> None:
        if e.group is not None:
            self._here -= 1
        self._lose(e.nodes, e.why, e.group, e.restored)

    # -- chunks ------------------------------------------------------------------------------------
    def _outcome(self, level: int, index: int, outcome: Outcome, first: list[int] | None = None) -> None:
        """``first``: chunks to retry go there (the caller puts them first in the queue), not to the back."""
        if level:
            span = self.tree.span(level, index)
            for i in span:
                self.attempts[i] += 1
        else:  # a chunk: the common case, kept short
            span = range(index, index + 1)
            self.attempts[index] += 1
        if type(outcome) is Ok:
            if level:
                for i in span:
                    self.status[i] = DONE
            else:
                self.status[index] = DONE
            self.output_bytes += outcome.nbytes
            if self.planner is not None:
                self.planner.finished(outcome.events, outcome.wall_s, outcome.worker)
            if outcome.merged:  # its output is in the node another outcome of the task carries
                return
            if outcome.node is not None:
                level, index = 1, outcome.node
            self._put(Node(level, index, outcome.handle, True))
            return
        retries, failures = self.rules.retries, self.failures
        retry, stop = [], []  # a leaf fails for good after retries + 1 failed attempts, alone or in a range
        for i in span:
            failures[i] += 1
            (retry if failures[i] <= retries and self.abort is None else stop).append(i)
        if self.planner is not None:
            self.planner.failed(level, span, failures)
        if retry:
            self.retried += 1
            if first is not None:
                for i in retry:
                    self.status[i] = WAITING
                first += retry
            elif self.rules.retry_at_once:  # as coffea's iterative executor: a run that stops on it ran
                for i in reversed(retry):  # exactly the chunks before it
                    self.status[i] = WAITING
                    self.todo.appendleft(i)
            else:
                for i in retry:
                    self.status[i] = WAITING
                    self.todo.append(i)
        for i in stop:
            self._give_up(i, outcome.error, "failed")

    def _give_up(self, i: int, error: Any, reason: str) -> None:
        skipped = self.skippable(error)
        if skipped:
            self.skipped.append((i, error))
        elif self.abort is None:
            self.abort = (i, error)
        self.status[i] = FAILED
        self._out.append(GiveUp(i, error, reason, skipped))
        self._put(Node(0, i, None, False))

    def _submit_more(self) -> None:
        out = self._out
        if self.abort is not None and self.todo:
            while self.todo:
                i = self.todo.popleft()
                self.status[i] = FAILED
                out.append(GiveUp(i, None, "not_run", False))
                self._put(Node(0, i, None, False))
        while self._merges and self._tail():
            self._merge_here(self._merges.popleft())
        while self._merges:  # at once: a merge frees what its children hold, and there are few of them
            group = self._merges.popleft()
            task = self._new_task()
            self._merge_tasks[task] = group
            self._enqueue(task, 1)
            out.append(SubmitMerge(task, group, 1))
        if self.todo and len(self._chunk_tasks) + len(self._merge_tasks) < self.window:
            self._submit_chunks()
        self._presume_starts()
        if self.rules.speculate and self.abort is None and not self.finished and self._watch:
            self._speculate()
            if not self.todo and self._busy < self.workers:
                self._back_up()
            self._presume_starts()

    def _submit_chunks(self) -> None:
        rules, todo, planner = self.rules, self.todo, self.planner
        batch = math.ceil(rules.batch * len(todo) / self.n) if rules.guided else rules.batch
        split = rules.guided_split if rules.guided else None
        if split and rules.speculate and self._workers_known:
            # a straggler is caught after speculate_factor times its task's length and its duplicate takes
            # one more: a task carries at most 1/((factor + 1) x workers) of the chunks left, so that a
            # straggler's duplicate ends about when the run would have
            split = max(split, math.ceil((2 * rules.speculate_factor + 1) * self.workers))
        status, tasks, merge_tasks = self.status, self._chunk_tasks, self._merge_tasks
        failures, losses = self.failures, self.losses
        while todo and len(tasks) + len(merge_tasks) < self.window:
            priority = 0
            if split:
                batch = min(rules.batch, -(-len(todo) // split))
            if planner is not None:
                take = [planner.next(todo, self.workers)]
                leaves = 0
                for level, index in take:
                    for i in self.tree.span(level, index):
                        status[i] = RUNNING
                        leaves += 1
                folds = ()
            else:
                take = []
                while todo and len(take) < batch:
                    i = todo.popleft()
                    status[i] = RUNNING
                    take.append((0, i))
                    if failures[i] or losses[i]:
                        priority = 1
                leaves = len(take)
                folds = self._folds(take) if leaves > 1 else ()
            task = self._new_task()
            nodes = tuple(take)
            tasks[task] = _Task(nodes, folds, leaves, self.now)
            self._enqueue(task, priority)
            self._out.append(SubmitChunks(task, nodes, folds, priority))

    def _folds(self, take: list[NodeId]) -> tuple[tuple[int, int, int], ...]:
        """The runs of a batch that are all the leaves of a level-1 node, in order: its task merges them."""
        tree = self.tree
        if tree.top < 1:  # a single chunk: no node above it
            return ()
        folds, position, fanin = [], 0, tree.fanin
        while position < len(take):
            children = tree.children(1, take[position][1] // fanin)
            run = take[position:position + len(children)]
            if len(children) > 1 and [index for _, index in run] == list(children):
                folds.append((children.start // fanin, position, len(children)))
                position += len(children)
            else:
                position += 1
        return tuple(folds)

    def _new_task(self) -> int:
        self._next_task += 1
        return self._next_task

    def _queue(self, leaves: Sequence[int]) -> _Queue | Todo:
        return self.planner.todo(leaves) if self.planner is not None else _Queue(leaves)

    # -- where tasks are, presumed -------------------------------------------------------------------
    # The engine says when a task ends, not when it starts: the rules presume it starts them first in,
    # first out (priority first), one a worker, as Dask and Work Queue do. Without WorkersChanged a task
    # is presumed started when submitted.
    def _enqueue(self, task: int, priority: int) -> None:
        if not self._workers_known:
            self._start(task)
        else:
            (self._queued_first if priority else self._queued).append(task)

    def _presume_starts(self) -> None:
        queued_first, queued = self._queued_first, self._queued
        while self._busy < self.workers and (queued_first or queued):
            self._start((queued_first or queued).popleft())

    def _start(self, key: int) -> None:
        task = self._chunk_tasks.get(key)
        if task is not None:
            task.started = self.now
            self._busy += 1
            if self.rules.speculate:
                self._watch_task(key, task)
        elif key in self._merge_tasks:
            self._merges_started[key] = self.now
            self._busy += 1
            if self.rules.speculate:
                self._watch_merge(key)
        # else it ended before its presumed start (more workers than said): nothing runs

    def _ended(self, task: _Task) -> None:
        if task.started is not None:
            self._busy -= 1

    def _merge_ended(self, key: int) -> float | None:
        """Merge task ``key`` is over: when it was presumed to start (None: it was still queued)."""
        started = self._merges_started.pop(key, None)
        self._watched.discard(key)
        if started is not None:
            self._busy -= 1
        return started

    # -- stragglers --------------------------------------------------------------------------------
    def _limit(self, task: _Task) -> float:
        """How long ``task`` may run before it counts as a straggler: ``speculate_factor`` times its length
        (with two chunks more: a short task's length varies most, one chunk of the ADL queries 0.1-2.8 x the
        mean); a copy of a task that straggled already, once its length (faults come in runs: a bad node)."""
        rules = self.rules
        factor = rules.speculate_factor if task.copies is None else 1.0
        return max(factor * (task.leaves + SLACK_CHUNKS) * self._rate.median, rules.speculate_min_s)

    def _merge_limit(self) -> float:
        return max(self.rules.speculate_factor * self._merge_rate.median, self.rules.speculate_min_s)

    def _watch_task(self, key: int, task: _Task) -> None:
        if self._rate.count < self.rules.speculate_after:
            self._unwatched.append(key)
        else:
            self._watch_at(task.started + self._limit(task), key)
            heapq.heappush(self._watch_idle, (task.started + task.leaves * self._rate.median, key))

    def _watch_merge(self, key: int) -> None:
        if self._merge_rate.count < self.rules.speculate_after:
            self._unwatched.append(key)
        else:
            self._watch_at(self._merges_started[key] + self._merge_limit(), key)

    def _watch_at(self, when: float, key: int) -> None:
        """Task ``key`` (chunk or merge) is looked at again at ``when`` (``_speculate``)."""
        heapq.heappush(self._watch, (when, key))
        self._watched.add(key)

    def _rewatch(self, key: int) -> None:
        """Watch a running task (chunk or merge) again at once: its entry went when it was copied, and that
        copy was lost; past its limit, it gets a new copy."""
        if not self.rules.speculate or key in self._watched:
            return
        task = self._chunk_tasks.get(key)
        if task is None:  # a merge task: copied, so its rate counted already
            if key in self._merges_started:
                self._watch_at(self.now, key)
        elif task.started is not None and self._rate.count >= self.rules.speculate_after:
            self._watch_at(self.now, key)

    def _watch_unwatched(self) -> None:
        """A rate just started to count: watch the tasks that started before (the others wait on)."""
        unwatched, self._unwatched = self._unwatched, []
        for key in unwatched:
            task = self._chunk_tasks.get(key)
            if task is not None:
                self._watch_task(key, task)
            elif key in self._merges_started:
                self._watch_merge(key)

    def _rate_add(self, seconds_per_chunk: float) -> None:
        self._rate.add(seconds_per_chunk)
        if self._unwatched and self._rate.count == self.rules.speculate_after:
            self._watch_unwatched()

    def _speculate(self) -> None:
        """Duplicate the tasks past their limit: while chunks wait, at most ``speculate_share`` of the
        workers' worth of tasks with copies at once (a further copy of one of them is not counted); when
        nothing waits, also as many as the window has room for."""
        rules, tasks, watch, now = self.rules, self._chunk_tasks, self._watch, self.now
        allowed = max(1, math.ceil(rules.speculate_share * self.workers)) - self._pairs
        if not self.todo:
            allowed = max(allowed, self.window - len(tasks) - len(self._merge_tasks))
        later = []  # past their limit, but no room for another task with copies now
        while watch and watch[0][0] <= now:
            entry = heapq.heappop(watch)
            key = entry[1]
            self._watched.discard(key)  # its entry is gone; one pushed again (_watch_at) is recorded again
            task = tasks.get(key)
            if task is None:
                new = key not in self._merge_copies
                if new and allowed <= 0:
                    later.append(entry)
                elif self._speculate_merge(key) and new:
                    allowed -= 1
                continue
            if task.started is None or (task.copies is not None and len(task.copies) >= MAX_COPIES):
                continue
            limit = task.started + self._limit(task)  # the rate may have changed since
            if limit > now:
                self._watch_at(limit, key)
            elif task.copies is None and allowed <= 0:
                later.append(entry)
            else:
                allowed -= task.copies is None
                self._duplicate(key, task)
        for when, key in later:
            self._watch_at(when, key)

    def _back_up(self) -> None:
        """Nothing waits and workers are idle (the run's end): a task running longer than it should
        (its chunks x the seconds a chunk takes) gets a copy on an idle worker (MapReduce's backup tasks)."""
        tasks, watch, now = self._chunk_tasks, self._watch_idle, self.now
        idle = self.workers - self._busy
        while watch and watch[0][0] <= now and idle > 0:
            _, key = heapq.heappop(watch)
            task = tasks.get(key)
            if task is None or task.started is None or (task.copies is not None and len(task.copies) >= MAX_COPIES):
                continue
            self._duplicate(key, task)
            idle -= 1

    def _duplicate(self, key: int, task: _Task) -> None:
        twin = self._new_task()
        duplicate = _Task(task.nodes, task.folds, task.leaves, self.now)
        if task.copies is None:
            task.copies = [key]
            self._pairs += 1
        task.copies.append(twin)
        duplicate.copies = task.copies
        self._chunk_tasks[twin] = duplicate
        self.speculated += 1
        self._enqueue(twin, 1)
        self._out.append(SubmitChunks(twin, task.nodes, task.folds, 1))

    def _speculate_merge(self, key: int) -> int:
        """Duplicate merge task ``key`` if it is past its limit (1), or watch it on (0)."""
        started = self._merges_started.get(key)
        copies = self._merge_copies.get(key)
        if started is None or (copies is not None and len(copies) >= MAX_COPIES):
            return 0
        limit = started + self._merge_limit()
        if limit > self.now:
            self._watch_at(limit, key)
            return 0
        group = self._merge_tasks[key]
        twin = self._new_task()
        self._merge_tasks[twin] = group
        if copies is None:
            copies = self._merge_copies[key] = [key]
            self._pairs += 1
        copies.append(twin)
        self._merge_copies[twin] = copies
        self.speculated += 1
        self._enqueue(twin, 1)
        self._out.append(SubmitMerge(twin, group, 1))
        return 1

    # -- the merge tree ----------------------------------------------------------------------------
    def _put(self, node: Node) -> None:
        for group in self.tree.put(node):
            if self.rules.merges_here:
                self._merge_here(group)
            else:
                self._merges.append(group)
        root = self.tree.root
        if root is not None and not self.finished:
            self.finished = True
            for key in [k for k, t in self._chunk_tasks.items() if t.copies is not None]:
                self._out.append(Cancel(key))  # a copy whose node is in: nothing more to wait for
                self._ended(self._chunk_tasks.pop(key))
            for key in list(self._merge_copies):
                self._out.append(Cancel(key))
                del self._merge_tasks[key]
                self._merge_ended(key)
            self._merge_copies.clear()
            self._pairs = 0
            self._out.append(Finish(root))

    def _merge_here(self, group: Group) -> None:
        self._here += 1
        self._out.append(MergeHere(group, group.level == self.tree.top))

    @property
    def small(self) -> bool:
        """Are the run's chunk outputs small in all (the tail rule)?"""
        return self.rules.tail_bytes is not None and self.output_bytes <= self.rules.tail_bytes

    def _tail(self) -> bool:
        """The run's last merges run here: a merge task would cost the engine's round trip for work as
        serial as it is here. When nothing waits, either one group is ready and nothing else is in flight
        (at most one group per level of the tree comes this way), or no chunk task is in flight and the
        outputs are small in all (what the last groups read is bounded by the outputs' total)."""
        rules = self.rules
        if not rules.tail_here or (rules.tail_only_small and not self.small) or self.todo:
            return False
        if len(self._merges) == 1 and not self._chunk_tasks and not self._merge_tasks:
            return True
        return not self._chunk_tasks and self.small

    def _lose(self, nodes: Iterable[Any], why: str, group: Group | None, restored: Sequence[NodeId]) -> None:
        """Outputs are gone: the chunks below them run again, except what the checkpoint holds."""
        tree = self.tree
        gone = {(n.level, n.index) for n in nodes}
        if group is not None:
            tree.put_back([c for c in group.children if (c.level, c.index) not in gone])
        for level, index in sorted(gone):
            if level == tree.top and tree.root is not None:
                tree.root, self.finished = None, False
            else:
                tree.drop(level, index)
            span = tree.span(level, index)
            below = [(lv, j) for lv, j in restored if lv <= level and tree.span(lv, j).start in span]
            kept = bytearray(len(span))
            for lv, j in below:
                for i in tree.span(lv, j):
                    kept[i - span.start] = 1
            for i in span:
                if not kept[i - span.start]:
                    self._rerun(i, why)
            for lv, j in below:
                self._put(Node(lv, j, node_key(lv, j), True))

    def _rerun(self, i: int, why: str) -> None:
        if self.status[i] not in (DONE, RESTORED):  # it had failed: it still has no output
            self._put(Node(0, i, None, False))
            return
        self.losses[i] += 1
        self.status[i] = WAITING
        self._out.append(Requeue(i))
        if self.losses[i] > self.rules.retries + 1:
            self._give_up(i, LostTooOften(self.losses[i], why), "lost")
            return
        self.todo.appendleft(i)
