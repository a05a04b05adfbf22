"""Work Queue: the manager runs in this process; tasks run on ``work_queue_worker`` processes.

A task is a plain Work Queue ``Task`` running ``python wq_task.py in.pkl out.pkl``
(``casa_executors/backends/wq_task.py``, shipped with the task and cached on the
worker) with ``specify_cores(1)``. A fresh interpreter costs ~2 s of CPU before
its first chunk is done (importing coffea, then warming up), so several chunks
ride in one task (``batch_size``: about four tasks per worker), and with
``warm=True`` (the default) the task hands its work to a per-worker server
process that stays warm between tasks (see ``wq_task``); ``warm=False`` runs
every task in a fresh interpreter. ``workers=N`` starts N local
``work_queue_worker`` processes, each leading its own session, and stops them
and everything left in their sessions by PID; ``port=`` alone waits for workers
started elsewhere (``wait_for_workers``).

Retries belong to the driver. Work Queue silently re-sends a task whose worker
was lost (``specify_max_retries`` does not change that in cctools 9.9), so a
task that goes back to the queue (or is dispatched again) while Work Queue
counts a lost worker is cancelled and fails with :class:`WorkerLost`: the
driver retries it and the report counts the attempt (``resent`` counts them
here too). A task a worker merely declined (FORSAKEN: it found fewer
resources than it had announced) goes back without a lost worker; Work Queue
re-sends those itself, nothing ran, and ``requeued`` counts them.

Two things the SWIG bindings get in the way of:

* ``WorkQueue.wait`` holds the GIL for its whole timeout (the driver would
  freeze for a second at a time). One thread makes every queue call and waits
  through the C ``work_queue_wait`` with ctypes, which lets the GIL go.
* ``WorkQueue(port)`` listens on all interfaces and has no address option.
  While the queue is created, the extension's GOT entry for ``bind`` points to
  a shim that replaces the wildcard address with ``host`` (127.0.0.1 by
  default); ``host="0.0.0.0"`` leaves it alone, for workers on other machines.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.machinery
import importlib.util
import ipaddress
import itertools
import math
import mmap
import os
import pickle
import queue
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from casa_executors.backends.base import Backend, worker_pythonpath
from casa_executors.errors import BackendUnavailable, ExecutorOptionError, WorkerLost

WQ_TASK = str(Path(__file__).resolve().with_name("worker.py"))
DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's python3-workqueue
LOOPBACK = "127.0.0.1"
TASKS_PER_WORKER = 4  # batches per worker and run: start-up amortised, tail still short
RESPAWNS_PER_WORKER = 3
GOT_RELOCATIONS = {6, 7, 1025, 1026}  # GLOB_DAT and JUMP_SLOT on x86-64 and on aarch64


# -- finding the module ------------------------------------------------------------------


def import_work_queue() -> ModuleType:
    """``ndcctools.work_queue`` (conda), else ``work_queue``: importable, or loaded alone from Debian's
    dist-packages, so that nothing else there shadows this environment's packages."""
    try:
        from ndcctools import work_queue

        return work_queue
    except ImportError:
        pass
    if "work_queue" in sys.modules:
        return sys.modules["work_queue"]
    if importlib.util.find_spec("work_queue") is not None:
        import work_queue

        return work_queue
    return _load_alone(DIST_PACKAGES)


def _load_alone(directory: str) -> ModuleType:
    py = os.path.join(directory, "work_queue.py")
    ext = next((p for s in importlib.machinery.EXTENSION_SUFFIXES
                if os.path.isfile(p := os.path.join(directory, "_work_queue" + s))), None)
    if ext is None or not os.path.isfile(py):
        raise ImportError("no Work Queue Python module: neither ndcctools.work_queue nor "
                          f"{py} with its _work_queue extension (Debian package python3-workqueue)")
    loaded: list[str] = []
    try:
        for name, path in (("_work_queue", ext), ("work_queue", py)):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            loaded.append(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # it imports distutils
                spec.loader.exec_module(module)
    except BaseException:
        for name in loaded:
            sys.modules.pop(name, None)
        raise
    return sys.modules["work_queue"]


# -- native helpers: a wait that lets the GIL go, and bind() on one address -----------------------


def _extension_path(wq: ModuleType) -> str:
    return os.path.realpath(wq._work_queue.__file__)


def _got_offsets(path: str, symbol: str) -> list[int]:
    """Where the ELF shared object ``path`` keeps the address of ``symbol`` (its GOT entries)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise OSError(f"{path} is not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = []
    for _, kind, _, _, offset, size, link, *_ in sections:
        if kind != 4 or link == 0:  # SHT_RELA against a symbol table
            continue
        symtab = sections[link]
        strtab = sections[symtab[6]]
        for at in range(offset, offset + size, 24):
            r_offset, r_info = struct.unpack_from("<QQ", data, at)
            if r_info & 0xFFFFFFFF not in GOT_RELOCATIONS:
                continue
            name_at = strtab[4] + struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * 24)[0]
            if data[name_at:data.index(b"\0", name_at)] == symbol.encode():
                found.append(r_offset)
    return found


def _maps() -> list[tuple[int, int, str, int, str]]:
    """This process's mappings: (start, end, permissions, file offset, path)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], int(parts[2], 16), parts[5].strip() if len(parts) > 5 else ""))
    return out


def _load_base(path: str) -> int:
    """Where the shared object ``path`` is loaded (its first page, file offset 0)."""
    starts = [lo for lo, _, _, offset, p in _maps() if p == path and offset == 0]
    if not starts:
        raise OSError(f"{path} is not mapped in this process")
    return min(starts)


_BIND = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, use_errno=True)
_bind_lock = threading.Lock()


def _bind_shim(real: Any, host: str) -> Any:
    """A C ``bind`` that puts ``host`` in place of the wildcard address."""
    v4 = socket.inet_aton(host)
    v6 = socket.inet_pton(socket.AF_INET6, "::1" if host == LOOPBACK else f"::ffff:{host}")

    def bind(fd: int, addr: int, length: int) -> int:
        buf = bytearray(ctypes.string_at(addr, length))
        family = int.from_bytes(buf[:2], sys.byteorder)
        if family == socket.AF_INET and length >= 8 and buf[4:8] == bytes(4):
            buf[4:8] = v4
        elif family == socket.AF_INET6 and length >= 24 and buf[8:24] == bytes(16):
            buf[8:24] = v6
        return real(fd, (ctypes.c_char * length).from_buffer(buf), length)

    return _BIND(bind)


@contextlib.contextmanager
def bound_to(wq: ModuleType, host: str) -> Iterator[None]:
    """While inside, the Work Queue extension's listening sockets bind to ``host``."""
    if host in ("0.0.0.0", ""):
        yield
        return
    with _bind_lock:
        patched = None
        try:
            path = _extension_path(wq)
            libc = ctypes.CDLL(None, use_errno=True)
            real = ctypes.cast(libc.bind, ctypes.c_void_p).value
            base = _load_base(path)
            slots = [base + off for off in _got_offsets(path, "bind")]
            if not slots or any(ctypes.c_void_p.from_address(s).value != real for s in slots):
                raise OSError("no resolved GOT entry for bind()")
            shim = _bind_shim(_BIND(real), host)
            patched = (slots, real, shim, _unprotect(slots))
            for s in slots:
                ctypes.c_void_p.from_address(s).value = ctypes.cast(shim, ctypes.c_void_p).value
        except (OSError, ValueError, AttributeError, struct.error) as exc:
            warnings.warn(f"workqueue: cannot make the manager listen on {host} only ({exc}); "
                          "it listens on all interfaces", stacklevel=3)
        try:
            yield
        finally:
            if patched is not None:
                slots, real, _, restore = patched
                for s in slots:
                    ctypes.c_void_p.from_address(s).value = real
                restore()


def _unprotect(slots: list[int]) -> Callable[[], None]:
    """Make the pages of ``slots`` writable (RELRO makes them read-only); return what undoes that."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, maps = mmap.PAGESIZE, _maps()
    changed = []
    for start in sorted({s - s % page for s in slots}):
        perms = next(p for lo, hi, p, _, _ in maps if lo <= start < hi)
        if "w" not in perms:
            prot = (1 if "r" in perms else 0) | (4 if "x" in perms else 0)  # PROT_READ, PROT_EXEC
            if libc.mprotect(start, page, prot | 2) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
            changed.append((start, prot))

    def restore() -> None:
        for start, prot in changed:
            libc.mprotect(start, page, prot)

    return restore


def _waiter(wq: ModuleType, q: Any) -> Callable[[int], int | None]:
    """``timeout -> address of a finished task or None``, without holding the GIL while it waits
    (or, if the C function cannot be had, through the bindings, which hold it)."""
    try:
        wait = ctypes.CDLL(_extension_path(wq)).work_queue_wait
        handle = int(q._work_queue)
    except (OSError, AttributeError, TypeError) as exc:
        warnings.warn(f"workqueue: waiting through the Python bindings, which hold the GIL ({exc})", stacklevel=3)
        return lambda timeout: (t := q.wait(timeout)) and _address(t)
    wait.restype, wait.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]
    return lambda timeout: wait(handle, timeout)


def _address(task: Any) -> int:
    return int(task._task.this)


# -- the backend ---------------------------------------------------------------------------------


@dataclass
class _Task:
    task: Any  # the Work Queue Task
    future: Future
    directory: Path
    back: int = 0  # the last dispatch after which it was seen back in the queue


@dataclass
class _LocalWorker:
    proc: subprocess.Popen
    log: Path


def _settle(future: Future, result: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except InvalidStateError:  # cancelled by the driver meanwhile
        pass


def _session_members(sids: set[int]) -> list[int]:
    """Processes whose session is one of ``sids``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.getsid(int(entry)) in sids:
                    out.append(int(entry))
            except OSError:
                pass
    return out


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
    ) -> None:
        super().__init__(workers)
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
        if workers is None and port is None:
            self._workers = min(os.cpu_count() or 1, 4)
        self._local_count = self._workers or 0
        self._port_opt, self._host = port, host
        self._python, self._project, self._password = python or sys.executable, name, password
        self._warm = warm
        self._wq: ModuleType | None = None
        self._q: Any = None
        self._port = 0
        self._staging: Path | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._keys = itertools.count(1)
        self._tasks: dict[int, _Task] = {}  # by Work Queue task id
        self._local: list[_LocalWorker] = []
        self._sessions: set[int] = set()  # every local worker started: each leads a session
        self._respawns = 0
        self._connected = 0
        self._lost_workers = 0
        self._ready = 0  # tasks waiting in Work Queue for a worker, at the last look
        self._failure: str | None = None
        self.resent = 0  # tasks Work Queue would have re-sent after losing their worker (we failed them)
        self.requeued = 0  # tasks a worker declined, re-sent by Work Queue (they had not run)

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
            self._wait = _waiter(wq, self._q)
            self._command = f"exec {shlex.quote(self._python)} wq_task.py in.pkl out.pkl 2>&1"
            self._pythonpath = worker_pythonpath()
            self._local, self._respawns, self._connected, self._lost_workers = [], 0, 0, 0
            for _ in range(self._local_count):
                self._spawn()
        except BaseException:
            self._teardown()
            raise
        self._thread = threading.Thread(target=self._loop, name="casa-workqueue", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def _spawn(self) -> None:
        n = len(self._local)
        log = self._staging / f"worker-{n}.log"
        workdir = self._staging / "workers"
        workdir.mkdir(exist_ok=True)
        manager = LOOPBACK if self._host in (LOOPBACK, "0.0.0.0") else self._host
        # a fixed --disk: a worker that re-measures its free disk may decline ("forsake") a task
        # given all it had announced when someone else writes to the disk meanwhile
        disk_mb = shutil.disk_usage(workdir).free // 2**20 // max(self._local_count, 1)
        cmd = ["work_queue_worker", "--cores", "1", "--disk", str(disk_mb), "--single-shot", "--parent-death",
               "--connect-timeout", "60", "--idle-timeout", "900", "--workdir", str(workdir)]
        if self._password:
            cmd += ["--password", str(self._staging / "password")]
        with open(log, "w") as out:
            proc = subprocess.Popen([*cmd, manager, str(self._port)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._local.append(_LocalWorker(proc, log))
        self._sessions.add(proc.pid)

    def _stop(self) -> None:
        atexit.unregister(self.stop)
        self._closing.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=60)
        self._teardown()

    def _teardown(self) -> None:
        """Free the queue (if the loop did not), stop local workers and what they left, by PID."""
        if self._q is not None:
            self._free_queue()
        procs = [w.proc for w in self._local]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 10
        for p in procs:
            try:
                p.wait(max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        # what workers leave behind in their sessions: warm servers, the task of a worker killed from outside
        for pid in _session_members(self._sessions):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._local, self._sessions = [], set()
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
            while not self._closing.is_set():
                # idle: sleep on the inbox. After a result, with nothing queued in Work Queue for the
                # worker that just freed up, give the driver a moment to send the next task.
                self._take(0.2 if not self._tasks else 0.05 if done and not self._ready else 0.0)
                done = self._wait(1 if self._tasks else 0)  # 0: only let workers connect
                stats = self._q.stats
                lost = getattr(stats, "total_workers_lost", getattr(stats, "workers_lost", 0))
                worker_lost, self._lost_workers = lost > self._lost_workers, lost
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

    def _take(self, timeout: float) -> None:
        """Hand submissions to Work Queue: wait up to ``timeout`` for the first, then take the burst.

        Work Queue only sees a task at the next wait (which lasts up to a second), so
        it pays to catch what the driver sends right after a result.
        """
        while True:
            try:
                item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return
            self._enqueue(*item)
            timeout = 0.02  # the rest of a burst

    def _enqueue(self, key: int, future: Future, directory: Path) -> None:
        if future.cancelled():
            shutil.rmtree(directory, ignore_errors=True)
            return
        t = self._wq.Task(self._command)
        t.specify_input_file(WQ_TASK, "wq_task.py", cache=True)
        t.specify_input_file(str(directory / "in.pkl"), "in.pkl", cache=False)
        t.specify_output_file(str(directory / "out.pkl"), "out.pkl", cache=False)
        t.specify_cores(1)
        t.specify_environment_variable("PYTHONPATH", self._pythonpath)
        t.specify_environment_variable("CASA_WQ_WARM", "1" if self._warm else "0")
        t.specify_tag(str(key))
        self._tasks[self._q.submit(t)] = _Task(t, future, directory)

    def _finish(self, address: int, worker_lost: bool) -> None:
        task_id = next((i for i, t in self._tasks.items() if _address(t.task) == address), None)
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
        dead = [w for w in self._local if w.proc.poll() is not None]
        if not dead or self._closing.is_set():
            return
        while dead and self._respawns < RESPAWNS_PER_WORKER * self._local_count:
            self._local.remove(dead.pop())
            self._respawns += 1
            self._spawn()
        if all(w.proc.poll() is not None for w in self._local) and self._connected == 0 and self._port_opt is None:
            last = self._local[-1].log.read_text(errors="replace").strip().splitlines()[-1:] if self._local else []
            self._fail_all(f"workqueue: every local work_queue_worker has exited ({''.join(last)})")

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
        return future

    @property
    def workers(self) -> int:
        """Local workers, or the workers connected now (port= with workers started elsewhere)."""
        return max(self._local_count, self._connected) or 1

    def batch_size(self, n_chunks: int) -> int:
        return max(math.ceil(n_chunks / (TASKS_PER_WORKER * self.workers)), 1)

    @property
    def port(self) -> int:
        return self._port

    def wait_for_workers(self, n: int, timeout: float = 60) -> int:
        """Wait until ``n`` workers are connected (or ``timeout`` s); return how many are."""
        deadline = time.time() + timeout
        while self._connected < n and time.time() < deadline and self._thread is not None:
            time.sleep(0.1)
        return self._connected

    def worker_pids(self) -> list[int]:
        """PIDs of the local work_queue_worker processes that are running."""
        return [w.proc.pid for w in self._local if w.proc.poll() is None]

    def describe(self) -> str:
        return f"workqueue({self.workers} workers, {self._host}:{self._port or self._port_opt or 0})"
