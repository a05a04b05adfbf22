"""Work Queue on a real Slurm: workers submitted as Slurm jobs by cctools' work_queue_factory."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

import pytest
from analysis import FACILITY_QUERY, assert_adl_identical, require_engine, run, same
from facility import SecretWatch, assert_no_jobs, new_temp_entries, same_physics

import casa_executors as ce
from casa_executors import procs
from casa_executors.errors import BackendUnavailable, ExecutorOptionError


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("workqueue")


def test_adl_queries_on_workers_that_are_slurm_jobs(slurm, served, sample_files, reference):
    from casa_executors.backends.workqueue import WorkQueueBackend

    temp_before = set(os.listdir(tempfile.gettempdir()))
    backend = WorkQueueBackend(submit="slurm", workers=2, worker_timeout=60)
    backend.hold()
    try:
        assert backend.wait_for_workers(2, timeout=60) == 2
        jobs = [j for j in slurm.jobs() if j.state == "RUNNING"]
        assert len(jobs) == 2
        assert_adl_identical(backend, sample_files, queries=FACILITY_QUERY)
        # through a token-checking XCache: the token travels inside each task's input, which lands in the
        # staging directory and in the workers' sandboxes: readable by their owner only
        roots = lambda: [backend.staging_dir, *new_temp_entries(temp_before)]  # noqa: E731
        with SecretWatch(served.token.encode(), roots) as token_seen:
            ex = ce.Driver(backend=backend, status=False, **served.driver_options())
            out = run(ex, served.urls)
        assert same_physics(out, reference)
        assert ex.report.summary()["served_by"] == {f"xcache:{served.cache}": 12}
        assert any("casa-wq-worker." in p for p in token_seen.seen), token_seen.seen  # the watch does see it
        assert not token_seen.exposed(), token_seen.seen
        workers = {r.worker for r in ex.report.rows()}
        assert workers and {w.split("/", 1)[0] for w in workers} <= {f"slurm:{j.id}" for j in jobs}
    finally:
        backend.release()
    assert_no_jobs(slurm)
    # the workers' private directories go with their jobs; at the least no file in them outlives the job
    # (on a loaded machine Slurm's SIGKILL can come before a cancelled worker has removed its empty folders)
    left = [p for p in new_temp_entries(temp_before) if p.name.startswith("casa-wq-worker.")]
    for d in left:
        files = [f for f in d.rglob("*") if not f.is_dir()]
        assert not files, f"files outlived their worker job: {files}"
        shutil.rmtree(d)


def submitted_jobs(slurm) -> set[str]:
    """Every job id the controller accepted so far (its log; squeue forgets finished jobs)."""
    text = (slurm.dir / "log" / "slurmctld.log").read_text(errors="replace")
    return set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", text))


def test_adapt_from_zero_submits_workers_as_work_arrives(slurm, sample_files, reference):
    """adapt=(0, 2): no worker before the work; then the factory reads the password-protected manager's
    queue (through the run's own catalog_server) and submits worker jobs, which run every chunk."""
    from casa_executors.backends.workqueue import WorkQueueBackend

    ours = lambda name: [p for p in procs.children() if p.name() == name]  # noqa: E731
    before = submitted_jobs(slurm)
    backend = WorkQueueBackend(submit="slurm", adapt=(0, 2), worker_timeout=120)
    backend.hold()
    try:
        (catalog_server,), (factory,) = ours("catalog_server"), ours("work_queue_factory")
        after = lambda p, opt: p.cmdline()[p.cmdline().index(opt) + 1]  # noqa: E731
        assert after(catalog_server, "-I") == "127.0.0.1" and after(factory, "--catalog").startswith("127.0.0.1:")
        assert submitted_jobs(slurm) == before  # nothing asked for while there is no work
        ex = ce.Driver(backend=backend, status=False)
        out = run(ex, sample_files)
        jobs = submitted_jobs(slurm) - before
        assert same(out, reference)
        ran = {r.worker.split("/", 1)[0] for r in ex.report.rows()}
        assert jobs and ran and ran <= {f"slurm:{j}" for j in jobs}, (jobs, ran)
    finally:
        backend.release()
    # the factory and the catalog server stopped by PID, their jobs gone
    assert not factory.is_running() and not catalog_server.is_running()
    assert_no_jobs(slurm)


def test_workers_that_never_start_are_named(slurm, sample_files):
    ex = ce.workqueue(submit="slurm", workers=1, batch_options="--begin=now+1hour", worker_timeout=4, status=False)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as err:
        run(ex, sample_files)
    assert time.monotonic() - t0 < 40
    msg = str(err.value)
    assert "workqueue: no worker joined within 4 s (work_queue_factory -T slurm, workers=1)" in msg, msg
    assert "PENDING (BeginTime)" in msg, msg
    assert_no_jobs(slurm)


def test_submit_options_are_checked():
    with pytest.raises(ExecutorOptionError, match="submit must be one of: slurm"):
        ce.workqueue(submit="pbs")
    with pytest.raises(ExecutorOptionError, match="workers= or adapt="):
        ce.workqueue(submit="slurm", workers=2, adapt=(0, 2))
    with pytest.raises(ExecutorOptionError, match="adapt= and batch_options= need submit="):
        ce.workqueue(adapt=(0, 2))
