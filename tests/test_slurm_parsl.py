"""Parsl on a real Slurm: HighThroughputExecutor blocks are Slurm jobs (parsl's SlurmProvider)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time

import pytest
from analysis import FACILITY_QUERY, assert_adl_identical, require_engine, run
from facility import SecretWatch, assert_no_jobs, new_temp_entries, same_physics, wait_until

import casa_executors as ce
from casa_executors.errors import BackendUnavailable


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("parsl")


def provider(slurm, jobdir, extra: str = ""):
    from parsl.launchers import SingleNodeLauncher
    from parsl.providers import SlurmProvider

    return SlurmProvider(partition=slurm.partition, exclusive=False, nodes_per_block=1, walltime="00:20:00",
                         launcher=SingleNodeLauncher(), scheduler_options=f"#SBATCH --chdir={jobdir}\n{extra}")


class StrategyLooked(logging.Handler):
    """Set once parsl's scaling strategy has looked at an executor without work and taken no action
    (its debug record "Strategy case 1a"): after that, a block it asked for would already be a Slurm job."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "case 1a" in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def strategy_looked():
    logger = logging.getLogger("parsl.jobs.strategy")
    handler, level = StrategyLooked(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.event
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_adl_queries_on_blocks_that_come_with_work_and_go_when_idle(slurm, served, tmp_path, sample_files, reference):
    from casa_executors.backends.parsl import ParslBackend
    from casa_executors.backends.parsl_provider import IDLE_S

    temp_before = set(os.listdir(tempfile.gettempdir()))
    backend = ParslBackend(provider=provider(slurm, tmp_path), adapt=(0, 2), host="127.0.0.1", worker_timeout=60)
    counts: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            counts.append(sum(j.state != "COMPLETING" for j in slurm.jobs()))  # a cancelled block may linger
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    with strategy_looked() as looked:  # before hold(): the strategy looks once the engine is up
        backend.hold()
        try:
            assert looked.wait(30), "parsl's strategy never looked at the executor"
            assert not slurm.jobs()  # adapt=(0, 2): nothing asked for before there is work
            sampler.start()
            assert_adl_identical(backend, sample_files, queries=FACILITY_QUERY)
            # through a token-checking XCache: the token reaches the blocks with each task, never at rest for others
            roots = lambda: [slurm.dir, tmp_path, backend.run_dir, *new_temp_entries(temp_before)]  # noqa: E731
            with SecretWatch(served.token.encode(), roots) as token_seen:
                ex = ce.Driver(backend=backend, status=False, **served.driver_options())
                out = run(ex, served.urls)
            assert same_physics(out, reference)
            assert ex.report.summary()["served_by"] == {f"xcache:{served.cache}": 12}
            assert not token_seen.exposed(), token_seen.seen
            jobs = {j.id for j in slurm.jobs()}
            workers = {r.worker for r in ex.report.rows()}
            assert workers and all(w.startswith("slurm:") for w in workers)
            assert {w.split("/", 1)[0][len("slurm:"):] for w in workers} <= jobs
            # idle blocks are cancelled while the executor is still held
            assert wait_until(lambda: not slurm.jobs(), 10 * IDLE_S), slurm.jobs()
        finally:
            done.set()
            backend.release()
    assert 1 <= max(counts) <= 2, counts
    assert_no_jobs(slurm)


def test_blocks_that_never_start_are_named(slurm, tmp_path, sample_files):
    ex = ce.parsl(provider=provider(slurm, tmp_path, "#SBATCH --begin=now+1hour"), workers=1, host="127.0.0.1",
                  worker_timeout=4, status=False)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as err:
        run(ex, sample_files)
    assert time.monotonic() - t0 < 40
    msg = str(err.value)
    assert "parsl: no worker joined within 4 s (asked SlurmProvider for workers=1)" in msg, msg
    assert "PENDING (BeginTime)" in msg, msg
    assert_no_jobs(slurm)


def test_provider_options_are_checked(slurm, tmp_path):
    from casa_executors.errors import ExecutorOptionError

    with pytest.raises(ExecutorOptionError, match="provider must be a parsl ExecutionProvider"):
        ce.parsl(provider="slurm")
    with pytest.raises(ExecutorOptionError, match="config= or provider="):
        from parsl.config import Config

        ce.parsl(config=Config(), provider=provider(slurm, tmp_path))
    with pytest.raises(ExecutorOptionError, match=r"adapt must be \(minimum, maximum\)"):
        ce.parsl(provider=provider(slurm, tmp_path), adapt=(0, 0))
    with pytest.raises(ExecutorOptionError, match="workers= or adapt="):
        ce.parsl(provider=provider(slurm, tmp_path), adapt=(0, 2), workers=2)
