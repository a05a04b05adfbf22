"""Work Queue: a manager process of our own; tasks run on ``work_queue_worker`` processes.

A task is a plain Work Queue ``Task`` with ``specify_cores(1)`` whose inputs are
``in.pkl`` (the pickled call) and the two cached client scripts of
``worker.py``, and whose output is ``out.pkl``. A fresh interpreter costs ~2 s
of CPU before its first chunk is done (importing coffea, then warming up), so
with ``warm=True`` (the default) tasks hand their work to a per-worker server
process that stays warm between tasks: through a bash client (a few ms, no
Python start) once the worker's server is up, through a ``python -S`` client
that starts it before that (see ``worker.py``). ``warm=False`` runs every task
in a fresh interpreter. Several chunks ride in one task (``batch_size``).
``workers=N`` starts N local ``work_queue_worker`` processes
(``local_workers.py``), stops them and everything left in their sessions by
PID; ``port=`` alone waits for workers started elsewhere
(``wait_for_workers``); ``submit="slurm"`` has ``work_queue_factory`` submit
them as batch jobs (``slurm.py``).

The Work Queue manager runs in a process of its own (``manager.py``, as Parsl
runs it), started with ``subprocess`` (fork and exec: none of this process's
threads is copied) and stopped by PID at the end; this process writes inputs,
reads outputs and settles futures, and a reader thread takes the manager's
messages (``channel.py``). Only Work Queue's documented Python API is used:
its blocking ``wait`` holds the manager process's GIL, not ours.

Workers authenticate with Work Queue's password: ``password=`` or
``password_file=`` (a file of yours), else a password made for the run
(``secrets``), written mode 0600 in the private staging folder and handed to
the workers started here or submitted to Slurm (``password_file`` while
started, for workers you start yourself with ``work_queue_worker -P FILE``). A
worker without it is refused. The manager listens on every interface (cctools
has no option for the address: see ``manager.py``); ``host=`` is the address
the workers we start are told to dial.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import logging
import os
import pickle
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from casa_executors import procs
from casa_executors.backends.base import Backend, default_workers, plural, worker_pythonpath
from casa_executors.backends.scaling import DEFAULT_WORKER_TIMEOUT, check_adapt, check_worker_timeout
from casa_executors.backends.workqueue.channel import Channel
from casa_executors.backends.workqueue.discovery import import_work_queue
from casa_executors.backends.workqueue.local_workers import LocalWorkers
from casa_executors.backends.workqueue.slurm import BatchWorkers, batch_workers, manager_address
from casa_executors.backends.workqueue.worker import NO_SERVER, SHELL_CLIENT, server_key
from casa_executors.errors import BackendUnavailable, ExecutorOptionError, WorkerLost

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MANAGER_SCRIPT = str(Path(__file__).resolve().with_name("manager.py"))
WORKER_SCRIPT = str(Path(__file__).resolve().with_name("worker.py"))
WORKER_SCRIPT_NAME = "casa_wq_worker.py"  # its name in the task's sandbox and the worker's cache
CLIENT_SCRIPT_NAME = "casa_wq_client.sh"  # worker.SHELL_CLIENT, the fast path to a warm server
MANAGER_START_S = 60  # how long the manager process may take to listen
TEND_S = 0.5  # how often the reader thread looks at the local workers when no message comes


@dataclass
class _Pending:
    future: Future
    directory: Path
def task_command(python: str, warm: bool) -> str:
    """The shell command of a task (Work Queue runs it with ``/bin/sh -c`` in the task's sandbox).

    Warm: the bash client hands the task to its slot's server without starting Python; only when it
    finds no live server (or no bash) does a Python client (``-S``: no site, ~4x faster to start) run,
    which starts one. Cold: a full interpreter runs the task itself.
    """
    py = shlex.quote(python)
    # the worker's PID: a client whose worker died meanwhile (it was adopted) then starts nothing
    worker = "export CASA_WQ_WORKER_PID=$PPID; exec 2>&1; "
    if not warm:
        return f"{worker}exec {py} {WORKER_SCRIPT_NAME} in.pkl out.pkl"
    return (f'{worker}bash {CLIENT_SCRIPT_NAME} "$PPID" in.pkl out.pkl; s=$?; '
            f'[ $s = {NO_SERVER} ] || [ $s = 127 ] || exit $s; exec {py} -S {WORKER_SCRIPT_NAME} in.pkl out.pkl')


def _settle(future: Future, result: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except InvalidStateError:  # cancelled by the driver meanwhile
        pass



def write_private(path: Path, text: str) -> None:
    """Create ``path`` (it must not exist) readable by its owner only (0600), with ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class WorkQueueBackend(Backend):
    name = "workqueue"
    honours_priority = True  # Work Queue's specify_priority, set by the manager (manager.py)

    def __init__(
        self,
        workers: int | None = None,
        port: int | None = None,
        python: str | None = None,
        name: str | None = None,
        password: str | None = None,
        password_file: str | os.PathLike | None = None,
        host: str = LOOPBACK,
        warm: bool = True,
        submit: str | None = None,
        adapt: tuple[int, int] | None = None,
        batch_options: str | None = None,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        super().__init__(workers)
        # submit="slurm": workers are batch jobs that work_queue_factory submits (slurm.py)
        self._batch: BatchWorkers | None = batch_workers(submit, workers, check_adapt("workqueue", adapt),
                                                         batch_options, check_worker_timeout("workqueue",
                                                                                             worker_timeout))
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
            raise ExecutorOptionError(f"workqueue: port must be a TCP port number (0 picks one), got {port!r}")
        for opt, value in (("python", python), ("name", name), ("password", password)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ExecutorOptionError(f"workqueue: {opt} must be a non-empty string, got {value!r}")
        if password is not None and password_file is not None:
            raise ExecutorOptionError("workqueue: give password= or password_file=, not both")
        if password_file is not None:
            if not isinstance(password_file, (str, os.PathLike)) or not os.path.isfile(password_file):
                raise ExecutorOptionError(f"workqueue: password_file must be a readable file, got {password_file!r}")
            password_file = Path(password_file).resolve()
        try:
            ipaddress.IPv4Address(host)
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise ExecutorOptionError(f"workqueue: host must be an IPv4 address (the one workers dial), "
                                      f"got {host!r}") from None
        if not isinstance(warm, bool):
            raise ExecutorOptionError(f"workqueue: warm must be True or False, got {warm!r}")
        if workers is None and port is None and self._batch is None:
            self._workers = default_workers()
        self._local_count = 0 if self._batch is not None else self._workers or 0
        self._port_opt, self._host = port, host
        self._python, self._project = python or sys.executable, name
        self._password, self._user_password_file = password, password_file
        self._warm = warm
        self._port = 0
        self._staging: Path | None = None
        self._password_file: Path | None = None
        self._manager: subprocess.Popen | None = None
        self._chan: Channel | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # _pending, and the channel's life
        self._pending: dict[int, _Pending] = {}  # by the backend's task key
        self._keys = itertools.count(1)
        self._local: LocalWorkers | None = None
        self._connected = self._lost_workers = 0
        self._failure: str | None = None
        self.resent = 0  # tasks Work Queue would have re-sent after losing their worker (we failed them)
        self.requeued = 0  # tasks a worker declined, re-sent by Work Queue (they had not run)
        self.sent = 0  # tasks handed to Work Queue
        self.empty_waits = 0  # the manager's waits in Work Queue with no task in it (manager.py)
        self.ready = 0  # tasks in Work Queue waiting for a worker, at the manager's last look

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import_work_queue()
        except ImportError as exc:
            return f"the workqueue backend needs Work Queue's Python module ({exc})"
        if shutil.which("work_queue_worker") is None:
            return "the workqueue backend needs work_queue_worker on PATH (Debian package coop-computing-tools)"
        return None

    # -- lifetime ----------------------------------------------------------------
    def _start(self) -> None:
        try:
            import_work_queue()
        except ImportError as exc:
            raise BackendUnavailable(f"workqueue: {exc}") from exc
        if self._local_count and shutil.which("work_queue_worker") is None:
            raise BackendUnavailable("workqueue: work_queue_worker is not on PATH (coop-computing-tools)")
        self._failure, self._connected, self._lost_workers = None, 0, 0
        self._staging = Path(tempfile.mkdtemp(prefix="casa-wq-"))  # mode 700
        try:
            self._password_file = self._user_password_file or self._staging / "password"
            if self._user_password_file is None:
                write_private(self._password_file, self._password or secrets.token_urlsafe(32))
            client = self._staging / CLIENT_SCRIPT_NAME
            client.write_text(SHELL_CLIENT)
            pythonpath = worker_pythonpath()
            config = {
                "port": self._port_opt or 0, "name": self._project, "password_file": str(self._password_file),
                "command": task_command(self._python, self._warm), "warm": self._warm,
                "worker_script": WORKER_SCRIPT, "worker_script_name": WORKER_SCRIPT_NAME,
                "client": str(client), "client_name": CLIENT_SCRIPT_NAME,
                "key": server_key(self._python, pythonpath), "pythonpath": pythonpath,
                "sys_path": [p for p in sys.path if p],
                "expect": self._local_count or (self._batch.bounds[0] if self._batch is not None else 1),
            }
            if self._batch is not None:  # adapt=: a catalog for the factory to read our queue from
                config.update(self._batch.manager_config(self._host, self._staging, self._project))
            self._start_manager(config)
            if self._local_count:
                self._local = LocalWorkers(self._local_count, self._host if self._host != "0.0.0.0" else LOOPBACK,
                                           self._port, self._staging, self._password_file)
                self._local.start()
            if self._batch is not None:
                self._batch.start(manager_address(self._host), self._port, self._staging, self._password_file)
        except BaseException:
            self._teardown()
            raise
        self._reader = threading.Thread(target=self._read, args=(self._chan, self._manager),
                                        name="casa-workqueue", daemon=True)
        self._reader.start()
        atexit.register(self.stop)
        if self._batch is not None and self._batch.at_start:
            try:
                self._batch.wait_first(lambda: self._connected)
            except BaseException:
                self._stop()
                raise

    def _start_manager(self, config: dict[str, Any]) -> None:
        """Start ``manager.py`` (fork and exec, its own session: the terminal's Ctrl-C is ours to handle)
        and wait until it listens.

        ``-S`` (no ``site``), with this process's ``sys.path`` after the standard library's: with ``site``,
        setuptools' ``distutils`` shim made Work Queue's ``import distutils.spawn`` import ``pkg_resources``,
        1.5 s of the manager's start here (``-X importtime``)."""
        ours, theirs = socket.socketpair()
        try:
            with open(self._staging / "manager.log", "wb") as out:
                self._manager = subprocess.Popen(
                    [sys.executable, "-S", MANAGER_SCRIPT, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            theirs.close()
        self._chan = Channel(ours)
        self._chan.send("config", config)
        reply: tuple[Any, ...] = ("error", f"workqueue: the manager process did not start within "
                                           f"{MANAGER_START_S} s")
        try:
            if self._chan.poll(MANAGER_START_S):
                reply = self._chan.recv()
        except EOFError:
            reply = ("error", f"workqueue: the manager process exited: {self._manager_log()}")
        if reply[0] != "ready":
            raise BackendUnavailable(reply[1])
        self._port = reply[1]

    def _manager_log(self) -> str:
        try:
            lines = (self._staging / "manager.log").read_text(errors="replace").strip().splitlines()
        except (OSError, TypeError):
            return ""
        return " | ".join(lines[-3:])

    def _stop(self) -> None:
        atexit.unregister(self.stop)
        self._teardown()

    def _teardown(self) -> None:
        """Stop the manager process by PID, fail what is left, stop local workers and what they left, by PID."""
        with self._lock:
            chan, self._chan = self._chan, None
        if chan is not None:
            with contextlib.suppress(OSError):
                chan.send("stop")
        manager, self._manager = self._manager, None
        if manager is not None and not _exited(manager, 10):
            procs.terminate([manager], grace=10)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=30)  # it sees the manager's end of the channel close
        if chan is not None:
            chan.close()
        self._fail_all(self._failure or "workqueue: the backend was stopped")
        if self._local is not None:
            self._local.stop()
            self._local = None
        if self._batch is not None:
            self._batch.stop()  # the factory, and the jobs it submitted
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._password_file = None

    def _fail_all(self, why: str) -> None:
        """Fail every future not settled yet (and tell the manager to drop their tasks)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            chan = self._chan
        for key, p in pending.items():
            if chan is not None:
                with contextlib.suppress(OSError):
                    chan.send("cancel", key)
            _settle(p.future, exc=WorkerLost(why))
            shutil.rmtree(p.directory, ignore_errors=True)

    # -- the reader thread: the manager's messages -------------------------------------------------
    def _read(self, chan: Channel, manager: subprocess.Popen) -> None:
        try:
            while True:
                if chan.poll(TEND_S):
                    try:
                        message = chan.recv()
                    except (EOFError, OSError):
                        break
                    getattr(self, "_on_" + message[0])(*message[1:])
                self._tend_local_workers()
        except BaseException as exc:  # never leave the driver waiting on futures nobody settles
            self._failure = f"workqueue: the reader thread failed: {exc!r}"
            raise
        finally:
            if self._chan is chan:  # not stopped by us: the manager process ended
                code = manager.poll()
                self._failure = (f"workqueue: the manager process ended (exit code {code}): "
                                 f"{self._manager_log()}")
                log.error("%s", self._failure)
            self._fail_all(self._failure or "workqueue: the backend was stopped")

    def _take(self, key: int) -> _Pending | None:
        with self._lock:
            return self._pending.pop(key, None)

    def _on_done(self, key: int, why: str | None) -> None:
        p = self._take(key)
        if p is None:
            return
        if why is not None:
            _settle(p.future, exc=WorkerLost(why))
        else:
            try:
                _settle(p.future, pickle.loads((p.directory / "out.pkl").read_bytes()))
            except Exception as exc:
                _settle(p.future, exc=WorkerLost(f"workqueue: task {key} wrote unreadable output: {exc!r}"))
        shutil.rmtree(p.directory, ignore_errors=True)

    def _on_lost(self, key: int, why: str) -> None:
        p = self._take(key)
        if p is None:
            return
        self.resent += 1
        _settle(p.future, exc=WorkerLost(why))
        shutil.rmtree(p.directory, ignore_errors=True)

    def _on_stats(self, connected: int, lost_workers: int, requeued: int, empty_waits: int, ready: int) -> None:
        if lost_workers > self._lost_workers:
            log.info("workqueue: Work Queue lost a worker (%d lost so far)", lost_workers)
        self._connected, self._lost_workers, self.requeued = connected, lost_workers, requeued
        self.empty_waits, self.ready = empty_waits, ready

    def _tend_local_workers(self) -> None:
        local = self._local
        if local is None or self._chan is None or not local.tend():
            return
        if local.all_exited() and self._connected == 0 and self._port_opt is None:
            self._fail_all(f"workqueue: every local work_queue_worker has exited ({local.last_words()})")

    # -- what the driver uses ------------------------------------------------------
    def submit(self, fn: Callable[[Any], Any], arg: Any, priority: int = 0) -> Future:
        if self._staging is None or self._chan is None:
            raise BackendUnavailable("workqueue: the backend is not started")
        if self._reader is None or not self._reader.is_alive():
            raise WorkerLost(self._failure or "workqueue: the manager process has ended")
        key = next(self._keys)
        directory = self._staging / f"task-{key}"
        directory.mkdir()
        (directory / "in.pkl").write_bytes(cloudpickle.dumps((fn, arg), protocol=pickle.HIGHEST_PROTOCOL))
        future: Future = Future()
        with self._lock:
            chan = self._chan
            if chan is None:
                raise BackendUnavailable("workqueue: the backend was stopped")
            self._pending[key] = _Pending(future, directory)
        future.add_done_callback(lambda f: f.cancelled() and self._cancelled(key))
        try:
            chan.send("submit", key, str(directory), priority)
        except OSError as exc:
            self._take(key)
            raise WorkerLost(self._failure or f"workqueue: the manager process has gone ({exc})") from exc
        self.sent += 1
        if self._batch is not None:
            self._batch.wait_first(lambda: self._connected)  # adapt=(0, n): the work asks for the first worker
        return future

    def _cancelled(self, key: int) -> None:
        """The driver cancelled the future: take the task out of Work Queue."""
        p = self._take(key)
        if p is None:
            return
        chan = self._chan
        if chan is not None:
            with contextlib.suppress(OSError):
                chan.send("cancel", key)
        shutil.rmtree(p.directory, ignore_errors=True)

    @property
    def workers(self) -> int:
        """Local workers, or the workers connected now (port= with workers started elsewhere)."""
        planned = self._batch.bounds[1] if self._batch is not None else 0  # what batch workers may reach
        return max(self._local_count, self._connected, planned) or 1

    @property
    def port(self) -> int:
        return self._port

    @property
    def staging_dir(self) -> Path | None:
        """Where task inputs and outputs wait on this side (mode 700), while started."""
        return self._staging

    @property
    def password_file(self) -> Path | None:
        """The file workers must give (``work_queue_worker -P FILE``), while started."""
        return self._password_file

    @property
    def manager_pid(self) -> int | None:
        """The PID of the Work Queue manager process, while started."""
        manager = self._manager
        return manager.pid if manager is not None else None

    def wait_for_workers(self, n: int, timeout: float = 60) -> int:
        """Wait until ``n`` workers are connected (or ``timeout`` s); return how many are."""
        chan = self._chan
        if chan is not None:
            with contextlib.suppress(OSError):
                chan.send("expect", n)  # the manager lets workers in while it has no task
        deadline = time.time() + timeout
        while self._connected < n and time.time() < deadline and self._reader is not None:
            time.sleep(0.1)
        return self._connected

    def worker_pids(self) -> list[int]:
        """PIDs of the local work_queue_worker processes that are running."""
        local = self._local
        return local.pids() if local is not None else []

    @property
    def workers_local(self) -> bool:
        """Only the local work_queue_workers we start (no port= for others, no batch jobs)."""
        return self._batch is None and self._port_opt is None

    def describe(self) -> str:
        """``workqueue(2 local workers, port 9123)``, ``workqueue(up to 2 workers, Slurm jobs, adapt=(0, 2),
        port 9123)``, ``workqueue(3 workers connected, port 9123)`` (workers started elsewhere, port=)."""
        port = f"port {self._port or self._port_opt or 0}"
        if self._batch is not None:
            lo, hi = self._batch.bounds
            adapt = f", adapt={self._batch.adapt}" if self._batch.adapt else ""
            size = f"up to {plural(hi, 'worker')}" if lo != hi else plural(hi, "worker")
            return f"workqueue({size}, {self._batch.kind.capitalize()} jobs{adapt}, {port})"
        if self._local_count:
            return f"workqueue({plural(self._local_count, 'local worker')}, {port})"
        return f"workqueue({plural(self._connected, 'worker')} connected, {port})"


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True
