"""dask-gateway with its Slurm backend: the scheduler and each worker of alice's cluster are Slurm jobs."""

from __future__ import annotations

import os
import stat
import time

import pytest
from analysis import run, same
from facility import assert_no_jobs, wait_until

import casa_executors as ce
from casa_executors.errors import BackendUnavailable


def test_workers_are_slurm_jobs_and_all_go_with_the_cluster(slurm, slurm_gateway, sample_files, reference):
    from casa_executors.backends.dask import DaskBackend

    backend = DaskBackend(gateway=slurm_gateway.address, auth=("alice", "alice-pw"), workers=2, worker_timeout=60)
    backend.hold()
    try:
        backend._client.wait_for_workers(2, timeout=60)
        jobs = backend._client.run(lambda: os.environ.get("SLURM_JOB_ID", ""))
        running = {j.id for j in slurm.jobs() if j.state == "RUNNING"}
        assert len(running) == 3 and set(jobs.values()) < running  # the scheduler is the third job
        staging = slurm_gateway.dir / "staging" / "alice" / backend.cluster_name
        assert set(backend._client.run(os.getcwd).values()) == {str(staging)}
        for f in ("dask.pem", "dask.crt"):  # the cluster's TLS key, at rest for the jobs: owner only
            assert stat.S_IMODE((staging / f).stat().st_mode) == 0o600
        assert stat.S_IMODE(staging.stat().st_mode) == 0o700

        ex = ce.Driver(backend=backend, status=False)
        assert same(run(ex, sample_files), reference)
        workers = {r.worker for r in ex.report.rows()}
        assert workers and workers <= {f"slurm:{job}/{addr}" for addr, job in jobs.items()}
    finally:
        backend.release()
    assert_no_jobs(slurm)
    assert not staging.exists()  # the cluster's TLS files went with it


def test_a_cluster_whose_workers_never_start_times_out_naming_it(slurm, slurm_gateway, sample_files):
    # 15 GiB per worker fits the node but not beside the scheduler's job: the worker job stays PENDING
    ex = ce.dask(gateway=slurm_gateway.address, auth=("alice", "alice-pw"), workers=1, worker_timeout=3,
                 cluster_options={"worker_memory": 15}, status=False)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as err:
        run(ex, sample_files)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert "no worker joined gateway cluster" in msg and "within 3 s" in msg and "workers=1" in msg, msg
    assert "with no worker connected" in msg
    assert took < 40
    assert wait_until(lambda: not slurm.jobs(), 30), slurm.jobs()  # the cluster we created is gone, jobs too
    assert_no_jobs(slurm)
