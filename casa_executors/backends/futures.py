"""Local worker processes: a loky ``ProcessPoolExecutor`` of our own.

loky starts every worker with fork + exec (``_posixsubprocess``, as
``subprocess`` does), so no worker inherits the driver's threads (XRootD's
client does not survive a fork), and its default context does not import the
user's ``__main__`` in the workers (documented: no ``if __name__ ==
"__main__":`` needed): tasks arrive cloudpickled, and an unguarded script or a
notebook does not run again in every worker. Workers import coffea when they
start. A worker that dies breaks the pool (loky's ``TerminatedWorkerError``, a
``BrokenProcessPool``); the next submit replaces it and the driver retries the
lost chunks. Workers carry a token in their environment (loky's ``env=``):
``pids()`` and ``stop()`` find them by it among this process's children.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import loky
import psutil

from casa_executors import procs
from casa_executors.backends.base import Backend, default_workers

log = logging.getLogger(__name__)

PRELOAD = ["coffea.processor", "coffea.nanoevents", "casa_executors.task"]
TOKEN_VAR = "CASA_FUTURES_POOL"
LEAK_VAR = "LOKY_MAX_MEMORY_LEAK_SIZE"  # bytes a loky worker may grow by before loky restarts it
NO_LEAK_GUARD = "1e15"
STOP_GRACE_S = 5.0  # for a worker still there once the pool is shut down


def preload() -> None:
    """A worker's initializer: the modules every task needs, imported before the first task."""
    for name in PRELOAD:
        importlib.import_module(name)
    # a worker exits through the interpreter's full teardown (fork + exec, not a fork server's os._exit):
    # frozen at exit, its heap (coffea's modules) is skipped by the teardown's cyclic collections
    atexit.register(gc.freeze)


class FuturesBackend(Backend):
    name = "futures"

    def __init__(self, workers: int | None = None) -> None:
        super().__init__(default_workers() if workers is None else workers)
        self._pool: loky.ProcessPoolExecutor | None = None
        self._token = ""

    def _new_pool(self) -> None:
        if not self._token:
            self._token = uuid.uuid4().hex
        # workers keep files and trees between tasks on purpose: loky's leak guard (a worker grown by 300 MB is
        # restarted, importing coffea again) is set out of reach unless the user set it
        env = {TOKEN_VAR: self._token, LEAK_VAR: os.environ.get(LEAK_VAR, NO_LEAK_GUARD)}
        # timeout=None: idle workers stay up as long as the pool (loky's default would end them)
        self._pool = loky.ProcessPoolExecutor(max_workers=self.workers, timeout=None, initializer=preload, env=env)

    def _start(self) -> None:
        self._token = uuid.uuid4().hex
        self._new_pool()

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # the workers exit once the tasks already handed to them are done
        left = self._running_workers()  # none, unless a worker hangs or a replaced pool's are still going
        if left:
            killed = procs.wait_or_kill(left, grace=STOP_GRACE_S)
            if killed:
                log.warning("futures: workers %s did not exit within %.0f s; killed", killed, STOP_GRACE_S)
        self._token = ""

    def _running_workers(self) -> list[psutil.Process]:
        """This backend's running workers: children of this process with our token."""
        if not self._token:
            return []
        mine = procs.with_environ(TOKEN_VAR, self._token, among=procs.children())
        return [p for p in mine if procs.alive(p.pid)]

    def pids(self) -> list[int]:
        return sorted(p.pid for p in self._running_workers())

    @property
    def workers_local(self) -> bool:
        return True

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        if self._pool is None:
            self._new_pool()
        try:
            return self._pool.submit(fn, arg)
        except BrokenProcessPool:
            log.info("futures: a worker died and broke the pool; starting a new pool")
            self._pool.shutdown(wait=False)  # its manager thread ends and reaps the workers
            self._new_pool()
            return self._pool.submit(fn, arg)
