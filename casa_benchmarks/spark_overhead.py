"""Spark's fixed costs, ours against bare PySpark: start-up and the round trip of a trivial job.

    python -m casa_benchmarks.spark_overhead --rounds 2 --jobs 60 --json bench-out/spark_overhead.json

Every contender runs in a fresh Python process of its own (one SparkContext per process, and a
start-up is only a start-up in a fresh process), the contenders in turn, each going first in turn,
``--rounds`` times:

* ``bare``: ``SparkSession.builder.master("local[2]").getOrCreate()``, then
  ``sc.parallelize([1], 1).map(abs).collect()`` — PySpark as a user would call it, Spark's defaults;
* ``ours``: ``casa_executors.spark(master="local[2]")``, ``ex.backend.hold()``, then
  ``backend.submit(abs, -1).result()`` — one one-partition Spark job through our submit path;
* ``--variants`` add contenders: ``ours`` with extra Spark settings (``NAME=key=value,key=value``).

Start-up is split where PySpark's own steps are: ``jvm_s`` (``launch_gateway``: ``spark-submit``'s
launcher JVM, then the driver JVM up to its Py4J gateway), ``context_s`` (the JVM's SparkContext,
``SparkContext._initialize_context``), the rest of the session/backend start (``session_s``), then
``first_job_s`` (the first job: the Python daemon and its first worker fork). The two PySpark steps are
timed by wrapping them in the child process (instrumentation of this benchmark, not of the backend).

Round trips after ``--warmup`` jobs, ``--jobs`` of each kind alternating, medians: ``job1_ms`` (one
one-partition job), ``wave2_ms`` (one job of two partitions, as ``scaling.round_trip`` waves with 2
workers: ours through ``submit_together``). With ``--event-log``, Spark's own event log (documented,
``spark.eventLog.enabled``) splits each one-partition job: Python's call to the JVM's job start
(``submit_ms``), job start to task launch (``schedule_ms``: DAGScheduler and TaskScheduler), the task
on the executor (``task_ms``: of it ``executor_run_ms``, which includes the Python worker), task end
to job end, and job end to the result in Python (``fetch_ms``: collect's socket, our hand-offs).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from casa_benchmarks.common import rotated, save_json

log = logging.getLogger(__name__)
MASTER = "local[2]"


def _timed_steps() -> dict[str, float]:
    """Wrap PySpark's JVM launch and JVM SparkContext creation to record their durations."""
    import pyspark.context as ctx

    steps: dict[str, float] = {}
    launch = ctx.launch_gateway
    init = ctx.SparkContext._initialize_context

    def timed_launch(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return launch(*a, **k)
        finally:
            steps["jvm_s"] = time.perf_counter() - t

    def timed_init(self: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return init(self, *a, **k)
        finally:
            steps["context_s"] = time.perf_counter() - t

    ctx.launch_gateway = timed_launch
    ctx.SparkContext._initialize_context = timed_init
    return steps


def _event_log_split(directory: str, marks: list[tuple[float, float]]) -> dict[str, float]:
    """Medians of the phases of the one-partition jobs, from Spark's event log and Python's clock."""
    files = sorted(f for f in glob.glob(os.path.join(directory, "**"), recursive=True)
                   if os.path.isfile(f) and "appstatus" not in f)
    if not files:
        return {}
    jobs: dict[int, dict[str, float]] = {}
    stage_job: dict[int, int] = {}
    lines = [line for f in files for line in open(f)]
    for line in lines:
        ev = json.loads(line)
        kind = ev.get("Event")
        if kind == "SparkListenerJobStart":
            tasks = sum(st.get("Number of Tasks", 0) for st in ev.get("Stage Infos", []))
            jobs[ev["Job ID"]] = {"start": ev["Submission Time"] / 1e3, "tasks": tasks}
            for s in ev.get("Stage IDs", []):
                stage_job[s] = ev["Job ID"]
        elif kind == "SparkListenerTaskEnd":
            j = jobs.get(stage_job.get(ev["Stage ID"], -1))
            info, metrics = ev["Task Info"], ev.get("Task Metrics") or {}
            if j is not None and "launch" not in j:
                j["launch"] = info["Launch Time"] / 1e3
                j["finish"] = info["Finish Time"] / 1e3
                j["deserialize"] = metrics.get("Executor Deserialize Time", 0) / 1e3
                j["run"] = metrics.get("Executor Run Time", 0) / 1e3
                j["result_ser"] = metrics.get("Result Serialization Time", 0) / 1e3
        elif kind == "SparkListenerJobEnd":
            if ev["Job ID"] in jobs:
                jobs[ev["Job ID"]]["end"] = ev["Completion Time"] / 1e3
    # the last len(marks) jobs with one task are the timed one-partition jobs, in order
    ones = [jobs[k] for k in sorted(jobs) if jobs[k]["tasks"] == 1 and "launch" in jobs[k] and "end" in jobs[k]]
    split: dict[str, list[float]] = {k: [] for k in ("submit_ms", "schedule_ms", "task_ms", "executor_run_ms",
                                                     "deserialize_ms", "task_to_job_end_ms", "fetch_ms")}
    for (t0, t1), j in zip(marks, ones[-len(marks):] if marks else []):
        split["submit_ms"].append(j["start"] - t0)
        split["schedule_ms"].append(j["launch"] - j["start"])
        split["task_ms"].append(j["finish"] - j["launch"])
        split["executor_run_ms"].append(j["run"])
        split["deserialize_ms"].append(j["deserialize"])
        split["task_to_job_end_ms"].append(j["end"] - j["finish"])
        split["fetch_ms"].append(t1 - j["end"])
    return {k: 1e3 * statistics.median(v) for k, v in split.items() if v}


def _cpu() -> dict[str, float]:
    """CPU seconds so far of this process, of the JVM, and of the JVM's children (PySpark's Python daemon
    and workers, in local mode). The JVM's PID is PySpark's gateway process (instrumentation only)."""
    import psutil
    from pyspark import SparkContext

    out = {"driver_python": time.process_time()}
    proc = getattr(SparkContext._gateway, "proc", None)
    if proc is not None:
        try:
            jvm = psutil.Process(proc.pid)
            t = jvm.cpu_times()
            out["jvm"] = t.user + t.system
            workers = 0.0
            for c in jvm.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    ct = c.cpu_times()
                    workers += ct.user + ct.system
            out["python_workers"] = workers
        except psutil.Error:
            pass
    return out


def child(kind: str, conf: dict[str, str], jobs: int, warmup: int, event_log: bool, profile: str | None) -> dict:
    """One contender in this (fresh) process: its start-up split and its round trips."""
    t_import = time.perf_counter()
    import pyspark.sql  # noqa: F401  (imports are not Spark's start-up; timed apart)

    if kind != "bare":
        import casa_executors

    imported = time.perf_counter() - t_import
    steps = _timed_steps()
    conf = dict(conf)
    log_dir = None
    if event_log:
        log_dir = tempfile.mkdtemp(prefix="casa-spark-events-")
        conf.update({"spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{log_dir}",
                     "spark.eventLog.compress": "false", "spark.eventLog.rolling.enabled": "false"})
    backend = None
    modules = set(sys.modules)
    t0 = time.perf_counter()
    if kind == "bare":
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.master(MASTER)
        for k, v in conf.items():
            builder = builder.config(k, v)
        session = builder.getOrCreate()
        sc = session.sparkContext
        started = time.perf_counter() - t0

        def job1() -> Any:
            return sc.parallelize([1], 1).map(abs).collect()

        def wave2() -> Any:
            return sc.parallelize([0, -1], 2).map(abs).collect()
    else:
        ex = casa_executors.spark(master=MASTER, conf=conf or None, status=False)
        backend = ex.backend
        backend.hold()
        started = time.perf_counter() - t0

        def job1() -> Any:
            return backend.submit(abs, -1).result()

        def wave2() -> Any:
            return [f.result() for f in backend.submit_together(abs, [0, -1])]
    new_modules = set(sys.modules) - modules  # Python imports inside the start (PySpark's, for a session)
    t = time.perf_counter()
    job1()
    first_job = time.perf_counter() - t
    for _ in range(warmup):
        job1()
        wave2()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    one: list[float] = []
    two: list[float] = []
    marks: list[tuple[float, float]] = []
    cpu0 = _cpu()
    for _ in range(jobs):
        if prof:
            prof.enable()
        w0, t = time.time(), time.perf_counter()
        job1()
        one.append(time.perf_counter() - t)
        marks.append((w0, time.time()))
        t = time.perf_counter()
        wave2()
        two.append(time.perf_counter() - t)
        if prof:
            prof.disable()
    cpu1 = _cpu()
    if prof and profile:
        prof.dump_stats(profile)
    row = {
        "casa_executors": getattr(sys.modules.get("casa_executors"), "__file__", None),
        "kind": kind, "conf": conf, "import_s": imported, "start_s": started,
        "jvm_s": steps.get("jvm_s"), "context_s": steps.get("context_s"),
        "session_s": started - steps.get("jvm_s", 0.0) - steps.get("context_s", 0.0),
        "modules_imported_in_start": len(new_modules),
        "heavy_imported_in_start": sorted(m for m in new_modules if m in ("pandas", "pyarrow", "grpc", "numpy")),
        "first_job_s": first_job, "startup_s": started + first_job,
        # CPU of the timed jobs (one one-partition job and one two-partition job each), per pair, in ms
        "cpu_ms_per_pair": {k: 1e3 * (cpu1[k] - cpu0.get(k, 0.0)) / jobs for k in cpu1},
        "job1_ms": 1e3 * statistics.median(one), "wave2_ms": 1e3 * statistics.median(two),
        "job1_ms_quartiles": [1e3 * q for q in statistics.quantiles(one, n=4)],
        "wave2_ms_quartiles": [1e3 * q for q in statistics.quantiles(two, n=4)],
    }
    t = time.perf_counter()
    if kind == "bare":
        session.stop()
    elif backend is not None:
        backend.release()  # waits for the JVM's exit (and a CDS archive's dump at exit, if asked for)
    row["stop_s"] = time.perf_counter() - t
    if log_dir:
        try:
            row["event_log"] = _event_log_split(log_dir, marks)
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)
    return row


def _parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    """``NAME=kind:key=value,key=value`` (kind ``bare`` or ``ours``; no settings after the colon allowed)."""
    name, _, rest = text.partition("=")
    kind, _, settings = rest.partition(":")
    if kind not in ("bare", "ours"):
        raise SystemExit(f"--variants: {text!r}: give NAME=bare:... or NAME=ours:...")
    conf = dict(s.split("=", 1) for s in settings.split(",") if s) if settings else {}
    return name, kind, conf


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per contender")
    ap.add_argument("--jobs", type=int, default=60, help="timed jobs of each kind, per process")
    ap.add_argument("--warmup", type=int, default=15, help="untimed jobs of each kind first")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra contenders NAME=bare|ours:key=value,... (Spark settings)")
    ap.add_argument("--before", default=None,
                    help="a folder holding another casa_executors (e.g. main's): contender 'before', ours from there")
    ap.add_argument("--only", nargs="*", default=None, help="run only these contenders")
    ap.add_argument("--event-log", action="store_true", help="split one-partition jobs with Spark's event log")
    ap.add_argument("--profile-dir", default=None, help="cProfile the timed jobs of each process into this folder")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        given = json.loads(args.child)
        row = child(given["kind"], given["conf"], args.jobs, args.warmup, args.event_log, given.get("profile"))
        print("RESULT " + json.dumps(row), flush=True)
        return row
    contenders: dict[str, tuple[str, dict[str, str]]] = {"bare": ("bare", {}), "ours": ("ours", {})}
    if args.before:
        contenders["before"] = ("ours", {})
    for v in args.variants:
        name, kind, conf = _parse_variant(v)
        contenders[name] = (kind, conf)
    if args.only:
        contenders = {k: v for k, v in contenders.items() if k in args.only}
    names = list(contenders)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    load = [os.getloadavg()]
    for rep in range(args.rounds):
        for name in rotated(names, rep):
            kind, conf = contenders[name]
            spec: dict[str, Any] = {"kind": kind, "conf": conf}
            if args.profile_dir:
                os.makedirs(args.profile_dir, exist_ok=True)
                spec["profile"] = os.path.join(args.profile_dir, f"{name}-{rep}.prof")
            cmd = [sys.executable, "-m", "casa_benchmarks.spark_overhead", "--child", json.dumps(spec),
                   "--jobs", str(args.jobs), "--warmup", str(args.warmup)] + (["--event-log"] if args.event_log else [])
            env, cwd = dict(os.environ), None
            if name == "before":  # its casa_executors first on the path (python -m puts the cwd first), ours after
                env["PYTHONPATH"] = os.pathsep.join([args.before, os.getcwd(), env.get("PYTHONPATH", "")])
                cwd = args.before
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
            out = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not out:
                raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            row = json.loads(out[-1][len("RESULT "):])
            rows[name].append(row)
            print(f"{name:12s} round {rep}: start {row['start_s']:.2f} s (jvm {row['jvm_s']:.2f}, context "
                  f"{row['context_s']:.2f}, rest {row['session_s']:.2f}), first job {row['first_job_s']:.2f} s, "
                  f"job1 {row['job1_ms']:.1f} ms, wave2 {row['wave2_ms']:.1f} ms "
                  f"{row.get('event_log', '')}", flush=True)
            load.append(os.getloadavg())
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        summary[name] = {k: statistics.median(r[k] for r in rows[name])
                         for k in ("start_s", "jvm_s", "context_s", "session_s", "first_job_s", "startup_s",
                                   "job1_ms", "wave2_ms")}
    if "bare" in summary:
        for name in names:
            summary[name]["job1_over_bare"] = summary[name]["job1_ms"] / summary["bare"]["job1_ms"]
            summary[name]["startup_over_bare"] = summary[name]["startup_s"] / summary["bare"]["startup_s"]
    for name, s in summary.items():
        print(f"{name:12s} " + " ".join(f"{k} {v:.3g}" for k, v in s.items()))
    result = {"argv": sys.argv[1:] if argv is None else argv,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": load, "rows": rows,
              "summary": summary}
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
