"""The workqueue backend on real work_queue_worker processes: local workers, and port= with a worker
started here. Every worker (and the task processes under it) is stopped by PID and must be gone
afterwards; worker loss is a SIGKILL to the work_queue_worker running a chunk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import psutil
import pytest
from analysis import (
    Busy,
    Failing,
    alive,
    assert_adl_identical,
    attempts,
    record_lost_attempts,
    require_engine,
    run,
    same,
)
from coffea.util import _exception_chain

import casa_executors as ce
from casa_executors.errors import ChunkError, ExecutorOptionError

REPO = Path(__file__).resolve().parents[1]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("workqueue")


def sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:  # gone meanwhile
        return None


def in_sessions(sids: set[int]) -> list[int]:
    """Live processes in the sessions of ``sids`` (a worker and its tasks and servers)."""
    return [p.pid for p in psutil.process_iter() if p.pid != os.getpid() and sid(p.pid) in sids and alive(p.pid)]


def listening_on(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def check_worker_loss(ex, files, reference, tmp_path, monkeypatch, pick: Callable[[list[int]], list[int]]) -> dict:
    """SIGKILL ``pick(PIDs running a chunk now)`` once 2 chunks are done; the output must not change."""
    lost = record_lost_attempts(monkeypatch)
    log, busy = str(tmp_path / "attempts.log"), tmp_path / "busy"
    open(log, "w").close()
    busy.mkdir()
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            p = ex.report.processing
            ok = sum(r.status == "ok" for r in p.rows) if p is not None else 0
            if p is not None and ok >= len(p.rows):
                return
            running = [int(m.name) for m in busy.iterdir() if alive(int(m.name))]
            if ok >= 2 and (pids := pick(running)):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(pids)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    t0 = time.time()
    thread.start()
    out = run(ex, files, Busy(log, str(busy)), chunksize=100)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert same(out, reference)  # nothing lost, nothing counted twice
    rows = ex.report.rows()
    s = ex.report.summary()
    assert all(r.status == "ok" for r in rows) and s["processed"] == s["chunks"] == 30
    assert sum(r.events for r in rows) == 3000
    assert s["attempts"] > s["chunks"]  # the driver attempted the lost chunks again
    tries = attempts(log)
    assert len(tries) == 30 and max(tries.values()) >= 2
    assert lost and all(m.startswith("WorkerLost: workqueue: lost the worker running task") for m in lost), lost
    return {"wall_s": round(time.time() - t0, 1), "attempts": s["attempts"], "errors": sorted(set(lost)),
            "killed": killed,
            "retried": [(r.index, r.attempts) for r in rows if r.attempts > 1]}


# -- options and imports ---------------------------------------------------------------------


def test_options_are_checked():
    with pytest.raises(ExecutorOptionError, match="port must be a TCP port"):
        ce.workqueue(port=70000)
    with pytest.raises(ExecutorOptionError, match="python must be a non-empty string"):
        ce.workqueue(python="")
    with pytest.raises(ExecutorOptionError, match="host must be an IPv4 address"):
        ce.workqueue(host="localhost")
    with pytest.raises(ExecutorOptionError, match="workers must be a whole number"):
        ce.workqueue(workers=0)
    with pytest.raises(ExecutorOptionError, match="did you mean 'password'"):
        ce.workqueue(pasword="x")
    with pytest.raises(ExecutorOptionError, match="warm must be True or False"):
        ce.workqueue(warm="yes")
    b = ce.workqueue(workers=2).backend
    assert b.workers == 2 and b.batch_size(40) == 5 and b.batch_size(3) == 1
    assert ce.workqueue(port=9123).backend.workers == 1  # none connected yet


def test_unavailable_names_what_is_missing(monkeypatch):
    from casa_executors.backends.workqueue import backend as workqueue

    assert workqueue.WorkQueueBackend.unavailable() is None
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "work_queue_worker" in workqueue.WorkQueueBackend.unavailable()
    monkeypatch.setattr(workqueue, "import_work_queue", lambda: (_ for _ in ()).throw(ImportError("gone")))
    assert "Python module (gone)" in workqueue.WorkQueueBackend.unavailable()


def test_debian_module_is_loaded_alone():
    """From a fresh interpreter without ndcctools: work_queue comes from dist-packages, alone."""
    code = textwrap.dedent("""
        import sys
        sys.modules["ndcctools"] = None  # as if not installed (it is not, here)
        from casa_executors.backends.workqueue import DIST_PACKAGES, import_work_queue
        wq = import_work_queue()
        assert wq.__file__ == DIST_PACKAGES + "/work_queue.py", wq.__file__
        assert DIST_PACKAGES not in sys.path
        import numpy
        assert "dist-packages" not in numpy.__file__
        print("ok", wq.__name__)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok work_queue", out.stderr


def test_ndcctools_work_queue_is_preferred(tmp_path, monkeypatch, sample_files, reference):
    """ndcctools is not installable here (conda only): a stand-in package wrapping Debian's module
    checks that ndcctools.work_queue is the one used, end to end."""
    pkg = tmp_path / "ndcctools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "work_queue.py").write_text(textwrap.dedent("""
        import sys
        from casa_executors.backends.workqueue.discovery import DIST_PACKAGES, _load_alone
        _wq = sys.modules.get("work_queue") or _load_alone(DIST_PACKAGES)
        globals().update({k: v for k, v in vars(_wq).items() if not k.startswith("__")})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("ndcctools")]:
        monkeypatch.delitem(sys.modules, name)
    from casa_executors.backends.workqueue import import_work_queue

    assert import_work_queue().__name__ == "ndcctools.work_queue"
    ex = ce.workqueue(workers=1, status=False)
    assert same(run(ex, sample_files[:1]), run(ce.iterative(status=False), sample_files[:1]))
    assert ex.report.summary()["attempts"] == 4


def touch(path: str) -> list:
    open(path, "w").close()
    return []


def test_warm_server_serves_only_its_own_user(tmp_path):
    """The server unpickles what a client names: a process of another user gets nothing run."""
    if os.getuid() != 0:  # CI runs as root
        pytest.skip("needs root, to be another user")
    from casa_executors.backends.workqueue import worker as wq_task

    tmp_path.chmod(0o777)
    (tmp_path / "in.pkl").write_bytes(cloudpickle.dumps((touch, str(tmp_path / "ran"))))
    name = f"casa-test-{os.getpid()}"
    server = subprocess.Popen([sys.executable, wq_task.__file__, "--serve", name, str(os.getpid())],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    client = textwrap.dedent(f"""
        import socket, sys, time
        for _ in range(600):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect("\\0{name}")
                break
            except OSError:
                time.sleep(0.1)
        try:
            s.sendall(b"{tmp_path}\\t{tmp_path}/in.pkl\\t{tmp_path}/out.pkl\\n")
            reply = s.recv(100)
        except ConnectionResetError:
            reply = b""
        print(reply.decode().strip() or "(closed)")
    """)
    try:
        as_nobody = subprocess.run(["/usr/bin/python3", "-c", client], capture_output=True, text=True,
                                   timeout=90, user=65534, group=65534, env={})
        assert as_nobody.stdout.strip() == "(closed)", as_nobody.stderr
        assert not (tmp_path / "ran").exists()
        as_us = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=90)
        assert as_us.stdout.strip() == "ok" and (tmp_path / "ran").exists(), as_us.stderr
    finally:
        server.kill()
        server.wait(10)


# -- two local workers for the module ----------------------------------------------------------


@pytest.fixture(scope="module")
def local():
    ex = ce.workqueue(workers=2, status=False)
    ex.backend.hold()
    seen = set(ex.backend.worker_pids())
    try:
        yield ex.backend, seen
    finally:
        seen.update(ex.backend.worker_pids())
        ex.backend.release()
        time.sleep(0.3)
        left = [p for p in seen if alive(p)] + in_sessions(seen)  # workers, tasks, warm servers
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes left behind: {left}"


def test_local_workers_match_iterative(local, sample_files, reference):
    backend, _ = local
    assert listening_on(backend.port) == {"127.0.0.1"}  # not 0.0.0.0, though Work Queue has no option
    ex = ce.Driver(backend=backend, status=False)
    assert same(run(ex, sample_files), reference)
    rows = ex.report.rows()
    assert len(rows) == 12 and all(r.status == "ok" and r.attempts == 1 for r in rows)
    assert {r.worker.rsplit(":", 1)[1] for r in rows} <= {str(p) for p in backend.worker_pids()}
    assert ex.report.preprocessing is not None and len(ex.report.preprocessing.rows) == 3


def test_adl_queries_bit_identical(local, sample_files):
    assert_adl_identical(local[0], sample_files, chunksize=300, chunks_per_task=6)


def test_processor_exception_keeps_its_type(local, sample_files, tmp_path):
    ex = ce.Driver(backend=local[0], status=False, retries=1)
    with pytest.raises(ChunkError) as err:
        run(ex, sample_files[:1], Failing(str(tmp_path / "log"), bad_starts={250}))
    assert any(isinstance(c, ZeroDivisionError) for c in _exception_chain(err.value.__cause__))
    failed = ex.report.failures()
    assert failed and all(r.attempts == 2 and r.error_type != "WorkerLost" for r in failed)


def test_cold_tasks_match_iterative(sample_files, reference, no_leftover_processes):
    """warm=False: every task a fresh interpreter (no per-worker server)."""
    ex = ce.workqueue(workers=2, warm=False, status=False)
    assert same(run(ex, sample_files), reference)
    assert ex.report.summary()["attempts"] == 12


def test_broken_task_is_worker_lost(sample_files):
    """A task whose interpreter cannot start reaches the driver as WorkerLost, with the reason."""
    ex = ce.workqueue(workers=1, python="/nonexistent/python", status=False, retries=0)
    with pytest.raises(ChunkError, match="WorkerLost") as err:
        run(ex, sample_files[:1])
    assert "/nonexistent/python" in str(err.value.__cause__)
    assert ex.report.failed_files() and ex.backend._staging is None


def test_local_worker_loss(local, sample_files, reference, tmp_path, monkeypatch):
    backend, seen = local
    resent = backend.resent

    def worker_running_a_chunk(busy: list[int]) -> list[int]:
        workers = backend.worker_pids()
        seen.update(workers)
        return [s for s in map(sid, busy) if s in workers][:1]  # local workers lead a session

    ex = ce.Driver(backend=backend, status=False, retries=2)
    info = check_worker_loss(ex, sample_files, reference, tmp_path, monkeypatch, worker_running_a_chunk)
    print("workqueue local worker loss:", info, "resent:", backend.resent - resent)
    assert backend.resent > resent  # Work Queue wanted to re-send it; the driver did instead
    assert len(backend.worker_pids()) == 2 and not set(info["killed"]) & set(backend.worker_pids())
    seen.update(backend.worker_pids())
    time.sleep(1)
    assert not in_sessions(set(info["killed"]))  # its task and its warm server went with it


# -- port=: the manager only, a worker started here --------------------------------------------


def test_port_with_external_worker(sample_files, reference, tmp_path, no_leftover_processes):
    ex = ce.workqueue(port=0, password="s3cret", status=False)
    (tmp_path / "pw").write_text("s3cret")
    with ex:
        port = ex.backend.port
        assert port > 0 and listening_on(port) == {"127.0.0.1"} and ex.backend.worker_pids() == []
        worker = subprocess.Popen(
            ["work_queue_worker", "--cores", "1", "--single-shot", "--connect-timeout", "30",
             "--password", str(tmp_path / "pw"), "--workdir", str(tmp_path), "127.0.0.1", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert ex.backend.wait_for_workers(1, timeout=30) == 1
            assert same(run(ex, sample_files), reference)
            assert ex.report.processing.workers == 1
            assert {r.worker for r in ex.report.rows()} == {f"{os.uname().nodename}:{worker.pid}"}
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
            deadline = time.time() + 5  # its warm server follows it within a second
            while in_sessions({worker.pid}) and time.time() < deadline:
                time.sleep(0.1)
            assert not in_sessions({worker.pid})
