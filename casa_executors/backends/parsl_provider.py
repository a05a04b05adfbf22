"""Parsl on a site's batch system: ``parsl(provider=SlurmProvider(...), adapt=(0, 10))``.

The provider runs HighThroughputExecutor blocks as batch jobs (one worker per
block unless the provider says ``cores_per_node``). ``workers=N`` keeps N
blocks; ``adapt=(min, max)`` lets parsl's ``htex_auto_scale`` strategy start
blocks as tasks arrive and cancel them after ``IDLE_S`` seconds without work;
the run's end cancels every block. Workers get this environment's ``bin`` on
``PATH`` and this checkout on ``PYTHONPATH`` (parsl's worker pool and our task
code); HTEX traffic is encrypted (CurveZMQ, parsl's default), which needs the
run directory's ``certificates`` on a filesystem the workers share.
"""

from __future__ import annotations

import copy
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any

from casa_executors.backends.base import worker_pythonpath
from casa_executors.backends.scaling import Adapt, describe_size, slurm_job_states, wait_for_workers
from casa_executors.errors import BackendUnavailable, ExecutorOptionError

if TYPE_CHECKING:
    from parsl.config import Config
    from parsl.dataflow.dflow import DataFlowKernel

LABEL = "casa_htex"
IDLE_S = 5.0  # a block without work for this long is cancelled (adapt)
HEARTBEAT = (2, 10)  # s: a lost block's tasks come back as ManagerLost after 10 s
# a pool holds one task ahead per worker: without it a worker that finishes waits for the round trip through
# the interchange before its next task starts, which on chunks of tens of ms halved the throughput
# (docs/performance.md: Q1 efficiency 0.32-0.47 without, 0.67-0.69 with)
PREFETCH_PER_WORKER = 1
RAISE = "Raise worker_timeout= if the queue is slow"


def from_provider(config: Any, provider: Any, workers: int | None, adapt: Adapt | None,
                  host: str | None) -> Config | None:
    """The Config to run when ``provider=`` (with ``workers=``/``adapt=``/``host=``) is given; None otherwise."""
    if provider is None:
        if adapt is not None or host is not None:
            raise ExecutorOptionError("parsl: adapt= and host= go with provider= (a Config sizes itself)")
        return None
    from parsl.providers.base import ExecutionProvider

    if config is not None:
        raise ExecutorOptionError("parsl: give config= or provider=, not both")
    if not isinstance(provider, ExecutionProvider):
        raise ExecutorOptionError(
            f"parsl: provider must be a parsl ExecutionProvider (SlurmProvider, CondorProvider...), got {provider!r}"
        )
    if workers is not None and adapt is not None:
        raise ExecutorOptionError("parsl: give workers= or adapt=, not both")
    if host is not None and not isinstance(host, str):
        raise ExecutorOptionError(f"parsl: host must be the address workers dial, got {host!r}")
    return provider_config(provider, workers, adapt, host)


def provider_config(provider: Any, workers: int | None, adapt: Adapt | None, host: str | None) -> Config:
    """A Config with one HighThroughputExecutor whose blocks ``provider`` submits."""
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.jobs.error_handlers import windowed_error_handler

    provider = copy.copy(provider)  # the user's object keeps its own block counts
    if adapt is not None:
        provider.init_blocks, provider.min_blocks, provider.max_blocks = adapt[0], adapt[0], adapt[1]
    elif workers is not None:
        provider.init_blocks = provider.min_blocks = provider.max_blocks = workers
    provider.worker_init = worker_env() + (getattr(provider, "worker_init", "") or "")
    workers_per_node = getattr(provider, "cores_per_node", None) or 1
    htex = HighThroughputExecutor(
        label=LABEL,
        provider=provider,
        address=host,
        max_workers_per_node=workers_per_node,
        cores_per_worker=1.0,
        prefetch_capacity=PREFETCH_PER_WORKER * workers_per_node,
        heartbeat_period=HEARTBEAT[0],
        heartbeat_threshold=HEARTBEAT[1],
        block_error_handler=windowed_error_handler,
    )
    return Config(executors=[htex], strategy="htex_auto_scale", strategy_period=0.5, max_idletime=IDLE_S,
                  retries=0, usage_tracking=0, initialize_logging=True)


def worker_env() -> str:
    """Shell lines giving a block this environment's scripts (process_worker_pool.py) and this package."""
    return (f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH\n"
            f"export PYTHONPATH={shlex.quote(worker_pythonpath())}\n")


class FirstWorker:
    """The run waits for its first worker pool; after ``timeout`` it fails, naming the blocks and their state."""

    def __init__(self, provider: Any, workers: int | None, adapt: Adapt | None, timeout: float) -> None:
        self.kind = type(provider).__name__
        self.workers, self.adapt, self.timeout = workers, adapt, timeout
        self.seen = False
        self.failed: BackendUnavailable | None = None

    @property
    def at_start(self) -> bool:
        """Workers are asked for before any work (``workers=N``, ``adapt=(min > 0, ...)``): wait at start."""
        return bool(self.workers) or bool(self.adapt and self.adapt[0] > 0)

    def wait(self, dfk: DataFlowKernel) -> None:
        if self.seen:
            return
        if self.failed is not None:
            raise self.failed
        try:
            wait_for_workers(lambda: connected(dfk), self.timeout, lambda: self.missing(dfk))
        except BackendUnavailable as exc:
            self.failed = exc
            raise
        self.seen = True

    def missing(self, dfk: DataFlowKernel) -> str:
        text = (f"parsl: no worker joined within {self.timeout:g} s "
                f"(asked {self.kind} for {describe_size(self.workers, self.adapt)})")
        try:
            jobs = [str(j) for j in dfk.executors[LABEL].blocks_to_job_id.values() if j]
        except (KeyError, AttributeError):  # the executor is gone: the message names no job
            jobs = []
        if not jobs:
            return text + "; no block was submitted (see the run directory's parsl.log). " + RAISE
        states = slurm_job_states(jobs) if "slurm" in self.kind.lower() else None
        return text + f"; {len(jobs)} block job(s) submitted: {', '.join(jobs)}" + \
            (f" ({states})" if states else "") + ". " + RAISE


def connected(dfk: DataFlowKernel | None) -> int:
    """Worker pools connected to our interchange."""
    try:
        return len(dfk.executors[LABEL].connected_managers())
    except Exception:
        return 0
