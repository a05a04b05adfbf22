"""Spark: every task is its own one-partition Spark job, run from a small thread pool.

A Spark task costs far more than a chunk of a light query: one one-partition job took
~20 ms of the JVM's CPU once its JIT was warm (~60 ms before), and 30-60 ms of hand-offs
between JVM threads and the Python worker on a busy 2-core machine, against ~25 ms for a
100k-event chunk of ADL Q1 (docs/spark.md). So a task carries several chunks
(``batch_size``): about ``TASKS_PER_WORKER`` tasks per core and phase, consecutive chunks
(one file's, mostly), each task still its own job with its own future.

The driver retries, so Spark must not: ``spark.task.maxFailures=1``. A task
whose Python worker or executor dies fails its job with a ``Py4JJavaError``,
which becomes :class:`WorkerLost` with a one-line message. The analysis's own
exceptions never take that path: ``run_batch`` returns them as data, so the
user sees the original exception type, not Java text.

With ``master=`` we own the SparkContext and its JVM, and stop both (the JVM
by PID) when the backend stops; a ``session=`` given to us is only used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from casa_executors import procs
from casa_executors.backends.base import Backend, default_workers, plural, worker_pythonpath
from casa_executors.errors import BackendUnavailable, ExecutorOptionError, WorkerLost

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
POOL_THREADS = 64  # an upper bound; threads start on demand, the driver limits what is in flight
# Spark tasks per core and phase: fewer pay less of Spark's per-task cost, more leave a shorter tail
# (equal tasks on cores that drift apart). 1 and 2 were even while every merge was a job; with tasks
# merging their whole nodes and the end's merges in one job, 1 did better than 2 on ADL Q1/Q6/Q8 by
# 0.09-0.15 in efficiency (one wave boundary less: 100-200 ms here; docs/spark.md)
TASKS_PER_WORKER = 1
# chunks one task carries at most: what a lost executor costs, and the progress bar's step; at
# 32 a chunk pays ~1-2 ms of Spark's per-task cost
MAX_CHUNKS_PER_TASK = 32
LOG4J2 = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
"""
# Spark's default carries every hand-off between the JVM and its Python workers (the task, its result,
# collect's) over loopback TCP: a one-partition job took ~110 ms here, ~40 ms of it before the Python
# worker started; over Unix domain sockets (Spark >= 4.1) ~70 ms, and ADL Q1's median run 0.93 -> 0.72 s
# (docs/spark.md). A default: conf= may turn it off
DEFAULTS = {"spark.python.unix.domain.socket.enabled": "true"}
# the driver JVM's flags (a user's spark.driver.extraJavaOptions come after them: the last of a flag
# wins). The driver JVM schedules and moves bytes, the work is in the Python workers: C1 alone (no C2)
# halved the JVM's launch and SparkContext's init on a loaded machine (even when idle), with the same
# JVM CPU per job (docs/spark.md)
DRIVER_JVM_OPTIONS = ["-XX:TieredStopAtLevel=1"]
# ours to set: a user conf= may not change these
FIXED = {"spark.task.maxFailures": "1"}


def _local_cores(master: str) -> int | None:
    """N of ``local[N]`` (``local[N,F]`` retries each task F times: only F = 1 is accepted)."""
    m = re.fullmatch(r"local(?:\[(\d+|\*)(?:,(\d+))?\])?", master)
    if m is None:
        return None
    if m.group(2) not in (None, "1"):
        raise ExecutorOptionError(f"spark: {master} retries each task {m.group(2)} times; the driver retries "
                                  f"(use retries=), so give local[{m.group(1)}]")
    n = m.group(1) or "1"
    return (os.cpu_count() or 1) if n == "*" else int(n)


def short_message(exc: BaseException) -> str:
    """One line out of a Py4JJavaError: why Spark lost the task (plus the Python error, if any)."""
    try:
        text = str(exc.java_exception.getMessage())  # type: ignore[attr-defined]
    except Exception:
        text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = re.sub(r"^.*most recent failure: ", "", first)
    first = re.sub(r"\b(?:org\.apache\.spark|java\.\w+)\.[\w.$]+: ", "", first)
    first = first.split(" Consider setting")[0]
    if "Traceback (most recent call last)" in text:  # a Python error outside run_batch
        errors = [line for line in text.split("\n\tat ")[0].splitlines()
                  if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line)]
        if errors:
            first = f"{first} {errors[-1]}"
    return first[:300]


class SparkBackend(Backend):
    name = "spark"
    tasks_per_worker = TASKS_PER_WORKER  # Spark's per-task cost is the largest: fewer, larger tasks
    max_chunks_per_task = MAX_CHUNKS_PER_TASK

    def __init__(
        self,
        master: str | None = None,
        session: SparkSession | None = None,
        workers: int | None = None,
        conf: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workers)
        if master is not None and session is not None:
            raise ExecutorOptionError("spark: give master= or session=, not both")
        if master is not None and (not isinstance(master, str) or not master):
            raise ExecutorOptionError(f"spark: master must be a string like 'local[2]' or 'spark://host:7077', "
                                      f"got {master!r}")
        if session is not None and not hasattr(session, "sparkContext"):
            raise ExecutorOptionError(f"spark: session must be a SparkSession with a SparkContext "
                                      f"(Spark Connect has no RDD API), got {session!r}")
        if conf is not None and not isinstance(conf, dict):
            raise ExecutorOptionError(f"spark: conf must be a dict of Spark settings, got {conf!r}")
        for key, value in FIXED.items():
            if conf and key in conf and str(conf[key]) != value:
                raise ExecutorOptionError(f"spark: {key} stays {value}: the driver retries (use retries=)")
        if session is not None and conf:
            raise ExecutorOptionError("spark: a session= already has its configuration; drop conf=")
        if master is None and session is None:
            master = f"local[{workers or default_workers()}]"
        cores = _local_cores(master) if master else None
        if workers is None and cores is not None:
            self._workers = cores
        self._master = master
        self._user_session = session
        self._conf = {k: str(v) for k, v in (conf or {}).items()}
        self._session: SparkSession | None = None
        self._sc: SparkContext | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._tmp: str | None = None
        self._group = f"casa-{uuid.uuid4().hex[:8]}"
        self.jobs: Counter[str] = Counter()  # Spark jobs run, by the function of their tasks

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import pyspark  # noqa: F401
        except ImportError as exc:
            return f"the spark backend needs the 'pyspark' package ({exc})"
        java_home = os.environ.get("JAVA_HOME")
        if not (shutil.which("java") or (java_home and os.path.isfile(os.path.join(java_home, "bin", "java")))):
            return "the spark backend needs Java (no 'java' on PATH and no JAVA_HOME)"
        return None

    # -- lifetime ----------------------------------------------------------------
    def _start(self) -> None:
        reason = self.unavailable()
        if reason:
            raise BackendUnavailable(reason)
        with warnings.catch_warnings():  # pyspark's own note about the pandas version, each start
            warnings.filterwarnings("ignore", message=".*PySpark does not yet fully support")
            self._attach_or_create()
        # a job group holds for every job a thread starts (Spark's pinned threads: one JVM thread per
        # Python thread), so each pool thread sets it once rather than each job (a Py4J round trip)
        self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="casa-spark", initializer=self._join_group)

    def _attach_or_create(self) -> None:
        from pyspark import SparkContext

        if self._user_session is not None:
            sc = self._user_session.sparkContext
            if getattr(sc, "_jsc", None) is None:
                raise BackendUnavailable("spark: the session given has been stopped")
            self._session, self._sc = self._user_session, sc
        else:
            if SparkContext._active_spark_context is not None:
                raise BackendUnavailable("spark: a SparkContext is already running in this process; "
                                         "pass its session as spark(session=...)")
            self._sc = self._new_context()
            self._sc.setLogLevel("ERROR")

    def _new_context(self) -> SparkContext:
        """A SparkContext, no SparkSession: tasks use the RDD API only, and a SparkSession took 2.4 s of a
        6.8 s start here (the JVM's SQL machinery, and pandas imported for a version check; docs/spark.md)."""
        from pyspark import SparkConf, SparkContext

        self._tmp = tempfile.mkdtemp(prefix="casa-spark-")
        log4j = os.path.join(self._tmp, "log4j2.properties")
        Path(log4j).write_text(LOG4J2)
        settings = self._settings(log4j)
        env = {"PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": LOOPBACK}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # read when the JVM and the SparkContext start
        try:
            return SparkContext(conf=SparkConf().setAll(list(settings.items())))
        except Exception:
            self._stop_jvm()
            raise
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _settings(self, log4j: str) -> dict[str, str]:
        """The configuration of a session we create: ours, then the user's conf=, then what stays ours."""
        return {
            "spark.master": self._master,
            "spark.app.name": "casa_executors",
            "spark.driver.host": LOOPBACK,
            "spark.driver.bindAddress": LOOPBACK,
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.pyspark.python": sys.executable,
            "spark.executorEnv.PYTHONPATH": worker_pythonpath(),
            "spark.python.worker.reuse": "true",
            **DEFAULTS,
            **self._conf,
            # ours first, the user's after them (for the JVM, the last of a repeated flag wins)
            "spark.driver.extraJavaOptions": " ".join(
                [f"-Dlog4j2.configurationFile=file:{log4j}", *DRIVER_JVM_OPTIONS,
                 self._conf.get("spark.driver.extraJavaOptions", "")]).strip(),
            **FIXED,
        }

    def _stop(self) -> None:
        pool, sc = self._pool, self._sc
        self._pool = self._sc = self._session = None
        if sc is not None and getattr(sc, "_jsc", None) is not None:
            try:
                sc.cancelJobGroup(self._group)  # running jobs end now, their futures fail
            except Exception:
                pass
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if sc is not None and self._user_session is None:
            try:
                sc.stop()
            finally:
                self._stop_jvm()

    def _stop_jvm(self) -> None:
        """End the JVM that pyspark started for us (and its Python daemon), by PID."""
        from pyspark import SparkContext

        gateway = SparkContext._gateway
        proc = getattr(gateway, "proc", None)
        SparkContext._gateway = SparkContext._jvm = None  # the next session starts a new JVM
        if proc is not None:
            below = procs.descendants(proc.pid)
            try:
                gateway.shutdown()
            except Exception:
                pass
            if proc.stdin is not None:
                proc.stdin.close()  # the gateway JVM exits when its stdin closes
            if procs.wait_or_kill([proc], grace=20):
                log.warning("spark: the JVM (pid %d) did not exit within 20 s of its stdin closing; killed", proc.pid)
            # the Python daemon exits with the JVM; what is left after 5 s is killed
            if killed := procs.wait_or_kill(below, grace=5):
                log.info("spark: killed processes %s left by the JVM", killed)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- what the driver uses ------------------------------------------------------
    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        if self._pool is None:
            raise BackendUnavailable("spark: the backend is not started")
        return self._pool.submit(self._job, fn, arg)

    def submit_together(self, fn: Callable[[Any], Any], args: list[Any], priority: int = 0) -> list[Future]:
        """One Spark job of one partition per task: a job costs the JVM ~15 ms of CPU and a scheduling
        round trip, the merges that become ready together at a run's end take milliseconds each.
        ``priority`` is dropped (``honours_priority``: Spark orders jobs, not tasks)."""
        if len(args) < 2 or self._pool is None:
            return super().submit_together(fn, args)
        futures: list[Future] = [Future() for _ in args]
        job = self._pool.submit(self._job_of, fn, args)

        def settle(job: Future) -> None:
            exc = job.exception()
            for i, f in enumerate(futures):
                if not f.set_running_or_notify_cancel():  # the driver cancelled it
                    continue
                if exc is not None:
                    f.set_exception(exc)
                else:
                    f.set_result(job.result()[i])

        job.add_done_callback(settle)
        return futures

    def _join_group(self) -> None:
        sc = self._sc
        try:
            if sc is not None:
                sc.setJobGroup(self._group, "casa_executors", interruptOnCancel=True)
        except Exception as exc:  # the JVM is gone: this thread's job fails with WorkerLost, not the pool
            log.debug("spark: setJobGroup failed: %s", exc)

    def _job(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self._job_of(fn, [arg])[0]

    def _job_of(self, fn: Callable[[Any], Any], args: list[Any]) -> list[Any]:
        from py4j.protocol import Py4JError, Py4JJavaError

        sc = self._sc
        if sc is None:
            raise WorkerLost("spark: the backend was stopped")
        self.jobs[getattr(fn, "__name__", "?")] += 1
        try:
            return sc.parallelize(args, len(args)).map(fn).collect()
        except Py4JJavaError as exc:
            raise WorkerLost(f"spark lost the task: {short_message(exc)}") from None
        except Py4JError as exc:  # the JVM itself is gone
            raise WorkerLost(f"spark: {type(exc).__name__}: {str(exc)[:200]}") from None

    @property
    def workers(self) -> int:
        """``local[N]``'s N, ``workers=``, or the cluster's parallelism once started."""
        if self._workers:
            return self._workers
        sc = self._sc
        return max(int(sc.defaultParallelism), 1) if sc is not None else 1

    @property
    def workers_local(self) -> bool:
        """``local[N]``: executors are threads of our JVM, their Python workers on this machine."""
        return self._master is not None and _local_cores(self._master) is not None

    def executor_pids(self) -> list[int]:
        """Processes below our JVM (Python daemon and workers, in local mode)."""
        from pyspark import SparkContext

        proc = getattr(SparkContext._gateway, "proc", None)
        if proc is None or self._user_session is not None:
            return []
        return [p.pid for p in procs.descendants(proc.pid)]

    def describe(self) -> str:
        """``spark(2 workers, local[2])``, ``spark(4 workers, your session on spark://host:7077)``."""
        where = self._master
        if where is None:
            try:
                where = f"your session on {self._user_session.sparkContext.master}"
            except Exception:  # a session stopped by its owner
                where = "your session"
        return f"spark({plural(self.workers, 'worker')}, {where})"
