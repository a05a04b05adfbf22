"""Local worker processes (a ``ProcessPoolExecutor`` from a fork server).

The fork server imports coffea once; workers fork from it, so no worker
inherits the driver's threads (XRootD's client does not survive a fork).
A pool broken by a dead worker is replaced; the driver retries its chunks.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import context, forkserver, process, reduction, spawn, util
from multiprocessing.popen_forkserver import Popen as ForkServerPopen
from typing import Any

from casa_executors.backends.base import Backend

PRELOAD = ["coffea.processor", "coffea.nanoevents", "casa_executors.task"]


class _Popen(ForkServerPopen):
    """A fork-server child that does not re-import the user's ``__main__``.

    Tasks arrive cloudpickled, so workers never need it, and an unguarded
    script or a notebook must not run again in every worker.
    """

    def _launch(self, process_obj: process.BaseProcess) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> _Popen:
        return _Popen(process_obj)


class _Context(context.ForkServerContext):
    Process = _Process


class FuturesBackend(Backend):
    name = "futures"

    def __init__(self, workers: int | None = None) -> None:
        super().__init__(min(os.cpu_count() or 1, 4) if workers is None else workers)
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> None:
        ctx = _Context()
        ctx.set_forkserver_preload(PRELOAD)
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        forkserver._forkserver._stop()  # the fork server is ours too: leave no process behind

    def pids(self) -> list[int]:
        return list((self._pool._processes or {}).keys()) if self._pool else []

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        if self._pool is None or self._pool._broken:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._start()
        return self._pool.submit(fn, arg)
