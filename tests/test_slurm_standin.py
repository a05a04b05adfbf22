"""The local Slurm stand-in itself: real daemons on 127.0.0.1, real jobs, nothing left after stop."""

from __future__ import annotations

import os

import psutil
import pytest
from facility import assert_no_jobs, wait_until

from casa_executors.standins.slurm import LocalSlurm, SlurmError


def listening(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_one_node_cluster_runs_jobs_on_loopback_only(slurm, tmp_path):
    assert slurm.node_state() == "idle"
    assert os.environ["SLURM_CONF"] == str(slurm.conf)  # clients started from here find it
    for name in ("slurmctld", "slurmd"):
        assert listening(slurm.pids[name]) == {"127.0.0.1"}, name
    assert not listening(slurm.pids["munged"])  # a Unix socket only
    key = slurm.dir / "munge-key" / "munge.key"
    assert oct(key.stat().st_mode & 0o777) == "0o400"

    workdir = tmp_path / "job"
    workdir.mkdir()
    job = slurm.run("sbatch", "--parsable", f"--chdir={workdir}", "--wrap",
                    'echo "$SLURM_JOB_ID $(pwd)" > where; sleep 60').strip()
    assert wait_until(lambda: (workdir / "where").exists(), 20)
    assert (workdir / "where").read_text().split() == [job, str(workdir)]
    assert [(j.id, j.state) for j in slurm.jobs()] == [(job, "RUNNING")]
    slurm.run("scancel", job)
    assert_no_jobs(slurm)


def test_stop_cancels_running_jobs_and_leaves_no_process(tmp_path):
    own = LocalSlurm(cpus=2, memory_mb=2000)
    try:
        own.start()
        daemons = [psutil.Process(p) for p in own.pids.values()]
        # each job writes its sleep's PID once the sleep runs: squeue says RUNNING as soon as the controller
        # has allocated the job, before slurmd has started its step daemon and script
        ids = [own.run("sbatch", "--parsable", f"--chdir={tmp_path}", "--wrap",
                       'sleep 300 & echo $! > "sleep.$SLURM_JOB_ID"; wait').strip() for _ in range(2)]
        pid_files = [tmp_path / f"sleep.{i}" for i in ids]
        assert wait_until(lambda: all(f.exists() and f.read_text().strip() for f in pid_files), 20), own.jobs()
        sleeps = {int(f.read_text()) for f in pid_files}
        assert {j.state for j in own.jobs()} == {"RUNNING"}
        job_procs = own.leftovers()  # the two job scripts, their sleeps and step daemons
        assert sleeps <= {p.pid for p in job_procs if p.name() == "sleep"}, (sleeps, job_procs)
        workdir = own.dir
    finally:
        own.stop()
    assert ids and not workdir.exists() and own.conf is None
    assert not [p for p in daemons + job_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(SlurmError, match="not started"):
        own.jobs()


def test_bad_configuration_names_the_daemon_and_its_log(tmp_path):
    broken = LocalSlurm(cpus=2, memory_mb=2000, partition="bad name with spaces", start_timeout=10)
    with pytest.raises(SlurmError) as err:
        broken.start()
    assert "slurmctld exited with code 1" in str(err.value) and "Parse error" in str(err.value)
    assert "slurmd exited" not in str(err.value)  # not started before the controller answers
    assert broken.dir is None and not broken.pids
