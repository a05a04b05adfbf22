"""The worker side of a Work Queue task: a warm per-worker server, and the clients that hand it tasks.

A task's IN file holds ``cloudpickle.dumps((fn, arg))``; its OUT file gets
``fn(arg)``, written whole or not at all. ``fn`` is ``run_batch``, which never
raises, so a non-zero exit means the task itself broke (an import error, a
signal, a lost server), not the analysis.

A fresh interpreter pays ~1 s to import coffea and ~1 s more to warm up on its
first chunk, so by default (``CASA_WQ_WARM=1``, Linux) the work goes to a
*server*: a Python process beside the worker, started by the first task that
finds none, that keeps coffea imported and its caches warm and runs one task at
a time for the client that holds its slot's lock (one slot per task running at
once on the worker). Each task reaches it through one of two clients:

* :data:`SHELL_CLIENT` (``bash casa_wq_client.sh``): the fast path, a few
  milliseconds. Starting even a stdlib-only Python costs 30-130 ms on a busy
  node (``site``, ``.pth`` files), which was most of the cost of a short task.
  It exits with :data:`NO_SERVER` when its slot has no live server (or bash's
  ``flock`` is missing), and the task command then runs
* this script (``python -S casa_wq_worker.py IN OUT``): finds or starts the
  server of a free slot, hands it the task, or runs it here if no server can
  be had (or with ``CASA_WQ_WARM=0``).

Server and clients talk through two FIFOs per slot (``<slot>.req``,
``<slot>.rep``) in ``casa-<uid>-<worker pid>-<key>/`` beside the task
sandboxes, a directory of mode 700 that clients check is their own; the FIFOs
are mode 600, so only processes of the server's own user can hand it work.
A request is one line ``ID<TAB>CWD<TAB>IN<TAB>OUT``, a reply ``ID ok`` or
``ID error ...``; a client skips replies of other IDs (those of a task aborted
while its server ran it). The server holds ``<slot>.alive`` locked while it
lives: a client that finds that lock free knows the server is gone (no PID to
be reused, no FIFO open that could block).

The server stays in the worker's session (whoever stops the worker's session
stops it), leaves the task's process group (a task abort does not kill it), and
exits as soon as its worker does, or after ``IDLE_S`` without work.

The manager ships this file with each task (cached on the worker) as
``casa_wq_worker.py``, so the client never imports the ``casa_executors``
package; the server and the cold path do, through the task's ``PYTHONPATH``.
It must stay stdlib-only, so it keeps its own few lines of process handling
(``PR_SET_PDEATHSIG``, a liveness check of its worker) instead of
``casa_executors.procs``.
"""

from __future__ import annotations

# a client runs these imports for every task it handles: only light ones here, the rest where needed
import fcntl
import os
import select
import stat
import sys
import time
import zlib

IDLE_S = 300  # a server with nothing to do for this long exits
START_S = 120  # how long a client waits for a new server to be up
SLOTS = 64  # servers per worker at most
POLL_S = 2.0  # a client waiting on its server checks it is alive this often
NO_SERVER = 3  # exit status of the shell client: no live server, run the Python client
PRELOAD = ("casa_executors.task", "coffea.processor", "coffea.nanoevents", "uproot")

# The fast path: bash and util-linux's flock only, no Python start. Arguments: the worker's PID
# (the task shell's $PPID), IN, OUT; CASA_WQ_KEY names the servers of this Python and PYTHONPATH.
SHELL_CLIENT = r"""# casa_executors Work Queue client: hand this task to its slot's warm server (see worker.py)
export LC_ALL=C  # `read` takes bytes, not characters that a timeout could cut
command -v flock >/dev/null 2>&1 || exit 3
d="${PWD%/*}/casa-$UID-$1-${CASA_WQ_KEY:?}"
[ -d "$d" ] && [ -O "$d" ] && [ ! -L "$d" ] || exit 3
# is the slot's server up (it holds .alive locked)? anything else, a missing folder too, means no
up() { flock -n -E 200 "$d/$s.alive" true 2>/dev/null; [ $? = 200 ]; }
for ((s = 0; s < 64; s++)); do
    exec 9>>"$d/$s.lock" || exit 3
    if ! flock -n 9; then exec 9>&-; continue; fi
    up || exit 3  # the slot is ours but has no server: the Python client starts one
    exec 3<>"$d/$s.req" 4<>"$d/$s.rep" || exit 3
    exec 5<"$d/$s.rep" 4>&- || exit 3  # keep the read end only: the server's death ends the file at once
    id="$$.$RANDOM$RANDOM"
    # one write (under PIPE_BUF); the leading newline ends any line a writer killed mid-way left behind
    printf '\n%s\t%s\t%s\t%s\n' "$id" "$PWD" "$2" "$3" >&3
    line=
    while :; do
        # `read -t` checks its deadline before each byte it takes from a pipe: when it times out
        # mid-line, what it took is in $part and the rest comes with the next read
        IFS= read -r -t @POLL_S@ -u 5 part
        got=$?
        line+=$part
        if [ $got = 0 ]; then
            rid=${line%% *} reply=${line#* } line=
            [ "$rid" = "$id" ] || continue  # a reply to a task aborted meanwhile
            [ "$reply" = ok ] && exit 0
            echo "casa_wq_client: server $s answered: $reply" >&2
            exit 1
        elif [ $got -le 128 ] || ! up; then  # > 128: timed out; else the end of the file
            echo "casa_wq_client: server $s died" >&2
            exit 1
        fi
    done
done
exit 3
""".replace("@POLL_S@", format(POLL_S, "g"))


def server_key(python: str, pythonpath: str) -> str:
    """Which servers a task may use: those of the same Python and PYTHONPATH."""
    return format(zlib.crc32(python.encode() + b"\0" + pythonpath.encode()), "08x")


def _die_with_parent(worker_pid: int) -> None:
    """Get SIGKILL when the work_queue_worker that started us dies, so no task outlives it."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != worker_pid:  # it died before that took effect (we were adopted: by a subreaper
        os._exit(1)  # such as slurmstepd, not always by init), so start no server it would not stop


def _worker_name(worker_pid: int) -> None:
    # the task's command exec's Python, so its parent is the worker: name it in the report
    os.environ.setdefault("CASA_WORKER_NAME", f"{os.uname().nodename}:{worker_pid}")


def run_here(src: str, dst: str) -> None:
    if sys.flags.no_site:  # a client started with -S: the analysis needs the environment's packages
        import site

        site.main()
    import pickle

    import cloudpickle

    with open(src, "rb") as f:
        fn, arg = pickle.load(f)
    data = cloudpickle.dumps(fn(arg), protocol=pickle.HIGHEST_PROTOCOL)
    with open(dst + ".part", "wb") as f:
        f.write(data)
    os.replace(dst + ".part", dst)


def _own_dir(path: str) -> bool:
    """Is ``path`` a real directory of ours that nobody else may enter (mode 700)? Creates it if missing."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _alive(alive: str) -> bool:
    """Does a server hold ``alive`` locked?"""
    with open(alive, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


# -- the Python client: find or start a server of this worker, hand it the task ------------------


def _start_server(directory: str, slot: int, worker_pid: int, lock: int) -> bool:
    """Start the server of ``slot`` and wait until it is up. It inherits the slot's lock (``lock``, the
    same open file, so the same lock) until it is up: if this task is aborted meanwhile, no other
    client takes the slot and starts a second server on it."""
    import subprocess

    alive = os.path.join(directory, f"{slot}.alive")
    with open(os.path.join(directory, f"{slot}.log"), "ab") as log:
        server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", directory, str(slot),
                                   str(worker_pid), str(lock)], stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=directory, pass_fds=(lock,))
    deadline = time.time() + START_S
    while not _alive(alive):
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            return False
        time.sleep(0.05)
    return True


def ask(directory: str, slot: int, src: str, dst: str) -> str:
    """Hand (cwd, src, dst) to the live server of ``slot``; its reply, or why there is none."""
    base = os.path.join(directory, str(slot))
    req = os.open(base + ".req", os.O_RDWR)
    both = os.open(base + ".rep", os.O_RDWR)  # never blocks, and then neither does opening the read end
    rep = os.open(base + ".rep", os.O_RDONLY)
    os.close(both)  # the server is the writer left: its death ends the file (else the .alive lock tells)
    try:
        rid = f"{os.getpid()}.{time.monotonic_ns()}"
        # one write; the leading newline ends any line a writer killed mid-way left behind
        os.write(req, b"\n" + "\t".join((rid, os.getcwd(), src, dst)).encode() + b"\n")
        data = b""
        while True:
            if not select.select([rep], [], [], POLL_S)[0]:
                if not _alive(base + ".alive"):
                    return "error the server died"
                continue
            got = os.read(rep, 65536)
            if not got:
                return "error the server died"
            data += got
            *lines, data = data.split(b"\n")
            for line in lines:
                got, _, reply = line.decode(errors="replace").partition(" ")
                if got == rid:  # else: a reply to a task aborted meanwhile
                    return reply
    finally:
        os.close(req)
        os.close(rep)


def run_on_server(src: str, dst: str, worker_pid: int) -> bool | None:
    """True/False: a server ran it (well or not); None: no server to be had, run it here."""
    key = os.environ.get("CASA_WQ_KEY") or server_key(sys.executable, os.environ.get("PYTHONPATH", ""))
    workspace = os.path.dirname(os.getcwd())  # <workdir>/worker-N-PID/t.ID: the worker's own directory
    directory = os.path.join(workspace, f"casa-{os.getuid()}-{worker_pid}-{key}")
    if not _own_dir(directory):
        print(f"casa_wq_worker: {directory} is not a private directory of ours", file=sys.stderr)
        return None
    for slot in range(SLOTS):
        lock = open(os.path.join(directory, f"{slot}.lock"), "a")  # held until this process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        up = _alive(os.path.join(directory, f"{slot}.alive"))
        if not up and not _start_server(directory, slot, worker_pid, lock.fileno()):
            return None
        try:
            reply = ask(directory, slot, src, dst)
        except OSError as exc:
            reply = f"error {exc}"
        if reply != "ok":
            print(f"casa_wq_worker: server {slot} answered {reply}", file=sys.stderr)
        return reply == "ok"
    return None


# -- the server -------------------------------------------------------------------------------------


def _worker_exit_waiter(worker_pid: int):
    """A function ``wait(seconds) -> bool``: has the worker exited (waiting up to ``seconds`` for it)?

    A pidfd becomes readable the moment the worker exits, even while it is an unreaped zombie, which
    ``kill(pid, 0)`` still finds; without pidfds (Linux < 5.3), a poll that also counts a zombie as gone.
    """
    try:
        pidfd = os.pidfd_open(worker_pid)
    except ProcessLookupError:
        return lambda seconds: True
    except (AttributeError, OSError):  # no pidfd_open here: poll
        def polled(seconds: float) -> bool:
            time.sleep(seconds)
            try:
                os.kill(worker_pid, 0)
                with open(f"/proc/{worker_pid}/stat", "rb") as f:
                    return f.read().rpartition(b")")[2].split()[0] == b"Z"
            except ProcessLookupError:
                return True
            except OSError:  # another user's worker, no /proc: alive as far as we can tell
                return False

        return polled
    return lambda seconds: bool(select.select([pidfd], [], [], seconds)[0])


def _watch(worker_pid: int, idle_since: list[float], slot_lock: str) -> None:
    """Exit with the worker, or when idle too long (and no client holds the slot: none is mid-request)."""
    worker_exited = _worker_exit_waiter(worker_pid)
    while True:
        if worker_exited(0.5):
            os._exit(0)
        if idle_since[0] and time.time() - idle_since[0] > IDLE_S:
            lock = open(slot_lock, "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            os._exit(0)  # holding the slot: its next client finds .alive free and starts another server


def _fifo(path: str) -> int:
    """A fresh FIFO at ``path`` (mode 600), opened read-write: opening it never blocks a client while we live."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR)


def _run_request(line: str) -> str:
    rid, cwd, src, dst = line.split("\t")
    try:
        os.chdir(cwd)
        run_here(src, dst)
        reply = "ok"
    except Exception as exc:  # run_batch never raises: this is unpickling or I/O
        reply = f"error {type(exc).__name__}: {exc}".replace("\n", " ")[:500]
    finally:
        os.chdir("/")
    return f"{rid} {reply}\n"


def serve(directory: str, slot: int, worker_pid: int, slot_lock: int = -1) -> None:
    import importlib
    import threading

    os.setpgid(0, 0)  # a task's abort kills its process group; we are not part of any task
    _worker_name(worker_pid)
    base = os.path.join(directory, str(slot))
    idle_since = [0.0]  # 0 while starting or busy
    threading.Thread(target=_watch, args=(worker_pid, idle_since, base + ".lock"), daemon=True).start()
    for module in PRELOAD:
        importlib.import_module(module)
    req, rep = _fifo(base + ".req"), _fifo(base + ".rep")
    alive = open(base + ".alive", "a")
    fcntl.flock(alive, fcntl.LOCK_EX)  # from here on clients see us up (the kernel drops it when we die)
    if slot_lock >= 0:
        os.close(slot_lock)  # up: the client that started us holds the slot alone now
    idle_since[0] = time.time()
    pending = b""
    while True:
        pending += os.read(req, 65536)
        *lines, pending = pending.split(b"\n")
        for line in lines:
            idle_since[0] = 0.0
            try:
                reply = _run_request(line.decode(errors="replace"))
            except ValueError:  # not a request line
                continue
            finally:
                idle_since[0] = time.time()
            os.write(rep, reply.encode())


def main(argv: list[str]) -> int:
    if len(argv) in (4, 5) and argv[0] == "--serve":
        serve(argv[1], int(argv[2]), int(argv[3]), *(int(a) for a in argv[4:]))
        return 0
    if len(argv) != 2:
        print("usage: casa_wq_worker.py IN OUT", file=sys.stderr)
        return 2
    linux = sys.platform.startswith("linux")
    worker = int(os.environ.get("CASA_WQ_WORKER_PID") or os.getppid())  # the task shell's $PPID
    if linux:
        _die_with_parent(worker)
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
