"""How a backend sizes a pool it does not run itself (a batch system, a gateway): one spelling everywhere.

- ``workers=N``: ask for N workers when the run starts, give them back when it ends.
- ``adapt=(min, max)``: ask for workers as work arrives (never fewer than
  ``min``, never more than ``max``) and give them back when the run ends or the
  pool idles.
- ``worker_timeout=`` (seconds): how long a run waits for its first worker
  before it fails with an error that says what is missing (jobs still pending
  in the batch queue, a gateway that starts no worker...).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

from casa_executors.errors import BackendUnavailable, ExecutorOptionError

DEFAULT_WORKER_TIMEOUT = 300.0  # batch queues can be slow; a site's user raises it, a test lowers it

Adapt = tuple[int, int]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_adapt(backend: str, adapt: object) -> Adapt | None:
    """``adapt`` as ``(min, max)`` with ``0 <= min <= max`` and ``max >= 1``; a clear error otherwise."""
    if adapt is None:
        return None
    if (not isinstance(adapt, (tuple, list)) or len(adapt) != 2 or not all(_whole(v) for v in adapt)
            or not 0 <= adapt[0] <= adapt[1] or adapt[1] < 1):
        raise ExecutorOptionError(
            f"{backend}: adapt must be (minimum, maximum) workers with 0 <= minimum <= maximum and "
            f"maximum >= 1, e.g. adapt=(0, 10); got {adapt!r}"
        )
    return int(adapt[0]), int(adapt[1])


def check_worker_timeout(backend: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ExecutorOptionError(f"{backend}: worker_timeout must be a number of seconds > 0, got {value!r}")
    return float(value)


def describe_size(workers: int | None, adapt: Adapt | None) -> str:
    if adapt is not None:
        return f"adapt={adapt}"
    return f"workers={workers}" if workers else "its current size"


def wait_for_workers(count: Callable[[], int], timeout: float, missing: Callable[[], str],
                     alive: Callable[[], str | None] = lambda: None, step: float = 0.2) -> int:
    """Wait until ``count() >= 1``; after ``timeout`` s raise :class:`BackendUnavailable` with ``missing()``.

    ``alive()`` returns a reason when waiting is pointless (the engine died).
    """
    deadline = time.monotonic() + timeout
    while True:
        n = count()
        if n >= 1:
            return n
        dead = alive()
        if dead:
            raise BackendUnavailable(dead)
        if time.monotonic() >= deadline:
            raise BackendUnavailable(missing())
        time.sleep(step)


def slurm_job_states(ids: list[str]) -> str | None:
    """``squeue``'s state and reason for each job, e.g. ``squeue: 123 PENDING (BeginTime)``."""
    if not ids or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T (%r)"], capture_output=True,
                             text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return "squeue: " + "; ".join(lines) if lines else "squeue lists none of them any more"
