"""One coffea analysis on any compute backend, reading through XCache.

    ex = casa_executors.futures(workers=2)
    out = processor.Runner(executor=ex, schema=NanoAODSchema)(fileset, MyProcessor())
    print(ex.report)
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any, Unpack

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
from casa_executors.options import FACTORIES, DriverOptions, check_driver_options, factory
from casa_executors.report import Report

if TYPE_CHECKING:
    from distributed import Client, Security
    from parsl.config import Config
    from pyspark.sql import SparkSession

# engine events are logged (casa_executors.*), silent unless the application configures logging or calls
# casa_executors.log_to_stderr()
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "CheckpointMismatch", "ChunkError", "Driver", "DriverOptions",
    "ExecutorOptionError",
    "Progress", "RemoteError", "Report", "UntrustedData", "WorkerLost", "create", "dask", "futures", "iterative",
    "log_to_stderr", "parsl",
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

_DEFAULT_WORKER_TIMEOUT = 300.0  # backends.scaling.DEFAULT_WORKER_TIMEOUT (tests/test_api.py checks they agree)


def backend_class(name: str) -> type[Backend]:
    if name not in _CLASSES:
        raise ExecutorOptionError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = _CLASSES[name].split(":")
    try:
        found: type[Backend] = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} needs a package that is missing: {exc}") from exc
    return found


def unavailable(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else the reason."""
    try:
        return backend_class(name).unavailable()
    except BackendUnavailable as exc:
        return str(exc)


def create(name: str, **options: Any) -> Driver:
    """An executor for backend ``name`` (one of :data:`BACKENDS`): ``create("dask", workers=2)`` is
    ``dask(workers=2)``; ``help()`` of each factory lists its options."""
    if name not in FACTORIES:
        raise ExecutorOptionError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    built: Driver = FACTORIES[name](**options)
    return built


def _build(name: str, arguments: dict[str, Any]) -> Driver:
    """The executor a factory was called for: ``arguments`` are its ``locals()``, its own parameters (the
    backend's) and ``options`` (the driver's)."""
    arguments = dict(arguments)
    driver_options = arguments.pop("options")
    check_driver_options(name, driver_options)
    return Driver(backend=backend_class(name)(**arguments), **driver_options)


_RETURNS = """
    Returns
    -------
    Driver
        A coffea executor: ``processor.Runner(executor=...)``. Nothing starts until a run; ``with executor:``
        keeps the engine up across several runs. ``executor.report`` describes the last run.
"""


@factory("iterative", """Every chunk in this thread, one after the other.

    Parameters
    ----------
    workers : int, default 1
        Must be 1.
{driver}
""" + _RETURNS)
def iterative(*, workers: int = 1, **options: Unpack[DriverOptions]) -> Driver:
    return _build("iterative", locals())


@factory("futures", """Local worker processes (a loky process pool of our own).

    Workers are fresh interpreters (none inherits this process's threads) and do not re-run your
    ``__main__``: scripts and notebooks need no ``if __name__ == "__main__":``.

    Parameters
    ----------
    workers : int, optional
        Processes (default: one per core, at most 4).
{driver}
""" + _RETURNS + """
    Examples
    --------
    ::

        ex = casa_executors.futures(workers=2)
        out = processor.Runner(executor=ex, schema=NanoAODSchema)(fileset, MyProcessor())
""")
def futures(*, workers: int | None = None, **options: Unpack[DriverOptions]) -> Driver:
    return _build("futures", locals())


@factory("dask", """Dask distributed: a client or scheduler of yours, a LocalCluster of our own, or a cluster to size.

    Give one of ``client``, ``address`` (with ``secrets_dir`` or ``security`` for TLS), ``cluster``
    (a dask-jobqueue or distributed cluster, sized with ``workers`` or ``adapt``) or ``gateway``; with
    none of them ``workers=N`` starts a LocalCluster for the run.

    Parameters
    ----------
    client : distributed.Client, optional
        A client of yours (its cluster stays yours).
    address : str, optional
        A scheduler's address, e.g. ``"tls://host:8786"``.
    secrets_dir : str or os.PathLike, optional
        A folder of TLS files in coffea-casa's layout (CA, certificate, key), checked now; with
        ``address`` for the client, else for the LocalCluster we start.
    security : distributed.Security, optional
        TLS settings, instead of ``secrets_dir``.
    workers : int, optional
        Workers of our LocalCluster (default: one per core, at most 4); with ``cluster`` or ``gateway``,
        workers asked for the run. Not with ``client`` or ``address``.
    processes : bool, default True
        Our LocalCluster's workers are processes (False: threads of this process).
    cluster : distributed cluster or str, optional
        A cluster object of yours (``SLURMCluster(...)``, any distributed cluster), sized through its
        adaptivity for the run and never closed here; with ``gateway``, the name of one of your gateway
        clusters.
    gateway : str, optional
        A dask-gateway's URL (``https://...``): a cluster of your own for the run, over TLS, shut down after
        it unless the executor is held (``with ex:``).
    auth : optional
        The gateway's authentication: a dask-gateway ``Auth``, ``"kerberos"``, ``"jupyterhub"``, or
        ``(user, password)`` for HTTP Basic.
{adapt}
{worker_timeout}
    cluster_options : dict, optional
        Options of the gateway cluster to create (``{{"worker_memory": 4}}``).
{driver}
""" + _RETURNS + """
    Examples
    --------
    ::

        ex = casa_executors.dask(workers=2)
        ex = casa_executors.dask(address="tls://host:8786", secrets_dir="/etc/cmsaf-secrets")
        ex = casa_executors.dask(cluster=SLURMCluster(cores=1, memory="2GB"), adapt=(0, 100))
""")
def dask(
    *,
    client: Client | None = None,
    address: str | None = None,
    secrets_dir: str | os.PathLike[str] | None = None,
    security: Security | None = None,
    workers: int | None = None,
    processes: bool = True,
    cluster: Any = None,
    gateway: str | None = None,
    auth: Any = None,
    adapt: tuple[int, int] | None = None,
    worker_timeout: float = _DEFAULT_WORKER_TIMEOUT,
    cluster_options: dict[str, Any] | None = None,
    **options: Unpack[DriverOptions],
) -> Driver:
    return _build("dask", locals())


@factory("parsl", """Parsl: any Config, a local HighThroughputExecutor, or blocks submitted by a provider.

    Parameters
    ----------
    config : parsl.config.Config, optional
        A Config of yours (copied now; never one already loaded). Not with ``workers`` alone.
    workers : int, optional
        Workers of a local HighThroughputExecutor (default: one per core, at most 4); with ``provider``,
        workers asked for the run (one block each).
    provider : parsl provider, optional
        Blocks as batch jobs (``SlurmProvider(...)``), sized with ``workers`` or ``adapt``; blocks get this
        environment's ``bin`` on ``PATH``.
{adapt}
    host : str, optional
        The address workers dial (parsl finds one when not given).
{worker_timeout}
{driver}
""" + _RETURNS + """
    Examples
    --------
    ::

        ex = casa_executors.parsl(workers=2)
        ex = casa_executors.parsl(provider=SlurmProvider(partition="debug"), adapt=(0, 10))
""")
def parsl(
    *,
    config: Config | None = None,
    workers: int | None = None,
    provider: Any = None,
    adapt: tuple[int, int] | None = None,
    host: str | None = None,
    worker_timeout: float = _DEFAULT_WORKER_TIMEOUT,
    **options: Unpack[DriverOptions],
) -> Driver:
    return _build("parsl", locals())


@factory("spark", """Spark: local, a standalone master, or a session of yours.

    Parameters
    ----------
    master : str, optional
        ``"local[N]"`` (default: ``local[workers]``) or ``"spark://host:7077"``.
    session : pyspark.sql.SparkSession, optional
        A session of yours, with a SparkContext (Spark Connect has no RDD API). Not with ``master``.
    workers : int, optional
        Cores of a local master (default: one per core, at most 4).
    conf : dict, optional
        Spark settings for the SparkContext we start (``spark.task.maxFailures`` stays 1: the driver retries).
{driver}
""" + _RETURNS + """
    Examples
    --------
    ::

        ex = casa_executors.spark(master="local[2]")
""")
def spark(
    *,
    master: str | None = None,
    session: SparkSession | None = None,
    workers: int | None = None,
    conf: dict[str, Any] | None = None,
    **options: Unpack[DriverOptions],
) -> Driver:
    return _build("spark", locals())


@factory("workqueue", """Work Queue: local ``work_queue_worker`` processes, workers you start, or batch jobs.

    A manager process of our own; workers must give its password (one made for the run unless you give one).

    Parameters
    ----------
    workers : int, optional
        Local ``work_queue_worker`` processes (default: one per core, at most 4, unless ``port`` is given);
        with ``submit``, workers asked for the run.
    port : int, optional
        The manager's port (0 picks one); alone, the run waits for workers started elsewhere.
    python : str, optional
        The interpreter tasks run with on the workers (default: this one).
    name : str, optional
        The manager's project name.
    password : str, optional
        The workers' password, for workers you start yourself.
    password_file : str or os.PathLike, optional
        A file holding it (yours; ``work_queue_worker -P FILE``). Not with ``password``.
    host : str, default "127.0.0.1"
        The IPv4 address the workers we start dial (``"0.0.0.0"``: this machine's name).
    warm : bool, default True
        Tasks hand their work to a server process that stays warm on each worker (False: a fresh
        interpreter per task).
    submit : str, optional
        ``"slurm"``: workers are batch jobs ``work_queue_factory`` submits, sized with ``workers`` or ``adapt``.
{adapt}
    batch_options : str, optional
        sbatch options of the worker jobs (``"--partition=debug --time=01:00:00"``); with ``submit``.
{worker_timeout}
{driver}
""" + _RETURNS + """
    Examples
    --------
    ::

        ex = casa_executors.workqueue(workers=2)
        ex = casa_executors.workqueue(submit="slurm", adapt=(0, 50), host="0.0.0.0")
""")
def workqueue(
    *,
    workers: int | None = None,
    port: int | None = None,
    python: str | None = None,
    name: str | None = None,
    password: str | None = None,
    password_file: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    warm: bool = True,
    submit: str | None = None,
    adapt: tuple[int, int] | None = None,
    batch_options: str | None = None,
    worker_timeout: float = _DEFAULT_WORKER_TIMEOUT,
    **options: Unpack[DriverOptions],
) -> Driver:
    return _build("workqueue", locals())


