"""The fixed merge tree, and the merge functions that run on workers.

Chunk ``i`` is leaf ``i``; every ``fanin`` consecutive nodes of a level merge
into one node of the next level once all of them are in, left to right. The
result does not depend on which chunk finished first, so every backend — and
every place a merge runs (the driver, a worker, a mix after a resume) — gives
the same bits, and column accumulators keep chunk order.

:class:`MergeTree` is only the bookkeeping: which nodes are in, which groups
are ready. Where outputs live and who merges a ready group is the business of
:mod:`casa_executors.outputs`. A group with at most one output (its other
children failed, or the last, short group of a level) is not merged at all:
that output stands for the parent as it is, exactly as a fold of one value.

A node is *complete* when every chunk below it succeeded: only complete nodes
are checkpoints (``nodes/<level>/<index>`` in a store), because a resumed run
must not take a node with a failed chunk inside for a finished one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from coffea.processor.accumulator import iadd

from casa_executors.store import NodeCorrupt, NodeMissing, Store, decode, encode


def node_key(level: int, index: int, complete: bool = True) -> str:
    """Where a node lives in a store: complete nodes are checkpoints, the others scratch."""
    return f"{'nodes' if complete else 'partial'}/{level}/{index}"


@dataclass
class Node:
    level: int
    index: int
    handle: Any  # the output itself, a store key, or an engine future; None: nothing (all failed)
    complete: bool  # every chunk below succeeded


@dataclass
class Group:
    """A node whose children are all in: merge ``children`` (in order) into it."""

    level: int
    index: int
    children: list[Node]
    attempts: int = 0

    @property
    def complete(self) -> bool:
        return all(c.complete for c in self.children)


class MergeTree:
    def __init__(self, n: int, fanin: int = 8) -> None:
        if fanin < 2:
            raise ValueError("merge fan-in must be at least 2")
        self.fanin = fanin
        self.sizes = [n]
        while self.sizes[-1] > 1:
            self.sizes.append(math.ceil(self.sizes[-1] / fanin))
        self.top = len(self.sizes) - 1
        self._held: list[dict[int, Node]] = [{} for _ in self.sizes]
        self._count: list[dict[int, int]] = [{} for _ in self.sizes]  # per level: parent -> children held
        self.root: Node | None = None

    # -- shape ---------------------------------------------------------------------
    def children(self, level: int, index: int) -> range:
        return range(index * self.fanin, min((index + 1) * self.fanin, self.sizes[level - 1]))

    def span(self, level: int, index: int) -> range:
        """The chunks below a node."""
        width = self.fanin**level
        return range(index * width, min((index + 1) * width, self.sizes[0]))

    # -- state ---------------------------------------------------------------------
    @property
    def held(self) -> int:
        return sum(1 for level in self._held for v in level.values() if v.handle is not None)

    def held_nodes(self) -> list[Node]:
        return [n for level in self._held for n in level.values()]

    def put(self, node: Node) -> list[Group]:
        """Take in a finished node; returns the groups it made ready (to merge, in any order)."""
        ready: list[Group] = []
        while True:
            if node.level == self.top:
                self.root = node
                return ready
            nodes = self._held[node.level]
            if node.index in nodes:
                raise ValueError(f"node {node.level}/{node.index} (chunk {node.index}) merged twice")
            nodes[node.index] = node
            parent = node.index // self.fanin
            members = self.children(node.level + 1, parent)
            count = self._count[node.level]
            held = count.get(parent, 0) + 1
            if held < len(members):  # counted, not looked up: a run holds up to millions of nodes
                count[parent] = held
                return ready
            count.pop(parent, None)
            group = Group(node.level + 1, parent, [nodes.pop(m) for m in members])
            present = [c for c in group.children if c.handle is not None]
            if len(present) >= 2:
                ready.append(group)
                return ready
            # nothing to merge: the one output (or none) stands for the parent as it is
            node = Node(group.level, group.index, present[0].handle if present else None, group.complete)

    def drop(self, level: int, index: int) -> Node | None:
        """Forget a node held in the tree (its output was lost): it can be put again."""
        node = self._held[level].pop(index, None) if level < self.top else None
        if node is not None:
            self._count[level][index // self.fanin] -= 1
        return node

    def put_back(self, nodes: list[Node]) -> None:
        """Children of a group whose merge could not run (a sibling was lost): hold them again."""
        for n in nodes:
            if n.index not in self._held[n.level]:
                self._held[n.level][n.index] = n
                count = self._count[n.level]
                count[n.index // self.fanin] = count.get(n.index // self.fanin, 0) + 1


def fold(values: Any) -> Any:
    """Left fold with coffea's ``iadd``, skipping None: ``accumulate(values[1:], values[0])``."""
    out = None
    for v in values:
        if v is None:
            continue
        out = v if out is None else iadd(out, v)
    return out


class TreeMerger:
    """The tree merged in this process, as outputs arrive (the driver's own merge)."""

    def __init__(self, n: int, fanin: int = 8) -> None:
        self.tree = MergeTree(n, fanin)
        self.sizes = self.tree.sizes
        self.held_peak = 0
        self._done = n == 0
        self.result: Any = None

    @property
    def held(self) -> int:
        return self.tree.held

    @property
    def done(self) -> bool:
        return self._done

    def add(self, index: int, output: Any) -> None:
        """Output of chunk ``index``; ``None`` for a chunk that gave nothing (failed)."""
        self.put(Node(0, index, output, output is not None))

    def put(self, node: Node) -> None:
        todo = self.tree.put(node)
        self.held_peak = max(self.held_peak, self.tree.held)
        while todo:
            g = todo.pop()
            todo += self.tree.put(Node(g.level, g.index, fold(c.handle for c in g.children), g.complete))
        if self.tree.root is not None:
            self.result, self._done = self.tree.root.handle, True

    def partial(self) -> Any:
        """Everything merged so far (for an aborted run), in chunk order."""
        if self._done:
            return self.result
        held = sorted(self.tree.held_nodes(), key=lambda n: n.index * self.tree.fanin**n.level)
        return fold(n.handle for n in held)


# -- merges on a worker ------------------------------------------------------------------------------


class MergeFailed(RuntimeError):
    """Adding outputs together failed (incompatible outputs): not the engine's fault, not retried."""


@dataclass
class StoredMerge:
    """Merge stored children into a stored node (a task on any engine, or in the driver)."""

    store: Store
    children: list[str | None]  # keys, in order; None: a child with no output
    key: str  # where the node goes
    delete: list[str] = field(default_factory=list)  # consumed children to remove once the node is written
    compression: int | None = 1
    keep: bool = False  # return the node too (merged in the driver: the root need not be read back)


@dataclass
class MergeResult:
    key: str = ""
    nbytes: int = 0
    read_bytes: int = 0  # of the children
    value: Any = None  # the node itself, with StoredMerge.keep
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, why) of children missing or corrupt
    error: Any = None  # task.ErrorInfo when the outputs could not be added
    wall_s: float = 0.0


def merge_stored(task: StoredMerge) -> MergeResult:
    """Read the children one by one (checking each), fold, write the node, remove consumed children.

    A missing or corrupt child is reported, not raised: the driver recomputes what
    it stood for. Nothing is written or removed then.
    """
    from casa_executors.task import ErrorInfo

    t0 = time.perf_counter()
    result = MergeResult(key=task.key)
    out = None
    for key in task.children:
        if key is None:
            continue
        try:
            payload = task.store.get(key)
            result.read_bytes += len(payload)
            value = decode(payload)
        except (NodeMissing, NodeCorrupt) as exc:
            result.bad.append((key, str(exc)))
            continue
        if result.bad or result.error is not None:
            continue  # only checking the rest
        try:
            out = value if out is None else iadd(out, value)
        except Exception as exc:
            result.error = ErrorInfo.capture(MergeFailed(f"cannot add the output in {key}: {exc!r}"))
    if not result.bad and result.error is None:
        result.nbytes = task.store.put_output(task.key, out, task.compression)
        task.store.remove(task.delete)
        if task.keep:
            result.value = out
    result.wall_s = time.perf_counter() - t0
    return result


def held_value(child: Any) -> Any:
    """A child as a merge task gets it: a batch's (results, position) or an encoded node, decoded."""
    if isinstance(child, tuple):  # (the batch's results, position): a chunk output
        results, position = child
        child = results[position].output
    return decode(child) if isinstance(child, bytes) else child


def merge_held(arg: tuple[int | None, list[Any]]) -> Any:
    """Merge outputs an engine holds in memory (dask futures resolved into the arguments).

    Returns the node, encoded as the chunk outputs are; raises :class:`MergeFailed`
    when the outputs cannot be added (anything else is the engine's trouble).
    """
    compression, children = arg
    out = add_outputs(held_value(child) for child in children if child is not None)
    return encode(out, compression) if compression is not None else out


def add_outputs(values: Any) -> Any:
    """Left fold with coffea's ``iadd``, as :func:`fold`; :class:`MergeFailed` for outputs that cannot be added."""
    out = None
    for value in values:
        try:
            out = value if out is None else iadd(out, value)
        except Exception as exc:
            raise MergeFailed(f"cannot add chunk outputs: {exc!r}") from None
    return out
