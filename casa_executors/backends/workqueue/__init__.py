"""The Work Queue backend, one module per concern (laid out like Parsl's own Work Queue executor).

* ``backend.py`` — :class:`WorkQueueBackend`: the driver's side: inputs, futures, the password, stopping by PID.
* ``manager.py`` — the Work Queue manager, a process of its own (documented Python API only), lost workers.
* ``channel.py`` — the messages between the two (pickles over a socket pair).
* ``discovery.py`` — finding the Python module (``ndcctools.work_queue`` or Debian's ``work_queue``).
* ``local_workers.py`` — ``work_queue_worker`` processes on this machine: start, respawn, stop by PID.
* ``slurm.py`` — workers as batch jobs (``submit="slurm"``) through cctools' ``work_queue_factory``.
* ``worker.py`` — the stdlib-only script each task runs on a worker (and its warm per-worker server).
"""

from casa_executors.backends.workqueue.backend import WorkQueueBackend
from casa_executors.backends.workqueue.discovery import DIST_PACKAGES, import_work_queue

__all__ = ["DIST_PACKAGES", "WorkQueueBackend", "import_work_queue"]
