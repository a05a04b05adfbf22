"""What only the spark backend does: its options, Py4J's error text, a user's session, and a
standalone master + worker started here (whose executor JVM is killed mid-run).

What every backend does (local mode, local[2]) is in test_backend_contract.py. Every JVM and
Python worker is followed by PID and must be gone afterwards.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cloudpickle
import psutil
import pytest
from analysis import alive, check_worker_loss, require_engine, run, same, stop_procs
from test_backend_contract import SparkKit, jvm_pid

import casa_executors as ce
from casa_executors.errors import BackendUnavailable, ExecutorOptionError

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("spark")


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
    # Unix domain sockets between the JVM and its Python workers by default, which conf= may turn off
    unix = "spark.python.unix.domain.socket.enabled"
    assert ce.spark().backend._settings("x")[unix] == "true"
    assert ce.spark(conf={unix: False}).backend._settings("x")[unix] == "False"


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


# -- chunks per Spark task ---------------------------------------------------------------


def test_user_java_options_add_to_ours():
    """A user's spark.driver.extraJavaOptions come after ours (the JVM's last flag wins), ours kept."""
    from casa_executors.backends.spark import DRIVER_JVM_OPTIONS, SparkBackend

    mine = SparkBackend(master="local[1]")._settings("/x/log4j2.properties")["spark.driver.extraJavaOptions"]
    assert mine.split() == ["-Dlog4j2.configurationFile=file:/x/log4j2.properties", *DRIVER_JVM_OPTIONS]
    user = "-XX:TieredStopAtLevel=4 -XX:SharedArchiveFile=/x/spark.jsa"
    theirs = SparkBackend(master="local[1]", conf={"spark.driver.extraJavaOptions": user})._settings(
        "/x/log4j2.properties")["spark.driver.extraJavaOptions"]
    assert theirs == f"{mine} {user}"


def test_batch_size_amortises_spark_tasks_and_leaves_no_core_idle():
    from casa_executors.backends.spark import MAX_CHUNKS_PER_TASK, TASKS_PER_WORKER, SparkBackend

    # the scaling benchmark's 40 chunks on local[2]: a few tasks per core, not 40 Spark jobs
    assert SparkBackend(master="local[2]").batch_size(40) == math.ceil(40 / (TASKS_PER_WORKER * 2)) > 1
    assert SparkBackend(master="local[1]").batch_size(100_000) == MAX_CHUNKS_PER_TASK
    assert SparkBackend(master="local[2]").batch_size(8, "preprocessing") == 4  # files: one task per core
    for cores in range(1, 9):
        backend = SparkBackend(master=f"local[{cores}]")
        for n in range(1, 400):
            k = backend.batch_size(n)
            assert 1 <= k <= MAX_CHUNKS_PER_TASK
            assert math.ceil(n / k) >= min(n, cores), (cores, n, k)  # a task for every core


def test_chunks_share_spark_jobs(sample_files, reference, no_leftover_processes):
    """12 chunks on local[2] run as a few Spark jobs of several chunks, 3 files' metadata as 2 (one job per item
    with chunks_per_task=1),
    with the same output, one attempt per chunk and a report row per chunk."""
    ex = ce.spark(master="local[2]", status=False)
    backend = ex.backend
    backend.hold()
    try:
        tracker = backend._sc.statusTracker()

        def jobs(executor: ce.Driver) -> int:
            before, chunk_jobs = len(tracker.getJobIdsForGroup(backend._group)), backend.jobs["run_batch"]
            assert same(run(executor, sample_files), reference)
            s = executor.report.summary()
            assert s["processed"] == s["attempts"] == s["chunks"] == 12
            assert len(tracker.getJobIdsForGroup(backend._group)) - before == sum(backend.jobs.values()) - sum(
                counted.values())
            counted.update(backend.jobs)
            return backend.jobs["run_batch"] - chunk_jobs

        counted: Counter[str] = Counter(backend.jobs)
        batched = jobs(ex)
        one_each = jobs(ce.Driver(backend=backend, status=False, chunks_per_task=1))
        # 8 jobs fewer for the chunks, and the 3 files' metadata in 2 jobs (one per core), not 3
        assert one_each - batched == (12 - math.ceil(12 / backend.batch_size(12))) + (3 - 2)
        rows = ex.report.processing.rows
        by_worker: dict[str, list[int]] = {}
        for r in rows:
            by_worker.setdefault(r.worker, []).append(r.index)
        assert max(len(v) for v in by_worker.values()) >= 3  # a task's chunks ran in one Python worker
    finally:
        backend.release()
    assert jvm_pid() is None


def test_merges_ready_together_are_one_spark_job(no_leftover_processes):
    """A job costs the JVM a scheduling round trip and ~15 ms of CPU: short tasks ready together
    (the driver's merges) share one, each still with its own future."""
    ex = ce.spark(master="local[2]", status=False)
    backend = ex.backend
    backend.hold()
    try:
        tracker = backend._sc.statusTracker()
        before = len(tracker.getJobIdsForGroup(backend._group))
        assert backend._sc.getConf().get("spark.python.unix.domain.socket.enabled") == "true"
        assert "-XX:TieredStopAtLevel=1" in cmdline(jvm_pid())  # the driver JVM got our flags
        futures = backend.submit_together(abs, [-1, -2, -3])
        assert [f.result(timeout=120) for f in futures] == [1, 2, 3]
        assert len(tracker.getJobIdsForGroup(backend._group)) - before == 1
        failing = backend.submit_together(math.sqrt, [4, "x"])  # a task that raises fails its job: both
        assert all(f.exception(timeout=120) is not None for f in failing)
    finally:
        backend.release()
    assert jvm_pid() is None


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
            left = stop_procs([p.pid for p in started[1:]]) + stop_procs([p.pid for p in started[:1]])
            left += stop_procs(sorted(seen), grace=5)
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

    def test_existing_session_is_used_not_stopped(self, cluster, sample_files, reference):
        from pyspark.sql import SparkSession

        session = SparkSession(cluster["backend"]._sc)  # a user's session on that SparkContext
        ex = ce.spark(session=session, status=False)
        assert same(run(ex, sample_files), reference)
        assert session.sparkContext._jsc is not None  # still running
        assert session.sparkContext.parallelize([1, 2]).sum() == 3
        with pytest.raises(BackendUnavailable, match="already running"):
            ce.spark(master="local[1]", status=False).backend.start()

    def test_executor_loss(self, cluster, sample_files, reference, tmp_path, monkeypatch):
        seen = cluster["seen"]

        def executor_jvm(busy: list[int]) -> list[psutil.Process]:
            pids = tree(cluster["worker"].pid)
            seen.update(pids)
            return [psutil.Process(p) for p in pids
                    if any(a.endswith(".CoarseGrainedExecutorBackend") for a in cmdline(p))]

        ex = ce.Driver(backend=cluster["backend"], status=False, retries=2, chunks_per_task=2)  # done chunks to see
        info = check_worker_loss(ex, sample_files, reference, tmp_path, monkeypatch, executor_jvm,
                                 SparkKit.lost_prefix)
        print("spark standalone: executor JVM killed:", info)
        assert all(not alive(p) for p in info["killed"])
