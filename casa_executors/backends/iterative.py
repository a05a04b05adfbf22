"""Runs every chunk in the calling thread, one after another."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from casa_executors.backends.base import Backend, resolved
from casa_executors.errors import ExecutorOptionError


class IterativeBackend(Backend):
    name = "iterative"
    in_process = True

    def __init__(self, workers: int = 1) -> None:
        if workers != 1:
            raise ExecutorOptionError(f"iterative runs in this thread: workers must be 1, got {workers!r}")
        super().__init__(1)

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        return resolved(fn, arg)

    def max_inflight(self) -> int:
        return 1

    def describe(self) -> str:
        return "iterative(in this process)"

    def batch_size(self, n_chunks: int, phase: str = "processing") -> int:
        return 1  # no per-task cost here: a chunk a task keeps progress and reports per chunk
