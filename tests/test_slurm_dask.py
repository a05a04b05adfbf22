"""Dask on a real Slurm: dask-jobqueue's SLURMCluster, workers are Slurm jobs in their own working directory.

The cluster talks TLS; each worker job carries the CA and user certificate in its script
(``shipping_secrets``), so nothing of the submitter's filesystem is read by the worker for TLS.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from analysis import FACILITY_QUERY, Busy, Failing, alive, assert_adl_identical, attempts, gate_closed, run, same
from facility import SecretWatch, assert_no_jobs, new_temp_entries, same_physics, wait_until

import casa_executors as ce
from casa_executors.errors import BackendUnavailable, ExecutorOptionError


def slurm_cluster(slurm, workdir, secrets, **kw):
    """A TLS SLURMCluster on the local Slurm whose jobs run in ``workdir``."""
    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob

    from casa_executors.backends.dask.jobqueue import shipping_secrets
    from casa_executors.backends.dask.security import cluster_security

    extra = kw.pop("job_extra_directives", [])
    return SLURMCluster(
        cores=1, memory="1GB", processes=1, queue=slurm.partition, python=sys.executable, walltime="00:20:00",
        job_extra_directives=[f"--chdir={workdir}", *extra], worker_extra_args=["--host", "127.0.0.1"],
        death_timeout=30, security=cluster_security(secrets), job_cls=shipping_secrets(SLURMJob),
        # the driver retries a task whose worker died, and counts it: the scheduler must not re-run it silently
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "allowed_failures": 0},
        **kw,
    )


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    from casa_executors.backends.dask.security import make_secrets_dir

    return make_secrets_dir(tmp_path_factory.mktemp("dask-secrets"))


@pytest.fixture(scope="module")
def jobdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-jobs")


def job_tmpdir(jobdir: Path) -> Path:
    """The TMPDIR of the module's worker jobs: their ``casa-job.*`` folders are looked for there, not among
    whatever else the machine's /tmp gains meanwhile."""
    return jobdir / "tmp"


@pytest.fixture(scope="module")
def cluster(slurm, jobdir, secrets):
    job_tmpdir(jobdir).mkdir(exist_ok=True)
    c = slurm_cluster(slurm, jobdir, secrets, job_extra_directives=[f"--export=ALL,TMPDIR={job_tmpdir(jobdir)}"])
    yield c
    c.close()
    assert_no_jobs(slurm)


def job_ids_of_workers(client) -> dict[str, str]:
    return client.run(lambda: os.environ.get("SLURM_JOB_ID", ""))


def private_key(pem_file) -> bytes:
    text = pem_file.read_bytes()
    return text[text.index(b"-----BEGIN PRIVATE KEY-----"):]


def test_adl_query_on_slurm_jobs(slurm, cluster, jobdir, secrets, served, sample_files, reference):
    from casa_executors.backends.dask import DaskBackend

    temp_before = set(os.listdir(tempfile.gettempdir()))
    backend = DaskBackend(cluster=cluster, workers=2, worker_timeout=60)
    backend.hold()  # one set of worker jobs for the query and the run through XCache
    try:
        backend._client.wait_for_workers(2, timeout=60)
        jobs = job_ids_of_workers(backend._client)
        running = {j.id for j in slurm.jobs() if j.state == "RUNNING"}
        assert len(jobs) == 2 and set(jobs.values()) == running  # every worker is a Slurm job
        assert set(backend._client.run(os.getcwd).values()) == {str(jobdir)}
        assert all(addr.startswith("tls://127.0.0.1:") for addr in jobs)
        assert_adl_identical(backend, sample_files, queries=FACILITY_QUERY)

        # through a token-checking XCache: the token reaches the jobs with each task (over TLS), never on disk;
        # the TLS key travels in the job script and a private copy, readable by the job's owner only
        roots = lambda: [slurm.dir, jobdir, *new_temp_entries(temp_before)]  # noqa: E731
        key = private_key(secrets / "usercert.pem")
        with SecretWatch(served.token.encode(), roots) as token_seen, SecretWatch(key, roots) as key_seen:
            ex = ce.Driver(backend=backend, status=False, **served.driver_options())
            out = run(ex, served.urls)
        assert same_physics(out, reference)
        assert ex.report.summary()["served_by"] == {f"xcache:{served.cache}": 12}
        assert not token_seen.seen, token_seen.seen
        assert key_seen.seen and not key_seen.exposed(), key_seen.seen
        workers = {r.worker for r in ex.report.rows()}
        # the worker column joins with the site's accounting: slurm:<SLURM_JOB_ID>/<dask worker address>
        assert workers <= {f"slurm:{job}/{addr}" for addr, job in jobs.items()} and workers
        assert all(w.split("/", 1)[1].startswith("tls://") for w in workers)
    finally:
        backend.release()
    assert wait_until(lambda: not slurm.jobs(), 30), f"the run's end gives the jobs back: {slurm.jobs()}"
    assert not list(job_tmpdir(jobdir).glob("casa-job.*"))  # removed at job end


def test_scancel_of_a_worker_job_mid_run_loses_no_chunk(slurm, cluster, sample_files, reference, tmp_path):
    from casa_executors.backends.dask import DaskBackend

    log, busy, gate = str(tmp_path / "attempts.log"), tmp_path / "busy", str(tmp_path / "gate")
    open(log, "w").close()
    open(gate, "w").close()
    busy.mkdir()
    ex = ce.Driver(backend=DaskBackend(cluster=cluster, workers=2, worker_timeout=60), status=False)
    ex.backend.hold()
    cancelled: list[str] = []
    outlived: list[tuple[int, str]] = []

    def cancel_a_busy_job() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not cancelled:
            p = ex.report.processing
            if p is not None and 2 <= sum(r.status == "ok" for r in p.rows) < len(p.rows):
                # with the gate closed a worker marked busy cannot end its chunk: it is cancelled inside it
                # (a worker seen busy and cancelled a moment later may have no task left to lose)
                with gate_closed(gate):
                    marks = {int(m.name): m.read_text() for m in busy.iterdir() if alive(int(m.name))}
                    victim = next(((pid, job) for pid, job in marks.items() if job), None)
                    if victim:
                        pid, job = victim
                        slurm.run("scancel", job)
                        cancelled.append(job)
                        # until it is gone: nothing of the cancelled attempt runs after the gate opens
                        if not wait_until(lambda pid=pid: not alive(pid), 60):
                            outlived.append(victim)
            time.sleep(0.05)

    try:
        ex.backend._client.wait_for_workers(2, timeout=60)
        killer = threading.Thread(target=cancel_a_busy_job, daemon=True)
        killer.start()
        out = run(ex, sample_files, Busy(log, str(busy), gate), chunksize=250)
        killer.join()
    finally:
        ex.backend.release()
    assert cancelled, "the run ended before a worker job could be cancelled"
    assert not outlived, f"(worker PID, job) still running 60 s after scancel: {outlived}"
    assert same(out, reference)  # nothing lost, nothing counted twice
    s = ex.report.summary()
    assert s["processed"] == s["chunks"] == 12 and s["attempts"] > s["chunks"]
    assert all(r.status == "ok" for r in ex.report.rows())
    retried = [r for r in ex.report.rows() if r.attempts > 1]
    assert retried and not any(r.worker.startswith(f"slurm:{cancelled[0]}/") for r in retried)
    tries = attempts(log)
    assert len(tries) == 12 and max(tries.values()) >= 2, tries  # the cancelled chunk started twice
    assert_no_jobs(slurm)


def test_adapt_asks_for_jobs_with_work_and_gives_them_back(slurm, jobdir, secrets, sample_files, tmp_path):
    from casa_executors.backends.dask import DaskBackend

    c = slurm_cluster(slurm, jobdir, secrets)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(sum(j.state != "COMPLETING" for j in slurm.jobs()))  # a cancelled job may linger
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        ex = ce.Driver(backend=DaskBackend(cluster=c, adapt=(0, 2), worker_timeout=60), status=False)
        assert not slurm.jobs()  # nothing asked for before there is work
        sampler.start()
        with ex:  # held: the pool lives on after the run, and shrinks because it idles
            log = str(tmp_path / "a.log")
            # dask's adaptive target is the queued occupancy / 5 s: the driver keeps 2 x max = 4 tasks
            # submitted, so tasks of 2 s (8 s of work in view) ask for the second job, 1 s ones may not
            out = run(ex, sample_files, Failing(log, bad_starts=set(), sleep=2.0), chunksize=250)
            assert out["events"].value == 3000
            assert wait_until(lambda: not slurm.jobs(), 30), f"idle jobs not given back: {slurm.jobs()}"
        stop.set()
        sampler.join()
        samples.append(len(slurm.jobs()))
    finally:
        stop.set()
        c.close()
    assert max(samples) == 2, samples  # up to the maximum, never beyond
    assert samples[-1] == 0, samples
    assert_no_jobs(slurm)


def test_a_cluster_that_never_gets_a_worker_names_the_pending_jobs(slurm, jobdir, secrets, sample_files):
    from casa_executors.backends.dask import DaskBackend

    c = slurm_cluster(slurm, jobdir, secrets, job_extra_directives=["--begin=now+1hour"])
    try:
        ex = ce.Driver(backend=DaskBackend(cluster=c, workers=1, worker_timeout=4), status=False)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable) as err:
            run(ex, sample_files)
        assert time.monotonic() - t0 < 30
    finally:
        c.close()
    msg = str(err.value)
    assert "no worker joined SLURMCluster within 4 s" in msg and "workers=1" in msg
    assert "PENDING (BeginTime)" in msg, msg
    assert_no_jobs(slurm)


def test_cluster_options_are_checked(slurm, cluster):
    with pytest.raises(ExecutorOptionError, match="workers= or adapt="):
        ce.dask(cluster=cluster, workers=2, adapt=(0, 2))
    with pytest.raises(ExecutorOptionError, match=r"adapt must be \(minimum, maximum\)"):
        ce.dask(cluster=cluster, adapt=(3, 1))
    with pytest.raises(ExecutorOptionError, match="cluster must be a distributed"):
        ce.dask(cluster=object())
    with pytest.raises(ExecutorOptionError, match="client="):
        ce.dask(cluster=cluster, address="tcp://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match="worker_timeout"):
        ce.dask(cluster=cluster, worker_timeout=0)
