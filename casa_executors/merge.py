"""Merge chunk outputs in a fixed tree, as they arrive.

Chunk ``i`` is leaf ``i``; every ``fanin`` consecutive nodes of a level merge
into one node of the next level as soon as all of them are in. The result is
independent of completion order, so every backend gives the same bits, and
column accumulators keep chunk order. The driver holds at most about
``fanin - 1`` nodes per level for each chunk still running.
"""

from __future__ import annotations

import math
from typing import Any

from coffea.processor import accumulate


class TreeMerger:
    def __init__(self, n: int, fanin: int = 8) -> None:
        if fanin < 2:
            raise ValueError("merge fan-in must be at least 2")
        self.fanin = fanin
        self.sizes = [n]
        while self.sizes[-1] > 1:
            self.sizes.append(math.ceil(self.sizes[-1] / fanin))
        self._nodes: list[dict[int, Any]] = [{} for _ in self.sizes]
        self._done = n == 0
        self.result: Any = None
        self.held_peak = 0

    @property
    def held(self) -> int:
        return sum(1 for level in self._nodes for v in level.values() if v is not None)

    def add(self, index: int, output: Any) -> None:
        """Output of chunk ``index``; ``None`` for a chunk that gave nothing (failed)."""
        self._put(0, index, output)
        self.held_peak = max(self.held_peak, self.held)

    def _put(self, level: int, index: int, value: Any) -> None:
        if self.sizes[level] == 1:
            self.result, self._done = value, True
            return
        nodes = self._nodes[level]
        if index in nodes:
            raise ValueError(f"chunk {index} merged twice")
        nodes[index] = value
        group = index // self.fanin
        members = range(group * self.fanin, min((group + 1) * self.fanin, self.sizes[level]))
        if all(m in nodes for m in members):
            values = [nodes.pop(m) for m in members]
            self._put(level + 1, group, _merge(values))

    @property
    def done(self) -> bool:
        return self._done

    def partial(self) -> Any:
        """Everything merged so far (for an aborted run), in index order."""
        if self._done:
            return self.result
        held = [
            (i * self.fanin**level, v) for level, nodes in enumerate(self._nodes) for i, v in nodes.items()
        ]
        return _merge([v for _, v in sorted(held, key=lambda kv: kv[0])])


def _merge(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return accumulate(values[1:], values[0])
