"""Local worker processes: a ``ProcessPoolExecutor`` on a fork server of our own.

The fork server imports coffea once; workers fork from it, so no worker
inherits the driver's threads (XRootD's client does not survive a fork) and
none re-runs the user's ``__main__``. Each backend owns its fork server and
stops it (by PID if need be). A pool broken by a dead worker is replaced;
the driver retries its chunks.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import context, forkserver, process, reduction, spawn, util
from multiprocessing.popen_forkserver import Popen as ForkServerPopen
from typing import Any

from casa_executors import procs
from casa_executors.backends.base import Backend, default_workers

log = logging.getLogger(__name__)

PRELOAD = ["coffea.processor", "coffea.nanoevents", "casa_executors.task"]


class _Popen(ForkServerPopen):
    """A child of the backend's fork server that does not re-import ``__main__``.

    Tasks arrive cloudpickled, so workers never need it, and an unguarded
    script or a notebook must not run again in every worker.
    """

    def _launch(self, process_obj: _Process) -> None:
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
        self.sentinel, w = process_obj._server.connect_to_new_process(self._fds)
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(context.ForkServerProcess):
    _server: forkserver.ForkServer | None = None

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> _Popen:
        return _Popen(process_obj)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_server", None)  # stays in the parent
        return state


class _Context(context.ForkServerContext):
    def __init__(self, server: forkserver.ForkServer) -> None:
        self._server = server

    def Process(self, *args: Any, **kwargs: Any) -> _Process:
        p = _Process(*args, **kwargs)
        p._server = self._server
        return p


def stop_fork_server(server: forkserver.ForkServer, grace: float = 5.0) -> None:
    """Ask the fork server to exit; kill it by PID if it does not."""
    pid = server._forkserver_pid
    if pid is None:
        return
    os.close(server._forkserver_alive_fd)  # the fork server exits when this pipe closes
    if procs.wait_or_kill([pid], grace=grace):
        log.warning("futures: the fork server (pid %d) did not exit within %.0f s; killed", pid, grace)
    address = server._forkserver_address
    if address and not util.is_abstract_socket_namespace(address) and os.path.exists(address):
        os.unlink(address)
    server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None


class FuturesBackend(Backend):
    name = "futures"

    def __init__(self, workers: int | None = None) -> None:
        super().__init__(default_workers() if workers is None else workers)
        self._pool: ProcessPoolExecutor | None = None
        self._server: forkserver.ForkServer | None = None

    def _new_pool(self) -> None:
        if self._server is None:
            self._server = forkserver.ForkServer()
            self._server.set_forkserver_preload(PRELOAD)
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_Context(self._server))

    def _start(self) -> None:
        self._new_pool()

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        server, self._server = self._server, None
        if server is not None:
            stop_fork_server(server)

    def pids(self) -> list[int]:
        return list((self._pool._processes or {}).keys()) if self._pool else []

    @property
    def workers_local(self) -> bool:
        return True

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        if self._pool is None or self._pool._broken:
            if self._pool is not None:
                log.info("futures: a worker died and broke the pool; starting a new pool")
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._new_pool()
        return self._pool.submit(fn, arg)
