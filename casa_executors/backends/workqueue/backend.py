"""Work Queue: the manager runs in this process; tasks run on ``work_queue_worker`` processes.

A task is a plain Work Queue ``Task`` with ``specify_cores(1)`` whose inputs are
``in.pkl`` (the pickled call) and the two cached client scripts of
``worker.py``, and whose output is ``out.pkl``. A fresh interpreter costs ~2 s
of CPU before its first chunk is done (importing coffea, then warming up), so
with ``warm=True`` (the default) tasks hand their work to a per-worker server
process that stays warm between tasks: through a bash client (a few ms, no
Python start) once the worker's server is up, through a ``python -S`` client
that starts it before that (see ``worker.py``). ``warm=False`` runs every task
in a fresh interpreter. Several chunks ride in one task (``batch_size``: about
four tasks per worker). ``workers=N`` starts N local
``work_queue_worker`` processes (``local_workers.py``), stops them and
everything left in their sessions by PID; ``port=`` alone waits for workers
started elsewhere (``wait_for_workers``); ``submit="slurm"`` has
``work_queue_factory`` submit them as batch jobs (``slurm.py``).

Every queue call happens in one manager thread. Work Queue's wait lasts until a
task finishes or the next whole second, so a task the driver submits meanwhile
would wait for it with a worker idle; a byte written to a pipe that the wait
polls ends it at once (``native.Waiter``; not with ``name=``, see there).

Retries belong to the driver. Work Queue silently re-sends a task whose worker
was lost (``specify_max_retries`` does not change that in cctools 9.9), so a
task that goes back to the queue (or is dispatched again) while Work Queue
counts a lost worker is cancelled and fails with :class:`WorkerLost`: the
driver retries it and the report counts the attempt (``resent`` counts them
here too). A task a worker merely declined (FORSAKEN: it found fewer
resources than it had announced) goes back without a lost worker; Work Queue
re-sends those itself, nothing ran, and ``requeued`` counts them.

The SWIG bindings hold the GIL while they wait and listen on every interface:
``native.py`` works around both (``host=``, 127.0.0.1 by default, is the one
address the manager listens on; ``host="0.0.0.0"`` for workers on other machines).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import logging
import os
import pickle
import queue
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from casa_executors.backends.base import Backend, default_workers, worker_pythonpath
from casa_executors.backends.scaling import DEFAULT_WORKER_TIMEOUT, check_adapt, check_worker_timeout
from casa_executors.backends.workqueue.discovery import import_work_queue
from casa_executors.backends.workqueue.local_workers import LocalWorkers
from casa_executors.backends.workqueue.native import LOOPBACK, Waiter, bound_to, task_address
from casa_executors.backends.workqueue.slurm import BatchWorkers, batch_workers, manager_address
from casa_executors.backends.workqueue.worker import NO_SERVER, SHELL_CLIENT, server_key
from casa_executors.errors import BackendUnavailable, ExecutorOptionError, WorkerLost

log = logging.getLogger(__name__)

WORKER_SCRIPT = str(Path(__file__).resolve().with_name("worker.py"))
WORKER_SCRIPT_NAME = "casa_wq_worker.py"  # its name in the task's sandbox and the worker's cache
CLIENT_SCRIPT_NAME = "casa_wq_client.sh"  # worker.SHELL_CLIENT, the fast path to a warm server


@dataclass
class _Task:
    task: Any  # the Work Queue Task
    future: Future
    directory: Path
    back: int = 0  # the last dispatch after which it was seen back in the queue


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


class WorkQueueBackend(Backend):
    name = "workqueue"

    def __init__(
        self,
        workers: int | None = None,
        port: int | None = None,
        python: str | None = None,
        name: str | None = None,
        password: str | None = None,
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
        try:
            ipaddress.IPv4Address(host)
        except (ipaddress.AddressValueError, ValueError, TypeError):
            raise ExecutorOptionError(f"workqueue: host must be an IPv4 address to listen on, got {host!r}") from None
        if not isinstance(warm, bool):
            raise ExecutorOptionError(f"workqueue: warm must be True or False, got {warm!r}")
        if workers is None and port is None and self._batch is None:
            self._workers = default_workers()
        self._local_count = 0 if self._batch is not None else self._workers or 0
        self._port_opt, self._host = port, host
        self._python, self._project, self._password = python or sys.executable, name, password
        self._warm = warm
        self._wq: ModuleType | None = None
        self._q: Any = None
        self._port = 0
        self._staging: Path | None = None
        self._wait: Waiter | None = None
        self._wake_r = self._wake_w = -1  # the pipe that wakes the manager thread's wait
        self._wake_lock = threading.Lock()
        self._client = Path()  # the shell client's file, in the staging folder while started
        self._key = ""  # which warm servers this backend's tasks use (worker.server_key)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._keys = itertools.count(1)
        self._tasks: dict[int, _Task] = {}  # by Work Queue task id
        self._local: LocalWorkers | None = None
        self._connected = 0
        self._lost_workers = 0
        self._ready = 0  # tasks waiting in Work Queue for a worker, at the last look
        self._failure: str | None = None
        self.resent = 0  # tasks Work Queue would have re-sent after losing their worker (we failed them)
        self.requeued = 0  # tasks a worker declined, re-sent by Work Queue (they had not run)
        self.sent = 0  # tasks handed to Work Queue

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
            wq = import_work_queue()
        except ImportError as exc:
            raise BackendUnavailable(f"workqueue: {exc}") from exc
        if self._local_count and shutil.which("work_queue_worker") is None:
            raise BackendUnavailable("workqueue: work_queue_worker is not on PATH (coop-computing-tools)")
        self._wq, self._closing, self._failure = wq, threading.Event(), None
        self._staging = Path(tempfile.mkdtemp(prefix="casa-wq-"))
        try:
            with bound_to(wq, self._host):
                try:
                    self._q = wq.WorkQueue(port=self._port_opt or 0, name=self._project)
                except Exception as exc:  # the bindings raise a bare Exception
                    raise BackendUnavailable(f"workqueue: cannot listen on port {self._port_opt}: {exc}") from exc
            self._port = self._q.port
            if self._password:
                self._q.specify_password(self._password)
                pw = self._staging / "password"
                pw.touch(0o600)
                pw.write_text(self._password)
            # a byte in this pipe ends the manager thread's wait: a submitted task reaches Work Queue at once
            self._wake_r, self._wake_w = os.pipe()
            for fd in (self._wake_r, self._wake_w):
                os.set_blocking(fd, False)
            self._wait = Waiter(wq, self._q, None if self._project else self._wake_r)
            self._pythonpath = worker_pythonpath()
            self._client = self._staging / CLIENT_SCRIPT_NAME
            self._client.write_text(SHELL_CLIENT)
            self._command = task_command(self._python, self._warm)
            self._key = server_key(self._python, self._pythonpath)
            self._connected, self._lost_workers = 0, 0
            if self._local_count:
                manager = LOOPBACK if self._host in (LOOPBACK, "0.0.0.0") else self._host
                self._local = LocalWorkers(self._local_count, manager, self._port, self._staging,
                                           self._staging / "password" if self._password else None)
                self._local.start()
            if self._batch is not None:
                self._batch.start(manager_address(self._host), self._port, self._staging,
                                  self._staging / "password" if self._password else None)
        except BaseException:
            self._close_wake()
            self._teardown()
            raise
        self._thread = threading.Thread(target=self._loop, name="casa-workqueue", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        if self._batch is not None and self._batch.at_start:
            try:
                self._batch.wait_first(lambda: self._connected)
            except BaseException:
                self._stop()
                raise

    def _stop(self) -> None:
        atexit.unregister(self.stop)
        self._closing.set()
        self._wake()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=60)
        if thread is None or not thread.is_alive():
            self._close_wake()
        self._teardown()

    def _wake(self) -> None:
        """End the manager thread's current wait (if it waits on the pipe)."""
        with self._wake_lock, contextlib.suppress(OSError):  # full: a wake is pending anyway
            if self._wake_w >= 0:
                os.write(self._wake_w, b"\0")

    def _close_wake(self) -> None:
        # under the lock: a submit racing with stop must not write to a closed (maybe reused) descriptor
        with self._wake_lock:
            wait, self._wait = self._wait, None
            if wait is not None and wait.wakes:
                wait.close()  # frees Work Queue's link, which closes the read end
            elif self._wake_r >= 0:
                os.close(self._wake_r)
            if self._wake_w >= 0:
                os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _teardown(self) -> None:
        """Free the queue (if the loop did not), stop local workers and what they left, by PID."""
        if self._q is not None:
            self._free_queue()
        if self._local is not None:
            self._local.stop()
            self._local = None
        if self._batch is not None:
            self._batch.stop()  # the factory, and the jobs it submitted
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _fail_all(self, why: str) -> None:
        """Take every task out of Work Queue and fail its future."""
        for task_id, t in list(self._tasks.items()):
            with contextlib.suppress(Exception):
                self._q.cancel_by_taskid(task_id)
            _settle(t.future, exc=WorkerLost(why))
            shutil.rmtree(t.directory, ignore_errors=True)
        self._tasks.clear()
        getattr(self._q, "_task_table", {}).clear()

    def _forget(self, task_id: int) -> None:
        """Drop the bindings' own reference to a task we are done with (the C task is freed with it)."""
        getattr(self._q, "_task_table", {}).pop(task_id, None)

    def _free_queue(self, why: str = "workqueue: the backend was stopped") -> None:
        self._fail_all(why)
        q, self._q = self._q, None
        while True:
            try:
                _, future, _ = self._inbox.get_nowait()
            except queue.Empty:
                break
            _settle(future, exc=WorkerLost(why))
        if hasattr(q, "_free_queue"):
            q._free_queue()

    # -- the manager thread: every queue call happens here ----------------------------------------
    def _loop(self) -> None:
        try:
            done = None
            wakes = self._wait.wakes
            while not self._closing.is_set():
                if wakes:  # a submission ends the wait below: take what is there, never sleep here
                    self._drain_wake()
                    if self._take(0.0, 0.0):
                        # after a wait that found nothing to do, Work Queue's next one first polls its links
                        # for up to a second before it dispatches: a byte waiting in the pipe ends that poll
                        self._wake()
                else:
                    # idle: sleep on the inbox. After a result, with nothing queued in Work Queue for the
                    # worker that just freed up, give the driver a moment to send the next task.
                    self._take(0.2 if not self._tasks else 0.05 if done and not self._ready else 0.0)
                done = self._wait(1 if self._tasks else 0)  # 0: only let workers connect
                stats = self._q.stats
                lost = getattr(stats, "total_workers_lost", getattr(stats, "workers_lost", 0))
                worker_lost, self._lost_workers = lost > self._lost_workers, lost
                if worker_lost:
                    log.info("workqueue: Work Queue lost a worker (%d lost so far)", lost)
                if done:
                    self._finish(done, worker_lost)
                self._watch(worker_lost)
                self._connected = stats.workers_connected
                self._tend_local_workers()
        except BaseException as exc:  # never leave the driver waiting on futures nobody settles
            self._failure = f"workqueue: the manager thread failed: {exc!r}"
            raise
        finally:
            if self._q is not None:
                self._free_queue(self._failure or "workqueue: the backend was stopped")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):  # empty
            while os.read(self._wake_r, 4096):
                pass

    def _take(self, timeout: float, burst: float = 0.02) -> int:
        """Hand submissions to Work Queue: wait up to ``timeout`` for the first, then ``burst`` for each next;
        how many were taken.

        Without a wake-up pipe Work Queue only sees a task at the next wait (which lasts
        up to a second), so it pays to catch what the driver sends right after a result.
        """
        taken = 0
        while True:
            try:
                item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return taken
            self._enqueue(*item)
            taken += 1
            timeout = burst  # the rest of a burst

    def _enqueue(self, key: int, future: Future, directory: Path) -> None:
        if future.cancelled():
            shutil.rmtree(directory, ignore_errors=True)
            return
        t = self._wq.Task(self._command)
        t.specify_input_file(WORKER_SCRIPT, WORKER_SCRIPT_NAME, cache=True)
        if self._warm:
            t.specify_input_file(str(self._client), CLIENT_SCRIPT_NAME, cache=True)
            t.specify_environment_variable("CASA_WQ_KEY", self._key)
        t.specify_input_file(str(directory / "in.pkl"), "in.pkl", cache=False)
        t.specify_output_file(str(directory / "out.pkl"), "out.pkl", cache=False)
        t.specify_cores(1)
        # first submitted, first dispatched: among equal priorities Work Queue dispatches the newest task
        # first, and a task submitted early (a batch whose merge the run's end waits for) starved behind
        # the later ones while workers were free (a 5-chunk task of Q6 queued 1.1 s: docs/workqueue.md)
        t.specify_priority(-float(key))
        t.specify_environment_variable("PYTHONPATH", self._pythonpath)
        t.specify_environment_variable("CASA_WQ_WARM", "1" if self._warm else "0")
        t.specify_tag(str(key))
        self._tasks[self._q.submit(t)] = _Task(t, future, directory)
        self.sent += 1

    def _finish(self, address: int, worker_lost: bool) -> None:
        task_id = next((i for i, t in self._tasks.items() if task_address(t.task) == address), None)
        if task_id is None:
            return
        t = self._tasks.pop(task_id)
        self._forget(task_id)
        wt = t.task
        out = t.directory / "out.pkl"
        if self._resent(t, self._wq.WORK_QUEUE_TASK_DONE, worker_lost):
            # lost, sent again and done within one wait: the driver retries, so that the report counts it
            _settle(t.future, exc=self._lost(task_id, t))
        elif wt.result == self._wq.WORK_QUEUE_RESULT_SUCCESS and wt.return_status == 0 and out.exists():
            try:
                _settle(t.future, pickle.loads(out.read_bytes()))
            except Exception as exc:
                _settle(t.future, exc=WorkerLost(f"workqueue: task {task_id} wrote unreadable output: {exc!r}"))
        else:
            _settle(t.future, exc=WorkerLost(self._why(task_id, wt)))
        shutil.rmtree(t.directory, ignore_errors=True)

    def _why(self, task_id: int, wt: Any) -> str:
        lines = (wt.output or "").strip().splitlines()
        tail = f": {lines[-1][:200]}" if lines else ""
        result = getattr(wt, "result_str", None) or wt.result
        return f"workqueue: task {task_id} on {wt.hostname or '?'} failed ({result}, exit {wt.return_status}){tail}"

    def _resent(self, t: _Task, state: int, worker_lost: bool) -> bool:
        """Did ``t`` go back to the queue since the last look, because a worker was lost?

        Work Queue counts dispatches (``try_count``): a task in the queue after its
        n-th dispatch, or dispatched n + 1 times, went back after dispatch n.
        """
        tries = getattr(t.task._task, "try_count", 1)
        back = tries if state == self._wq.WORK_QUEUE_TASK_READY else tries - 1
        if back <= t.back:
            return False
        t.back = back
        if not worker_lost:
            self.requeued += 1  # a worker declined it (FORSAKEN): nothing ran, Work Queue sends it again
        return worker_lost

    def _lost(self, task_id: int, t: _Task) -> WorkerLost:
        self.resent += 1
        return WorkerLost(f"workqueue: lost the worker running task {task_id} ({t.task.hostname or 'unknown host'})")

    def _watch(self, worker_lost: bool) -> None:
        """Fail the tasks Work Queue re-queued after losing their worker; drop those the driver cancelled."""
        q, ready = self._q, 0
        for task_id, t in list(self._tasks.items()):
            state = q.task_state(task_id)
            ready += state == self._wq.WORK_QUEUE_TASK_READY
            resent = self._resent(t, state, worker_lost)
            if resent or t.future.cancelled():
                q.cancel_by_taskid(task_id)
                self._forget(task_id)
                del self._tasks[task_id]
                shutil.rmtree(t.directory, ignore_errors=True)
                if resent:
                    _settle(t.future, exc=self._lost(task_id, t))
        self._ready = ready

    def _tend_local_workers(self) -> None:
        local = self._local
        if local is None or self._closing.is_set() or not local.tend():
            return
        if local.all_exited() and self._connected == 0 and self._port_opt is None:
            self._fail_all(f"workqueue: every local work_queue_worker has exited ({local.last_words()})")

    # -- what the driver uses ------------------------------------------------------
    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        if self._thread is None or self._staging is None:
            raise BackendUnavailable("workqueue: the backend is not started")
        if not self._thread.is_alive():
            raise WorkerLost(self._failure or "workqueue: the manager thread has ended")
        key = next(self._keys)
        directory = self._staging / f"task-{key}"
        directory.mkdir()
        (directory / "in.pkl").write_bytes(cloudpickle.dumps((fn, arg), protocol=pickle.HIGHEST_PROTOCOL))
        future: Future = Future()
        self._inbox.put((key, future, directory))
        self._wake()
        if self._batch is not None:
            self._batch.wait_first(lambda: self._connected)  # adapt=(0, n): the work asks for the first worker
        return future

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

    def wait_for_workers(self, n: int, timeout: float = 60) -> int:
        """Wait until ``n`` workers are connected (or ``timeout`` s); return how many are."""
        deadline = time.time() + timeout
        while self._connected < n and time.time() < deadline and self._thread is not None:
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
        return f"workqueue({self.workers} workers, {self._host}:{self._port or self._port_opt or 0})"
