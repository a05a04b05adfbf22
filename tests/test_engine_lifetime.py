"""One engine per Runner call: preprocessing and processing share one start.

coffea's Runner calls the executor twice (preprocessing, then processing). An engine the executor
starts for preprocessing stays up for the processing call, which stops it; if no processing call
comes, it stops after ``idle_timeout`` seconds. Starts are counted by the engines' own records
(distributed's scheduler log, Slurm's controller log), and what ran is checked gone by PID.
"""

from __future__ import annotations

import logging
import os
import re
import traceback

import pytest
from analysis import Analysis, assert_gone, descendants, require_engine, run, same
from coffea import processor
from coffea.nanoevents import NanoAODSchema
from facility import assert_no_jobs

import casa_executors as ce
from casa_executors.backends.base import REPO


class SchedulerStarts(logging.Handler):
    """distributed's own record of each scheduler it starts (one per LocalCluster)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addresses: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Scheduler at:" in message:
            self.addresses.append(message.split("Scheduler at:", 1)[1].strip())

    def __enter__(self) -> SchedulerStarts:
        logger = logging.getLogger("distributed.scheduler")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("distributed.scheduler")
        logger.removeHandler(self)
        logger.setLevel(self._level)


class Pids(Analysis):
    """The analysis, plus the PIDs of the processes that ran its chunks."""

    def process(self, events):
        out = super().process(events)
        out["pids"] = {os.getpid()}
        return out


def test_dask_runner_call_starts_one_local_cluster(sample_files, reference, no_leftover_processes):
    require_engine("dask")
    ex = ce.dask(workers=2, status=False)
    with SchedulerStarts() as schedulers:
        out = run(ex, sample_files, proc=Pids())
    assert len(schedulers.addresses) == 1, schedulers.addresses  # one LocalCluster for both of Runner's calls
    assert ex.backend.starts == 1
    assert ex.report.preprocessing is not None and ex.report.processing is not None
    assert ex.backend.stopped.is_set() and not ex.backend.idle  # processing stopped what preprocessing started
    pids = out.pop("pids")
    assert len(pids) >= 1 and os.getpid() not in pids
    assert same(out, reference)
    assert_gone([p for p in map(_process, pids) if p is not None], timeout=10)


def test_zero_idle_timeout_stops_after_each_call(sample_files, reference, no_leftover_processes):
    """idle_timeout=0: every call starts and stops its engine (what a Runner call did before)."""
    ex = ce.futures(workers=1, idle_timeout=0, status=False)
    assert same(run(ex, sample_files), reference)
    assert ex.backend.starts == 2 and ex.backend.stopped.is_set()


def test_engine_left_by_preprocessing_stops_after_idle_timeout(sample_files, no_leftover_processes):
    ex = ce.futures(workers=1, idle_timeout=0.2, status=False)
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=250, metadata_cache={})
    before = descendants()
    chunks = list(runner.preprocess({"SingleMu": [str(f) for f in sample_files]}, treename="Events"))
    assert len(chunks) == 12 and ex.report.preprocessing is not None and ex.report.processing is None
    workers = list(descendants() - before)
    # the pool either still waits for a processing call or has just been stopped by the timer
    assert ex.backend.stopped.wait(timeout=30), "the idle engine was not stopped"
    assert not ex.backend.idle and ex.backend.starts == 1
    assert_gone(workers, timeout=10)
    assert not ex.backend.pids()


def test_processing_takes_over_the_engine_and_stops_it(sample_files, reference, no_leftover_processes):
    """A long idle time: processing finds the engine up, uses it and stops it at its end, not the timer."""
    ex = ce.futures(workers=1, idle_timeout=600, status=False)
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=250, metadata_cache={})
    fileset = {"SingleMu": [str(f) for f in sample_files]}
    chunks = list(runner.preprocess(fileset, treename="Events"))
    assert ex.backend.idle and not ex.backend.stopped.is_set()
    pids = ex.backend.pids()
    assert pids
    out = runner.run(chunks, processor_instance=Analysis())
    assert out["exception"] == 0 and same(out["out"], reference)
    assert ex.backend.starts == 1 and ex.backend.stopped.is_set() and not ex.backend.idle
    assert_gone([p for p in map(_process, pids) if p is not None], timeout=10)


def test_a_held_engine_is_not_left_to_the_timer(sample_files, reference, no_leftover_processes):
    ex = ce.futures(workers=1, status=False)
    with ex:
        assert same(run(ex, sample_files), reference)
        assert same(run(ex, sample_files), reference)
        assert not ex.backend.idle and not ex.backend.stopped.is_set()
    assert ex.backend.starts == 1 and ex.backend.stopped.is_set()


def test_a_failed_preprocessing_stops_the_engine_at_once(tmp_path, no_leftover_processes):
    ex = ce.futures(workers=1, retries=0, idle_timeout=600, status=False)
    missing = tmp_path / "missing.root"
    with pytest.raises(FileNotFoundError, match=r"missing\.root"):
        run(ex, [missing])
    assert ex.backend.starts == 1 and ex.backend.stopped.is_set() and not ex.backend.idle


def test_idle_timeout_is_checked():
    for bad in (-1, float("nan"), "60", True):
        with pytest.raises(ce.ExecutorOptionError, match="idle_timeout must be a number of seconds >= 0"):
            ce.futures(idle_timeout=bad)


# -- messages name the engine as it is ----------------------------------------------------------------


def test_describe_names_the_engine():
    assert ce.iterative().backend.describe() == "iterative(in this process)"
    assert ce.futures(workers=1).backend.describe() == "futures(1 worker)"
    assert ce.futures(workers=2).backend.describe() == "futures(2 workers)"


def test_describe_names_a_users_client_and_its_scheduler(no_leftover_processes):
    require_engine("dask")
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as client:
        ex = ce.dask(client=client, status=False)
        address = cluster.scheduler_address
        text = ex.backend.describe()
        assert text == f"dask(1 worker, client of LocalCluster scheduler {address})", text  # asked of the client
        ex.backend.start()
        try:
            assert ex.backend.describe() == f"dask(1 worker, client of LocalCluster scheduler {address})"
        finally:
            ex.backend.stop()
        assert client.status == "running"  # the user's client is theirs: never closed here
        # a cluster given as cluster=: its class and scheduler, while not started too
        ex = ce.dask(cluster=cluster, workers=1, status=False)
        assert ex.backend.describe() == f"dask(no worker yet, LocalCluster at {address})"


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


# -- on a real Slurm: one engine, and no more batch jobs than the processing needs -----------------------


def submitted_jobs(slurm) -> set[str]:
    """Every job id the controller accepted so far (its log; squeue forgets finished jobs)."""
    text = (slurm.dir / "log" / "slurmctld.log").read_text(errors="replace")
    return set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", text))


def job_of(worker: str) -> str:
    """``slurm:<job id>/...``: the Slurm job a report row's worker ran in."""
    assert worker.startswith("slurm:"), worker
    return worker.split("/", 1)[0][len("slurm:"):]


def check_one_engine(slurm, ex, sample_files, reference) -> set[str]:
    """One Runner call on at most one block/worker job (adapt=(..., 1)): one engine start and one Slurm job,
    which ran the preprocessing and the processing. An engine per executor call (before) cancels the first
    call's job when it stops, and the processing submits another: two. (With a larger maximum the count also
    depends on the engine's own autoscaling: parsl cancels a block idle for 5 s and asks again when work
    comes; ``python -m casa_benchmarks.engine_per_call`` measures adapt=(0, 2).)"""
    before = submitted_jobs(slurm)
    out = run(ex, sample_files)
    jobs = submitted_jobs(slurm) - before
    assert same(out, reference)
    assert ex.backend.starts == 1 and ex.backend.stopped.is_set() and not ex.backend.idle
    ran_pre = {job_of(r.worker) for r in ex.report.preprocessing.rows}
    ran_proc = {job_of(r.worker) for r in ex.report.processing.rows}
    assert len(jobs) == 1 and ran_pre == ran_proc == jobs, (jobs, ran_pre, ran_proc)
    assert_no_jobs(slurm)
    return jobs


def test_parsl_on_slurm_runner_call_starts_one_engine(slurm, tmp_path, sample_files, reference):
    require_engine("parsl")
    from parsl.launchers import SingleNodeLauncher
    from parsl.providers import SlurmProvider

    provider = SlurmProvider(partition=slurm.partition, exclusive=False, nodes_per_block=1, walltime="00:20:00",
                             launcher=SingleNodeLauncher(), scheduler_options=f"#SBATCH --chdir={tmp_path}\n")
    ex = ce.parsl(provider=provider, adapt=(0, 1), host="127.0.0.1", worker_timeout=60, status=False)
    check_one_engine(slurm, ex, sample_files, reference)


def test_workqueue_on_slurm_runner_call_starts_one_engine(slurm, sample_files, reference):
    require_engine("workqueue")
    # adapt=(1, 1): one job, so the count is exact (the factory reads the queue through the run's catalog
    # server, tests/test_slurm_workqueue.py shows adapt=(0, N))
    ex = ce.workqueue(submit="slurm", adapt=(1, 1), worker_timeout=60, status=False)
    check_one_engine(slurm, ex, sample_files, reference)


def test_a_failure_on_a_users_slurm_cluster_names_it(slurm, tmp_path, sample_files):
    """The message of a failed chunk names the user's SLURMCluster, its scheduler and its adapt bounds."""
    require_engine("dask")
    import sys

    from analysis import Failing
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(
        cores=1, memory="1GB", processes=1, queue=slurm.partition, python=sys.executable, walltime="00:20:00",
        job_extra_directives=[f"--chdir={tmp_path}"], worker_extra_args=["--host", "127.0.0.1"], death_timeout=30,
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "allowed_failures": 0})
    try:
        address = cluster.scheduler_address
        ex = ce.dask(cluster=cluster, adapt=(0, 1), retries=0, worker_timeout=60, status=False)
        assert ex.backend.describe() == f"dask(no worker yet, SLURMCluster at {address}, adapt=(0, 1))"
        with pytest.raises(Exception, match="planted failure") as err:  # Runner's, from the worker's own
            run(ex, sample_files[:1], proc=Failing(str(tmp_path / "attempts.log")))
        notes = "".join(traceback.format_exception(err.value))
        assert f"on dask(1 worker, SLURMCluster at {address}, adapt=(0, 1))" in notes, notes
        assert "LocalCluster" not in notes
        assert ex.backend.starts == 1 and ex.backend.stopped.is_set()
    finally:
        cluster.close()
    assert_no_jobs(slurm)


EXIT_SCRIPT = """
import logging, os, sys
from coffea import processor
from coffea.nanoevents import NanoAODSchema
import casa_executors as ce

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ex = ce.futures(workers=1, idle_timeout=600, status=False)
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=250, metadata_cache={})
    chunks = list(runner.preprocess({"d": sys.argv[1:]}, treename="Events"))
    print("PIDS", *ex.backend.pids(), "IDLE", ex.backend.idle, flush=True)
"""


def test_an_idle_engine_is_stopped_when_the_interpreter_exits(tmp_path, sample_files):
    """Only preprocessing ran and the idle time is long: the interpreter's exit stops the engine (the atexit
    hook), it does not wait for the timer."""
    import subprocess
    import sys

    script = tmp_path / "only_preprocess.py"
    script.write_text(EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-W", "ignore", str(script), *map(str, sample_files)], env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PIDS"))
    pids = [int(x) for x in line.split()[1:-2]]
    assert pids and line.endswith("IDLE True"), line
    assert "casa_executors.backends.base: futures stopped in" in proc.stderr, proc.stderr[-2000:]
    assert_gone([p for p in map(_process, pids) if p is not None], timeout=10)
