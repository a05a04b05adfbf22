"""One coffea analysis on any compute backend, reading through XCache.

    ex = casa_executors.futures(workers=2)
    out = processor.Runner(executor=ex, schema=NanoAODSchema)(fileset, MyProcessor())
    print(ex.report)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
from typing import Any

from casa_executors.backends.base import Backend
from casa_executors.driver import Driver
from casa_executors.errors import (
    BackendUnavailable,
    CheckpointMismatch,
    ChunkError,
    ExecutorOptionError,
    RemoteError,
    UntrustedData,
    WorkerLost,
)
from casa_executors.live import Progress
from casa_executors.logs import log_to_stderr
from casa_executors.report import Report

# engine events are logged (casa_executors.*), silent unless the application configures logging or calls
# casa_executors.log_to_stderr()
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "CheckpointMismatch", "ChunkError", "Driver", "ExecutorOptionError",
    "RemoteError", "Report", "UntrustedData", "WorkerLost", "create", "dask", "futures", "iterative", "log_to_stderr",
    "parsl", "Progress",
    "spark", "unavailable", "workqueue",
]

BACKENDS = ("iterative", "futures", "dask", "parsl", "spark", "workqueue")

_CLASSES = {
    "iterative": "casa_executors.backends.iterative:IterativeBackend",
    "futures": "casa_executors.backends.futures:FuturesBackend",
    "dask": "casa_executors.backends.dask:DaskBackend",
    "parsl": "casa_executors.backends.parsl:ParslBackend",
    "spark": "casa_executors.backends.spark:SparkBackend",
    "workqueue": "casa_executors.backends.workqueue:WorkQueueBackend",
}

_DRIVER_OPTIONS = {f.name for f in dataclasses.fields(Driver)} - {"backend", "report"}


def backend_class(name: str) -> type[Backend]:
    if name not in _CLASSES:
        raise ExecutorOptionError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = _CLASSES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} needs a package that is missing: {exc}") from exc


def unavailable(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else the reason."""
    try:
        return backend_class(name).unavailable()
    except BackendUnavailable as exc:
        return str(exc)


def create(name: str, **options: Any) -> Driver:
    """An executor for backend ``name``; options are the backend's and the driver's."""
    cls = backend_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    backend_opts = {k: v for k, v in options.items() if k in accepted}
    driver_opts = {k: v for k, v in options.items() if k in _DRIVER_OPTIONS}
    unknown = set(options) - set(backend_opts) - set(driver_opts)
    if unknown:
        valid = sorted(set(accepted) | _DRIVER_OPTIONS)
        bad = sorted(unknown)[0]
        hint = difflib.get_close_matches(bad, valid, n=1)
        raise ExecutorOptionError(
            f"{name}(): unknown option {bad!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; valid options are: {', '.join(valid)}"
        )
    return Driver(backend=cls(**backend_opts), **driver_opts)


def iterative(**options: Any) -> Driver:
    """Every chunk in this thread, one after the other."""
    return create("iterative", **options)


def futures(**options: Any) -> Driver:
    """Local worker processes: ``futures(workers=N)``."""
    return create("futures", **options)


def dask(**options: Any) -> Driver:
    """Dask distributed: ``client=``, ``address=`` (+ ``secrets_dir=``), ``workers=N`` for a LocalCluster,
    ``cluster=`` (a dask-jobqueue/distributed cluster) or ``gateway=`` (+ ``auth=``) with ``workers=N`` or
    ``adapt=(min, max)``."""
    return create("dask", **options)


def parsl(**options: Any) -> Driver:
    """Parsl: ``config=``, ``workers=N`` for a local HighThroughputExecutor, or ``provider=`` (e.g. a
    SlurmProvider) with ``workers=N`` or ``adapt=(min, max)`` for blocks on a batch system."""
    return create("parsl", **options)


def spark(**options: Any) -> Driver:
    """Spark: ``master="local[2]"`` or ``"spark://host:7077"``, or ``session=``."""
    return create("spark", **options)


def workqueue(**options: Any) -> Driver:
    """Work Queue: ``workers=N`` local work_queue_worker processes, ``port=`` for external ones, or
    ``submit="slurm"`` with ``workers=N`` or ``adapt=(min, max)`` for workers as batch jobs."""
    return create("workqueue", **options)
