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
    :class:`SubmitChunks` (task, nodes, folds), :class:`SubmitMerge` (task, group),
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
      as an attempt of each chunk of the task.
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
    * **Speculation** (``speculate``). When nothing waits and a slot is free, a
      chunk task running longer than ``speculate_factor`` times the median of the
      finished tasks of its size (and longer than ``speculate_min_s``) gets a
      duplicate with the same nodes. The first copy to finish wins and the other is
      cancelled (its result, if it still comes, is ignored), so every node enters
      the tree once; an engine-level failure of one copy while the other runs is
      dropped. A task and its duplicate count as one attempt.
    * **The end.** When the root is in, :class:`Finish`; if fetching it fails, the
      shell reports the root lost and the chunks run again.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class SubmitMerge:
    """Merge ``group.children`` (in order) into node ``(group.level, group.index)`` on the engine."""

    task: int
    group: Group


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
    speculate_factor: float = 4.0
    speculate_min_s: float = 10.0
    speculate_after: int = 20  # finished tasks of a size before its median counts


# chunk states
WAITING, RUNNING, DONE, RESTORED, FAILED = range(5)
_DURATION_SAMPLES = 128  # per task size, the most recent: the median follows the run


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

    __slots__ = ("folds", "leaves", "nodes", "started", "twin")

    def __init__(self, nodes: tuple[NodeId, ...], folds: tuple[tuple[int, int, int], ...], leaves: int,
                 started: float) -> None:
        self.nodes, self.folds, self.leaves, self.started = nodes, folds, leaves, started
        self.twin: int | None = None  # the other copy, while a duplicate runs


class _Durations:
    """Recent durations of finished tasks of one size, and their median (recomputed now and then)."""

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
        self._durations: dict[int, _Durations] = {}  # task size (leaves) -> finished tasks' durations
        self._ages: dict[int, dict[int, float]] = {}  # task size -> {task: started}, oldest first, not duplicated
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

    def duplicated(self, task: int) -> bool:
        """Does a duplicate of chunk task ``task`` (or the task it duplicates) run?"""
        t = self._chunk_tasks.get(task)
        return t is not None and t.twin is not None

    def attempt(self, level: int, index: int) -> int:
        """The attempt number a task computing node (level, index) makes (1 the first time)."""
        return max(self.attempts[i] for i in self.tree.span(level, index)) + 1

    # -- events ------------------------------------------------------------------------------------
    def _tick(self, e: Tick) -> None:
        self.now = e.now

    def _workers_changed(self, e: WorkersChanged) -> None:
        self.workers = max(e.workers, 1)
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
        if task.twin is not None:
            self._chunk_tasks.pop(task.twin, None)
            self._out.append(Cancel(task.twin))
        if self.rules.speculate:
            self._finished_task(e.task, task)
        for (level, index), outcome in zip(task.nodes, e.outcomes):
            self._outcome(level, index, outcome)

    def _task_failed(self, e: TaskFailed) -> None:
        task = self._chunk_tasks.pop(e.task, None)
        if task is None:
            return
        if self.rules.speculate:
            self._ages[task.leaves].pop(e.task, None)
        if task.twin is not None:  # the other copy goes on: this one is as if never sent
            self._chunk_tasks[task.twin].twin = None
            return
        failed = Failed(e.error)
        for level, index in task.nodes:
            self._outcome(level, index, failed)

    def _merge_done(self, e: MergeDone) -> None:
        group = self._merge_tasks.pop(e.task)
        self._put(Node(group.level, group.index, e.handle, group.complete))

    def _merge_failed(self, e: MergeTaskFailed) -> None:
        group = self._merge_tasks.pop(e.task)
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
    def _outcome(self, level: int, index: int, outcome: Outcome) -> None:
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
            if self.rules.retry_at_once:  # as coffea's iterative executor: a run that stops on it ran
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
            out.append(SubmitMerge(task, group))
        todo, window = self.todo, self.window
        if todo and len(self._chunk_tasks) + len(self._merge_tasks) < window:
            self._submit_chunks()
        if (self.rules.speculate and not todo and self.abort is None and not self.finished
                and len(self._chunk_tasks) + len(self._merge_tasks) < window):
            self._speculate()

    def _submit_chunks(self) -> None:
        rules, todo, planner = self.rules, self.todo, self.planner
        batch = math.ceil(rules.batch * len(todo) / self.n) if rules.guided else rules.batch
        split = rules.guided_split if rules.guided else None
        status, tasks, merge_tasks = self.status, self._chunk_tasks, self._merge_tasks
        while todo and len(tasks) + len(merge_tasks) < self.window:
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
                leaves = len(take)
                folds = self._folds(take) if leaves > 1 else ()
            task = self._new_task()
            nodes = tuple(take)
            tasks[task] = _Task(nodes, folds, leaves, self.now)
            if rules.speculate:
                self._ages.setdefault(leaves, {})[task] = self.now
            self._out.append(SubmitChunks(task, nodes, folds))

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

    # -- stragglers --------------------------------------------------------------------------------
    def _finished_task(self, key: int, task: _Task) -> None:
        durations = self._durations.get(task.leaves)
        if durations is None:
            durations = self._durations[task.leaves] = _Durations()
        durations.add(self.now - task.started)
        self._ages[task.leaves].pop(key, None)

    def _speculate(self) -> None:
        rules, tasks = self.rules, self._chunk_tasks
        for leaves, ages in self._ages.items():
            durations = self._durations.get(leaves)
            if not ages or durations is None or durations.count < rules.speculate_after:
                continue
            threshold = max(rules.speculate_factor * durations.median, rules.speculate_min_s)
            free = self.window - len(tasks) - len(self._merge_tasks)
            stragglers = []
            for key, started in ages.items():  # oldest first
                if self.now - started <= threshold or len(stragglers) == free:
                    break  # the others of this size started later
                stragglers.append(key)
            for key in stragglers:
                del ages[key]  # once: a duplicate is not duplicated again
                task = tasks.get(key)
                if task is None or task.twin is not None:
                    continue
                twin = self._new_task()
                duplicate = _Task(task.nodes, task.folds, task.leaves, self.now)
                task.twin, duplicate.twin = twin, key
                tasks[twin] = duplicate
                self.speculated += 1
                self._out.append(SubmitChunks(twin, task.nodes, task.folds))

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
            for key in [k for k, t in self._chunk_tasks.items() if t.twin is not None]:
                self._out.append(Cancel(key))  # a copy whose node is in: nothing more to wait for
                del self._chunk_tasks[key]
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
