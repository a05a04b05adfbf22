"""The Work Queue backend (being split by concern: see ``backend.py``)."""

from casa_executors.backends.workqueue.backend import DIST_PACKAGES, WorkQueueBackend, _load_alone, import_work_queue

__all__ = ["DIST_PACKAGES", "WorkQueueBackend", "import_work_queue"]
