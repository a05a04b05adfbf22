"""Adaptive chunking (``target_task_s=``): tasks sized to a duration, the output unchanged.

Every chunk costs a fixed ~40 ms (uproot reads the TTree's metadata, NanoEvents
builds its form), which dominates light queries on small chunks; a long chunk
leaves cores idle at the end of a run. With ``target_task_s`` the driver sizes
the tasks itself, on every backend:

* each processing item of at least ``merge_fanin`` x :data:`MIN_GRAIN` entries
  is cut into ``merge_fanin`` equal *grains* (shorter ones are one grain) and the
  fixed merge tree is built over the grains, so an item cut at an aligned place
  is one node of level 1 (:class:`Grains`);
* a task covers exactly one node of that tree whose grains are consecutive
  entry ranges of one file: it reads the whole range at once and its output
  enters the tree as that node. Merge order (the bits of the output), store and
  checkpoint keys, recomputation of lost outputs and Dask's in-memory placement
  are those of the fixed tree, untouched;
* :class:`Planner` picks the node for the next waiting grain: the level whose
  estimated duration is closest to the target (in log), from a fit of
  ``wall = fixed + per_event * events`` over finished tasks, but no bigger than
  ``1 / (TAIL_TASKS_PER_WORKER * workers)`` of the work still waiting (every
  core stays busy at the end) unless cutting it would cost more fixed costs than
  it saves at the tail. Before any task has finished, tasks are the
  size of the user's items. After a failure the leaves of the failed task run
  one level lower, and alone on their last attempt (a bad range is narrowed
  down; attempts are still counted per leaf: ``retries + 1`` at most).

Design and figures: ``docs/adaptive-chunking.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from coffea.processor.executor import WorkItem

from casa_executors.merge import MergeTree

log = logging.getLogger(__name__)
# the default merge fan-in with target_task_s: a binary tree has nodes of 1, 2, 4, 8... items, so a
# task can cover far more of a file than with 1, 8, 64... (a node never spans two files); see the docs
ADAPTIVE_FANIN = 2
MIN_GRAIN = 1000  # entries: smaller grains would cost more in per-task overhead than they balance
TAIL_TASKS_PER_WORKER = 2  # a task is at most 1/(this x workers) of the work still waiting
DECAY = 0.9  # weight of a finished task in the fit, per newer one: the estimate follows warm-up and load


def adaptable(items: Sequence[Any]) -> bool:
    """Items adaptive chunking can cut and join: coffea WorkItems (processing of ROOT or parquet)."""
    return bool(items) and all(isinstance(it, WorkItem) for it in items)


def continues(a: WorkItem, b: WorkItem) -> bool:
    """Is ``b`` the next entries of the same tree of the same file as ``a`` (one read covers both)?"""
    return (b.entrystart == a.entrystop and b.filename == a.filename and b.treename == a.treename
            and b.fileuuid == a.fileuuid and b.dataset == a.dataset and b.usermeta == a.usermeta
            and b.preload == a.preload)


def cover(leaves: Sequence[WorkItem], span: range) -> WorkItem:
    """One WorkItem for consecutive leaves of one file: the first one, up to the last one's end."""
    first = leaves[span.start]
    return first if len(span) == 1 else dataclasses.replace(first, entrystop=leaves[span.stop - 1].entrystop)


@dataclasses.dataclass
class Grains:
    """The user's items cut into the leaves of the merge tree."""

    items: list[WorkItem]
    leaves: list[WorkItem]
    owner: list[int]  # leaf -> the index of its item
    segment: list[int]  # leaf -> the number of the stretch of consecutive entries of one file it is in

    @classmethod
    def split(cls, items: Sequence[WorkItem], fanin: int, min_entries: int = MIN_GRAIN) -> Grains:
        leaves: list[WorkItem] = []
        owner: list[int] = []
        for j, item in enumerate(items):
            n = item.entrystop - item.entrystart
            # fanin grains or none: an item cut in fewer would shift every later item off the tree's
            # node boundaries (and only a very slow analysis needs a task shorter than fanin x 1,000 entries)
            grains = fanin if n >= fanin * min_entries else 1
            cuts = [item.entrystart + n * c // grains for c in range(grains + 1)]
            for start, stop in itertools.pairwise(cuts):
                leaves.append(item if grains == 1 else dataclasses.replace(item, entrystart=start, entrystop=stop))
                owner.append(j)
        segment, s = [], 0
        for i, leaf in enumerate(leaves):
            s += i > 0 and not continues(leaves[i - 1], leaf)
            segment.append(s)
        return cls(list(items), leaves, owner, segment)

    def processed(self, done: Sequence[bool]) -> set[WorkItem]:
        """coffea's ``processed`` set for what the output holds: the user's items whose grains are all
        done, and of the others the ranges that are (what a fixed-chunk run would list, when every
        item either succeeds or fails as a whole)."""
        out: set[WorkItem] = set()
        for j, leaves in itertools.groupby(range(len(self.leaves)), key=self.owner.__getitem__):
            leaves = list(leaves)
            if all(done[i] for i in leaves):
                out.add(self.items[j])
                continue
            for ok, run in itertools.groupby(leaves, key=done.__getitem__):
                if ok:
                    run = list(run)
                    out.add(cover(self.leaves, range(run[0], run[-1] + 1)))
        return out


class Todo:
    """The leaves waiting to run, taken in order (like a ``deque``); a planner can also take the other
    leaves of a node out of the middle. ``events`` is the entries of the waiting leaves."""

    def __init__(self, leaves: Iterable[int] = (), sizes: Sequence[int] | None = None) -> None:
        self._queue: deque[tuple[int, int]] = deque()  # (leaf, ticket); a stale ticket was taken meanwhile
        self._tickets: dict[int, int] = {}
        self._issued = itertools.count()
        self._sizes = sizes
        self.events = 0
        for i in leaves:
            self.append(i)

    def __len__(self) -> int:
        return len(self._tickets)

    def __contains__(self, leaf: int) -> bool:
        return leaf in self._tickets

    def _enter(self, leaf: int) -> tuple[int, int]:
        if leaf in self._tickets:
            raise ValueError(f"leaf {leaf} is already waiting")
        ticket = self._tickets[leaf] = next(self._issued)
        self.events += self._sizes[leaf] if self._sizes is not None else 0
        return leaf, ticket

    def append(self, leaf: int) -> None:
        self._queue.append(self._enter(leaf))

    def appendleft(self, leaf: int) -> None:
        self._queue.appendleft(self._enter(leaf))

    def popleft(self) -> int:
        while self._queue:
            leaf, ticket = self._queue.popleft()
            if self._tickets.get(leaf) == ticket:
                self.take([leaf])
                return leaf
        raise IndexError("no leaf is waiting")

    def take(self, leaves: Iterable[int]) -> None:
        for leaf in leaves:
            del self._tickets[leaf]
            self.events -= self._sizes[leaf] if self._sizes is not None else 0


class _Fit:
    """Weighted least squares of ``wall = fixed + per_event * events``, older points decaying."""

    def __init__(self) -> None:
        self.n = 0
        self.sw = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.fixed = self.per_event = 0.0
        self.alike = True  # all tasks of about one size: the split between fixed and per event is unknown
        self.mean_s = 0.0

    def add(self, events: float, wall_s: float) -> None:
        self.sw, self.sx, self.sy, self.sxx, self.sxy = (
            DECAY * self.sw + 1, DECAY * self.sx + events, DECAY * self.sy + wall_s,
            DECAY * self.sxx + events * events, DECAY * self.sxy + events * wall_s)
        self.n += 1
        mx, my = self.sx / self.sw, self.sy / self.sw
        var = self.sxx / self.sw - mx * mx
        self.mean_s, self.alike = my, var <= (0.05 * mx) ** 2
        if self.alike:
            # tasks of one size cannot tell a fixed cost from a per-event one: take it all per event,
            # which overestimates bigger tasks (they are tried, and the fit corrects itself)
            self.fixed, self.per_event = (0.0, my / mx) if mx > 0 else (my, 0.0)
            return
        self.per_event = (self.sxy / self.sw - mx * my) / var
        self.fixed = my - self.per_event * mx
        if self.fixed < 0:
            self.fixed, self.per_event = 0.0, self.sxy / self.sxx
        elif self.per_event < 0:
            self.fixed, self.per_event = my, 0.0


class Estimate:
    """Seconds a task of ``events`` takes, from the tasks that finished. A worker's first task (imports,
    JIT, cold caches) is kept apart and used only while nothing else is known (Work Queue: every task
    is a fresh interpreter, so all are first tasks)."""

    def __init__(self) -> None:
        self._warm, self._first = _Fit(), _Fit()
        self._workers: set[str] = set()

    def add(self, events: int, wall_s: float, worker: str) -> None:
        fit = self._warm if worker in self._workers else self._first
        self._workers.add(worker)
        fit.add(events, wall_s)

    @property
    def ready(self) -> bool:
        return bool(self._warm.n or self._first.n)

    def seconds(self, events: int) -> float:
        fit = self._warm if self._warm.n else self._first
        return fit.fixed + fit.per_event * events

    @property
    def fixed_s(self) -> float:
        """The fixed cost of a task, or at most that: while all tasks had one size, their mean time."""
        fit = self._warm if self._warm.n else self._first
        return fit.mean_s if fit.alike else fit.fixed

    def describe(self) -> dict[str, float]:
        fit = self._warm if self._warm.n else self._first
        return {"fixed_s": fit.fixed, "per_event_s": fit.per_event, "tasks": self._warm.n + self._first.n}


class Planner:
    """Which node of the merge tree the next task computes (see the module docstring)."""

    def __init__(self, grains: Grains, tree: MergeTree, target_s: float, retries: int) -> None:
        self.grains, self.tree, self.target_s, self.retries = grains, tree, target_s, retries
        self.sizes = [leaf.entrystop - leaf.entrystart for leaf in grains.leaves]
        self._events = [0, *itertools.accumulate(self.sizes)]  # prefix sums: a span's entries in O(1)
        items = grains.items
        self._item_events = [items[j].entrystop - items[j].entrystart for j in grains.owner]
        self.cap = [tree.top] * len(self.sizes)  # highest level a leaf may run at (lowered by failures)
        self.estimate = Estimate()

    def todo(self, leaves: Iterable[int]) -> Todo:
        return Todo(leaves, self.sizes)

    def events(self, span: range) -> int:
        return self._events[span.stop] - self._events[span.start]

    def next(self, todo: Todo, workers: int) -> tuple[int, int]:
        """Take the node of the next waiting leaf (its leaves leave ``todo``): ``(level, index)``."""
        leaf = todo.popleft()
        level = self._level(leaf, todo, workers)
        index = leaf // self.tree.fanin**level
        span = self.tree.span(level, index)
        todo.take(i for i in span if i != leaf)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task: node %d/%d, %d grains, %d entries; estimate %s", level, index, len(span),
                      self.events(span), self.estimate.describe() if self.estimate.ready else "none yet")
        return level, index

    def _level(self, leaf: int, todo: Todo, workers: int) -> int:
        waiting = todo.events + self.sizes[leaf]
        limit = waiting / (TAIL_TASKS_PER_WORKER * workers) if workers > 1 else math.inf
        ready = self.estimate.ready
        options = [(0, self.sizes[leaf])]
        for level in range(1, self.tree.top + 1):
            span = self.tree.span(level, leaf // self.tree.fanin**level)
            events = self.events(span)
            if (events > limit and not self._too_short_to_split(events, workers)) or (
                    not ready and events > self._item_events[leaf]):
                break  # too big for the tail; or, before any measurement, bigger than the user's item
            if not self._free(span, level, leaf, todo):
                break  # a bigger node holds this one's leaves too
            options.append((level, events))
            if ready and self.estimate.seconds(events) >= self.target_s:
                break  # bigger ones are only further from the target
        if not ready:
            return options[-1][0]

        def distance(option: tuple[int, int]) -> tuple[float, int]:  # on a tie the bigger: fewer tasks
            return abs(math.log(max(self.estimate.seconds(option[1]), 1e-6) / self.target_s)), -option[0]

        return min(options, key=distance)[0]

    def _too_short_to_split(self, events: int, workers: int) -> bool:
        """Would cutting a task of ``events`` in ``fanin`` cost more in per-task overhead (``fanin - 1``
        fixed costs shared by the workers) than it can save at the tail (about half the task)?"""
        if not self.estimate.ready:
            return False
        fixed = self.estimate.fixed_s
        return self.estimate.seconds(events) / 2 <= (self.tree.fanin - 1) * fixed / workers

    def _free(self, span: range, level: int, leaf: int, todo: Todo) -> bool:
        """All leaves waiting, of one stretch of one file, and none held below ``level`` by a failure."""
        segment = self.grains.segment
        if segment[span.start] != segment[span.stop - 1]:
            return False
        return all((i == leaf or i in todo) and self.cap[i] >= level for i in span)

    def finished(self, events: int, wall_s: float, worker: str) -> None:
        self.estimate.add(events, wall_s, worker)

    def failed(self, level: int, span: range, failures: Sequence[int]) -> None:
        """A task failed: its leaves run one level lower from now on, and alone on their last attempt."""
        for i in span:
            last = failures[i] >= self.retries
            self.cap[i] = 0 if last else min(self.cap[i], max(level - 1, 0))
