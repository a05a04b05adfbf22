"""The Work Queue warm server's protocol, driven through the real server and the real shell client,
with the interleavings that once lost a reply forced by hooks (a FIFO the task blocks on, SIGSTOP of the
client at a known system call) instead of by luck.
"""

from __future__ import annotations

import fcntl
import os
import platform
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import cloudpickle
import pytest
from analysis import require_engine

from casa_executors.backends.workqueue import worker as wq_task

REPO = Path(__file__).resolve().parents[1]
KEY = "testkey"
PSELECT6 = {"x86_64": 270, "aarch64": 72}  # the system call bash's `read -t` waits in


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("workqueue")
    if not sys.platform.startswith("linux"):
        pytest.skip("the warm server is Linux-only")


def wait_for(condition, what: str, timeout: float = 90.0) -> None:
    """Poll ``condition`` (a state of another process, not a delay) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def start_server(tmp_path):
    """Starts a real warm server on slot 0 of a worker of PID ``worker_pid``: (its directory, the task
    sandbox beside it, the server's Popen). Killed at the end."""
    started = []

    def start(worker_pid: int):
        workspace = tmp_path / "worker-1"
        sandbox = workspace / "t.1"
        sandbox.mkdir(parents=True)
        directory = workspace / f"casa-{os.getuid()}-{worker_pid}-{KEY}"
        assert wq_task._own_dir(str(directory))
        proc = subprocess.Popen([sys.executable, wq_task.__file__, "--serve", str(directory), "0", str(worker_pid)],
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        started.append(proc)
        wait_for(lambda: proc.poll() is not None or wq_task._alive(str(directory / "0.alive")), "the server to be up")
        assert proc.poll() is None, "the server exited at start"
        return directory, sandbox, proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(30)


@pytest.fixture
def server(start_server):
    """A real warm server of a worker whose PID is ours: (its directory, the task sandbox)."""
    directory, sandbox, _ = start_server(os.getpid())
    return directory, sandbox


def shell_client(sandbox: Path, worker_pid: int) -> subprocess.Popen:
    """The real shell client, as a task's command runs it, handing in.pkl to the server."""
    return subprocess.Popen(["bash", "-c", wq_task.SHELL_CLIENT, "bash", str(worker_pid), "in.pkl", "out.pkl"],
                            cwd=sandbox, env=dict(os.environ, CASA_WQ_KEY=KEY), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def blocking_task(sandbox: Path) -> Path:
    """in.pkl: a task that blocks until the returned FIFO is written and closed, and returns what was written."""
    gate = sandbox / "gate"
    os.mkfifo(gate)
    (sandbox / "in.pkl").write_bytes(cloudpickle.dumps((Path.read_bytes, gate)))
    return gate


def open_gate(gate: Path) -> int | None:
    """The gate's write end once the task has it open (the server is running the task), else None."""
    try:
        return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader yet
        return None


def in_syscall(pid: int, number: int) -> bool:
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(number)
    except (OSError, IndexError):
        return False


def pending_bytes(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def test_a_reply_that_arrives_as_the_shell_clients_read_times_out_is_not_lost(server):
    """bash's `read -t` checks its deadline before each byte it takes from a pipe: a reply that comes when
    the deadline is (nearly) due was cut after its first byte, the rest read as a line of another ID, and
    the client waited forever for its reply while the server waited for the next request (seen under CPU
    stress: a Slurm Work Queue test hung 8 min). Forced here: the client is stopped in its wait, the
    server replies, the deadline passes, the client resumes with the whole reply in the pipe."""
    if platform.machine() not in PSELECT6:
        pytest.skip(f"no pselect6 number known for {platform.machine()}")
    directory, sandbox = server
    gate = blocking_task(sandbox)
    client = shell_client(sandbox, os.getpid())
    rep = os.open(directory / "0.rep", os.O_RDWR | os.O_NONBLOCK)  # to see the reply arrive, never to read it
    writer = -1
    try:
        def gate_open() -> bool:
            nonlocal writer
            writer = open_gate(gate) or -1
            return writer >= 0

        wait_for(gate_open, "the server to run the task")
        wait_for(lambda: in_syscall(client.pid, PSELECT6[platform.machine()]), "the client to wait for its reply")
        os.kill(client.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        os.write(writer, b"go")
        os.close(writer)
        writer = -1
        wait_for(lambda: pending_bytes(rep) > 0, "the server's reply")
        # the client's read began before it was stopped: its deadline passes while it is stopped
        time.sleep(max(0.0, stopped + wq_task.POLL_S + 0.2 - time.monotonic()))
        os.kill(client.pid, signal.SIGCONT)
        try:
            _, err = client.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the shell client lost its reply and waits forever")
        assert client.returncode == 0, err.decode()
        assert cloudpickle.loads((sandbox / "out.pkl").read_bytes()) == b"go"
        assert pending_bytes(rep) == 0
    finally:
        if writer >= 0:
            os.close(writer)
        os.close(rep)
        if client.poll() is None:
            os.kill(client.pid, signal.SIGCONT)
            client.kill()
            client.wait(30)


def test_the_server_and_its_client_go_as_soon_as_the_worker_does(start_server):
    """The worker is SIGKILLed while its server runs a task for the shell client: the server exits at
    once, even though the worker is an unreaped zombie (``kill(pid, 0)`` finds it: the server used to
    poll that, and lived on until the zombie was reaped), and the client with it (its reply FIFO ends)."""
    worker = subprocess.Popen(["sleep", "600"])
    try:
        directory, sandbox, server = start_server(worker.pid)
        gate = blocking_task(sandbox)
        client = shell_client(sandbox, worker.pid)
        try:
            wait_for(lambda: open_gate(gate) is not None, "the server to run the task")
            os.kill(worker.pid, signal.SIGKILL)  # and not reaped until the end
            wait_for(lambda: Path(f"/proc/{worker.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
                     "the worker to be a zombie")
            server.wait(60)  # a failure bound only: the server exits on the worker's exit, whatever the time
            _, err = client.communicate(timeout=60)
            assert client.returncode == 1 and b"server 0 died" in err, err.decode()
            assert not wq_task._alive(str(directory / "0.alive"))
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(30)
    finally:
        worker.kill()
        worker.wait(30)
