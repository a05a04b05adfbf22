"""The worker side of a Work Queue task: ``python casa_wq_worker.py IN OUT`` in the task's sandbox.

IN holds ``cloudpickle.dumps((fn, arg))``; OUT gets ``fn(arg)``, written whole or
not at all. ``fn`` is ``run_batch``, which never raises, so a non-zero exit means
the task itself broke (an import error, a signal, a lost server), not the analysis.

A fresh interpreter pays ~1 s to import coffea and ~1 s more to warm up on its
first chunk. So by default (``CASA_WQ_WARM=1``, Linux) this script stays
stdlib-only (~20 ms) and hands the work to a *server*: a Python process beside
the worker, started by the first task that finds none, that keeps coffea
imported and its caches warm and runs one task at a time for the client that
holds its slot's lock (one slot per task running at once on the worker).

* The server listens on an abstract Unix socket (no file, no path-length
  limit) and serves only processes of its own user (``SO_PEERCRED``).
* It stays in the worker's session (whoever stops the worker's session stops
  it), leaves the task's process group (a task abort does not kill it), and
  exits within a second of its worker, or after ``IDLE_S`` without work.
* If no server can be had, or with ``CASA_WQ_WARM=0``, the task runs here.

The manager ships this file with each task (cached on the worker) as
``casa_wq_worker.py``, so the client never imports the ``casa_executors``
package; the server and the cold path do, through the task's ``PYTHONPATH``.
It must stay stdlib-only, so it keeps its own few lines of process handling
(``PR_SET_PDEATHSIG``, a liveness check of its worker) instead of
``casa_executors.procs``.
"""

from __future__ import annotations

# a client runs these imports for every task: only light ones here, the rest where needed
import _socket
import ctypes
import fcntl
import os
import sys
import time
import zlib

IDLE_S = 300  # a server with nothing to do for this long exits
START_S = 120  # how long a client waits for a new server to listen
SLOTS = 64  # servers per worker at most
PRELOAD = ("casa_executors.task", "coffea.processor", "coffea.nanoevents", "uproot")


def _die_with_parent() -> None:
    """Get SIGKILL when the work_queue_worker that started us dies, so no task outlives it."""
    try:
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # it died before that took effect
        os._exit(1)


def _worker_name(worker_pid: int) -> None:
    # the task's command exec's Python, so its parent is the worker: name it in the report
    os.environ.setdefault("CASA_WORKER_NAME", f"{os.uname().nodename}:{worker_pid}")


def run_here(src: str, dst: str) -> None:
    import pickle

    import cloudpickle

    with open(src, "rb") as f:
        fn, arg = pickle.load(f)
    data = cloudpickle.dumps(fn(arg), protocol=pickle.HIGHEST_PROTOCOL)
    with open(dst + ".part", "wb") as f:
        f.write(data)
    os.replace(dst + ".part", dst)


def _read_line(conn: _socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        more = conn.recv(4096)
        if not more:
            break
        data += more
    return data.decode(errors="replace").strip()


# -- the client: find or start a server of this worker, hand it the task ---------------------------


def _connect(address: str, server: object = None) -> _socket.socket | None:
    """A connection to ``address``; waits for the ``server`` process we just started to listen."""
    deadline = time.time() + (START_S if server else 0)
    while True:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(address)
            return s
        except OSError:
            s.close()
            if server is None or server.poll() is not None or time.time() > deadline:  # type: ignore[attr-defined]
                return None
            time.sleep(0.05)


def run_on_server(src: str, dst: str, worker_pid: int) -> bool | None:
    """True/False: a server ran it (well or not); None: no server to be had, run it here."""
    key = zlib.crc32(f"{sys.executable}\0{os.environ.get('PYTHONPATH', '')}".encode())
    name = f"casa-{os.getuid()}-{worker_pid}-{key:08x}"
    workspace = os.path.dirname(os.getcwd())  # <workdir>/worker-N-PID/t.ID: the worker's own directory
    for slot in range(SLOTS):
        files = os.path.join(workspace, f"{name}-{slot}")
        lock = open(files + ".lock", "a")  # held until this process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        address = f"\0{name}-{slot}"  # abstract namespace: no file to clean up
        conn = _connect(address)
        if conn is None:
            import subprocess

            with open(files + ".log", "ab") as log:
                server = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--serve", address[1:], str(worker_pid)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workspace)
            conn = _connect(address, server)
            if conn is None:
                server.kill()
                return None
        request = "\t".join((os.getcwd(), os.path.abspath(src), os.path.abspath(dst))) + "\n"
        try:
            conn.sendall(request.encode())
            reply = _read_line(conn)
        except OSError:
            reply = ""
        finally:
            conn.close()
        if reply != "ok":
            print(f"casa_wq_worker: server {name}-{slot} answered {reply or 'nothing (it died)'}", file=sys.stderr)
        return reply == "ok"
    return None


# -- the server -------------------------------------------------------------------------------------


def _watch(worker_pid: int, idle_since: list[float]) -> None:
    """Exit with the worker, or when idle too long."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass
        if idle_since[0] and time.time() - idle_since[0] > IDLE_S:
            os._exit(0)


def serve(name: str, worker_pid: int) -> None:
    import importlib
    import socket
    import struct
    import threading

    os.setpgid(0, 0)  # a task's abort kills its process group; we are not part of any task
    _worker_name(worker_pid)
    idle_since = [0.0]  # 0 while starting or busy
    threading.Thread(target=_watch, args=(worker_pid, idle_since), daemon=True).start()
    for module in PRELOAD:
        importlib.import_module(module)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0" + name)
    srv.listen(1)
    creds = struct.Struct("3i")
    idle_since[0] = time.time()
    while True:
        conn, _ = srv.accept()
        with conn:
            _, uid, _ = creds.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
            if uid != os.getuid():
                continue  # only our own user's tasks
            idle_since[0] = 0.0
            try:
                cwd, src, dst = _read_line(conn).split("\t")
                os.chdir(cwd)
                run_here(src, dst)
                reply = "ok"
            except Exception as exc:  # run_batch never raises: this is unpickling or I/O
                reply = f"error {type(exc).__name__}: {exc}".replace("\n", " ")[:500]
            finally:
                os.chdir("/")
                idle_since[0] = time.time()
            try:
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass  # the task was cancelled meanwhile


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--serve":
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) != 2:
        print("usage: casa_wq_worker.py IN OUT", file=sys.stderr)
        return 2
    linux = sys.platform.startswith("linux")
    if linux:
        _die_with_parent()
    worker = os.getppid()
    _worker_name(worker)
    src, dst = argv
    if linux and os.environ.get("CASA_WQ_WARM", "1") != "0":
        done = run_on_server(src, dst, worker)
        if done is not None:
            return 0 if done else 1
    run_here(src, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
