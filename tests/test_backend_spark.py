"""The spark backend on real JVMs: local mode, and a standalone master + worker started here.

Only one SparkContext can live in a process, so each engine is a class-scoped
fixture (stopped before the next class starts). Every JVM and Python worker
is followed by PID and must be gone afterwards; worker loss is a SIGKILL to
the Python workers (local mode) or to the executor JVM (standalone).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
from casa_executors.errors import BackendUnavailable, ChunkError, ExecutorOptionError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("spark")


def stop_pids(pids: list[int], timeout: float = 15) -> list[int]:
    """SIGTERM, wait, then SIGKILL each PID; return those still alive after that."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    return [p for p in pids if alive(p)]


def tree(pid: int) -> list[int]:
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:  # gone meanwhile
        return []


def jvm_pid() -> int | None:
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    return proc.pid if proc is not None else None


def kill_when_running(ex, pick: Callable[[], list[int]], min_ok: int = 2, timeout: float = 120) -> threading.Thread:
    """A thread that SIGKILLs ``pick()`` once processing has ``min_ok`` chunks done and more to go."""

    def body() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = ex.report.processing
            ok = sum(r.status == "ok" for r in p.rows) if p is not None else 0
            if p is not None and ok >= len(p.rows):
                return  # too late
            if ok >= min_ok and (pids := pick()):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                thread.killed = pids
                return
            time.sleep(0.05)

    thread = threading.Thread(target=body, daemon=True)
    thread.killed = []
    thread.start()
    return thread


def busy_pids(busy: Path) -> list[int]:
    return [int(p.name) for p in busy.iterdir() if alive(int(p.name))]


def check_worker_loss(ex, files, reference, tmp_path, monkeypatch, pick: Callable[[list[int]], list[int]]) -> dict:
    """Kill ``pick(PIDs running a chunk now)`` mid-run; the output must not change."""
    lost = record_lost_attempts(monkeypatch)
    log, busy = str(tmp_path / "attempts.log"), tmp_path / "busy"
    open(log, "w").close()
    busy.mkdir()
    t0 = time.time()
    killer = kill_when_running(ex, lambda: pick(busy_pids(busy)))
    out = run(ex, files, Busy(log, str(busy)), chunksize=100)
    killer.join()
    assert killer.killed, "the run ended before anything could be killed"
    assert same(out, reference)  # nothing lost, nothing counted twice
    rows = ex.report.rows()
    s = ex.report.summary()
    assert all(r.status == "ok" for r in rows) and s["processed"] == s["chunks"] == 30
    assert sum(r.events for r in rows) == 3000
    assert s["attempts"] > s["chunks"]  # the lost ones were attempted again, by the driver
    tries = attempts(log)
    assert len(tries) == 30 and max(tries.values()) >= 2
    assert lost and all(m.startswith("WorkerLost: spark lost the task") for m in lost), lost
    return {"wall_s": round(time.time() - t0, 1), "attempts": s["attempts"], "errors": sorted(set(lost)),
            "killed": killer.killed,
            "retried": [(r.index, r.attempts) for r in rows if r.attempts > 1]}


# -- options -------------------------------------------------------------------------


def test_options_are_checked():
    with pytest.raises(ExecutorOptionError, match="not both"):
        ce.spark(master="local[1]", session=object())
    with pytest.raises(ExecutorOptionError, match="master must be a string"):
        ce.spark(master=2)
    with pytest.raises(ExecutorOptionError, match="Spark Connect has no RDD API"):
        ce.spark(session=object())
    with pytest.raises(ExecutorOptionError, match="maxFailures stays 1"):
        ce.spark(conf={"spark.task.maxFailures": 4})
    with pytest.raises(ExecutorOptionError, match=r"local\[2,3\] retries each task 3 times"):
        ce.spark(master="local[2,3]")
    with pytest.raises(ExecutorOptionError, match="workers must be a whole number"):
        ce.spark(workers=0)
    with pytest.raises(ExecutorOptionError, match="did you mean 'master'"):
        ce.spark(mastr="local[1]")
    assert ce.spark(master="local[3]").backend.workers == 3
    assert ce.spark(workers=2).backend._master == "local[2]"


def test_unavailable_names_what_is_missing(monkeypatch):
    import sys

    from casa_executors.backends.spark import SparkBackend

    assert SparkBackend.unavailable() is None
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert "Java" in SparkBackend.unavailable()
    monkeypatch.setitem(sys.modules, "pyspark", None)
    assert "pyspark" in SparkBackend.unavailable()


def test_short_message_of_a_lost_task():
    from casa_executors.backends.spark import short_message

    text = ("Job aborted due to stage failure: Task 0 in stage 5.0 failed 1 times, most recent failure: Lost task "
            "0.0 in stage 5.0 (TID 5) (localhost executor driver): org.apache.spark.SparkException: Python worker "
            "exited unexpectedly (crashed). Consider setting 'spark.python.worker.faulthandler.enabled'\n\tat x.y")
    assert short_message(Exception(text)) == (
        "Lost task 0.0 in stage 5.0 (TID 5) (localhost executor driver): Python worker exited unexpectedly (crashed).")


def test_owned_context_and_jvm_are_stopped(sample_files, reference, no_leftover_processes):
    ex = ce.spark(master="local[2]", status=False)
    out = run(ex, sample_files)
    assert same(out, reference)
    assert ex.backend._sc is None and jvm_pid() is None  # stopped after the call, JVM included
    s = ex.report.summary()
    assert s["processed"] == s["attempts"] == 12 and ex.report.processing.workers == 2


# -- local mode, one JVM for the class -------------------------------------------------------


class TestLocal:
    @pytest.fixture(scope="class")
    def local(self):
        ex = ce.spark(master="local[2]", status=False)
        ex.backend.hold()
        pid = jvm_pid()
        seen = set(tree(pid))
        try:
            yield ex.backend, seen
        finally:
            seen.update(tree(pid))
            ex.backend.release()
            assert jvm_pid() is None
            left = stop_pids(sorted(seen), timeout=5)
            assert not left, f"JVM or Python workers left behind: {left}"

    def test_matches_iterative(self, local, sample_files, reference):
        ex = ce.Driver(backend=local[0], status=False)
        assert same(run(ex, sample_files), reference)
        rows = ex.report.rows()
        assert len(rows) == 12 and all(r.status == "ok" and r.attempts == 1 for r in rows)
        assert all(str(os.getpid()) not in r.worker for r in rows)  # ran in Spark's Python workers
        assert ex.report.preprocessing is not None and all(r.status == "ok" for r in ex.report.preprocessing.rows)

    def test_adl_queries_bit_identical(self, local, sample_files):
        assert_adl_identical(local[0], sample_files, chunksize=300)

    def test_processor_exception_keeps_its_type(self, local, sample_files, tmp_path):
        ex = ce.Driver(backend=local[0], status=False, retries=1)
        with pytest.raises(ChunkError) as err:
            run(ex, sample_files, Failing(str(tmp_path / "log"), bad_starts={250}))
        chain = _exception_chain(err.value.__cause__)
        assert any(isinstance(c, ZeroDivisionError) for c in chain), chain
        assert "ZeroDivisionError: planted failure" in str(err.value)
        assert not any("Py4J" in f"{type(c).__name__}{c}" for c in chain)
        failed = ex.report.failures()
        assert failed and all(r.attempts == 2 and r.error_type != "WorkerLost" for r in failed)

    def test_existing_session_is_used_not_stopped(self, local, sample_files, reference):
        session = local[0]._session
        ex = ce.spark(session=session, status=False)
        assert same(run(ex, sample_files), reference)
        assert session.sparkContext._jsc is not None  # still running
        assert session.sparkContext.parallelize([1, 2]).sum() == 3
        with pytest.raises(BackendUnavailable, match="already running"):
            ce.spark(master="local[1]", status=False).backend.start()

    def test_python_worker_loss(self, local, sample_files, reference, tmp_path, monkeypatch):
        backend, seen = local

        def python_worker(busy: list[int]) -> list[int]:
            pids = backend.executor_pids()
            seen.update(pids)
            return [p for p in busy if p in pids][:1]  # one Python worker in the middle of a chunk

        ex = ce.Driver(backend=backend, status=False, retries=2)
        info = check_worker_loss(ex, sample_files, reference, tmp_path, monkeypatch, python_worker)
        print("spark local: python workers killed:", info)


# -- a standalone master and worker, started here -----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class TestStandalone:
    @pytest.fixture(scope="class")
    def cluster(self, tmp_path_factory):
        import pyspark

        home = Path(pyspark.__file__).parent
        tmp = tmp_path_factory.mktemp("spark-standalone")
        env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(tmp),
                   SPARK_WORKER_DIR=str(tmp / "work"), SPARK_DAEMON_MEMORY="256m", SPARK_NO_DAEMONIZE="1",
                   SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")
        started: list[subprocess.Popen] = []
        seen: set[int] = set()

        def start(cls: str, *args: str) -> subprocess.Popen:
            with open(tmp / f"{cls.rsplit('.', 1)[-1]}.log", "w") as log:
                p = subprocess.Popen([str(home / "bin" / "spark-class"), cls, *args], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            started.append(p)
            return p

        port = free_port()
        try:
            start("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                  "--webui-port", "0")
            deadline = time.time() + 60
            while not listening(port):
                assert time.time() < deadline and started[0].poll() is None, (tmp / "Master.log").read_text()
                time.sleep(0.2)
            worker = start("org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}", "--host",
                           "127.0.0.1", "--cores", "2", "--memory", "2g", "--webui-port", "0")
            while "Successfully registered with master" not in (tmp / "Worker.log").read_text():
                assert time.time() < deadline and worker.poll() is None, (tmp / "Worker.log").read_text()
                time.sleep(0.2)
            ex = ce.spark(master=f"spark://127.0.0.1:{port}", status=False)
            ex.backend.hold()
            try:
                for p in started:
                    seen.update(tree(p.pid))
                yield {"backend": ex.backend, "worker": worker, "seen": seen, "tmp": tmp, "started": started}
            finally:
                ex.backend.release()
        finally:
            for p in started:
                seen.update(tree(p.pid))
            # the worker first (it stops its executors), then the master, then anything seen below them
            left = stop_pids([p.pid for p in started[1:]]) + stop_pids([p.pid for p in started[:1]])
            left += stop_pids(sorted(seen), timeout=5)
            for p in started:
                p.wait(5)
            assert not left, f"processes left behind: {left}"

    def test_listens_on_loopback_only(self, cluster):
        pids = set()
        for p in cluster["started"]:
            pids.update(tree(p.pid))
        pids.add(os.getpid())
        for pid in [*pids, jvm_pid()]:
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    assert c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), (pid, c.laddr)

    def test_cluster_matches_iterative(self, cluster, sample_files, reference):
        ex = ce.Driver(backend=cluster["backend"], status=False)
        assert same(run(ex, sample_files), reference)
        s = ex.report.summary()
        assert s["processed"] == s["attempts"] == 12
        assert ex.report.processing.workers == 2  # the worker's 2 cores

    def test_executor_loss(self, cluster, sample_files, reference, tmp_path, monkeypatch):
        seen = cluster["seen"]

        def executors(busy: list[int]) -> list[int]:
            pids = tree(cluster["worker"].pid)
            seen.update(pids)
            if not busy:
                return []
            return [p for p in pids if any(a.endswith(".CoarseGrainedExecutorBackend") for a in cmdline(p))]

        ex = ce.Driver(backend=cluster["backend"], status=False, retries=2)
        info = check_worker_loss(ex, sample_files, reference, tmp_path, monkeypatch, executors)
        print("spark standalone: executor JVM killed:", info)
        assert all(not alive(p) for p in info["killed"])
