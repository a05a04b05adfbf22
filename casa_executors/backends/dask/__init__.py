"""Dask distributed: an existing ``Client``, a scheduler address (TLS), our own LocalCluster, or a cluster
to size: ``cluster=`` (any distributed/dask-jobqueue cluster) or ``gateway=`` (dask-gateway), see ``cluster.py``.

The driver retries, so dask must not: tasks go in with ``retries=0``, and the
LocalCluster we own has ``allowed-failures = 0``, so a task whose worker dies
fails with ``KilledWorker`` instead of being re-run silently by the scheduler.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from casa_executors.backends.base import Backend, default_workers, plural
from casa_executors.backends.dask.cluster import ManagedCluster, facility
from casa_executors.backends.dask.pushed import PushedResults
from casa_executors.backends.dask.security import client_security, cluster_security, make_secrets_dir
from casa_executors.backends.scaling import DEFAULT_WORKER_TIMEOUT, check_adapt, check_worker_timeout
from casa_executors.errors import BackendUnavailable, ExecutorOptionError, WorkerLost

log = logging.getLogger(__name__)
TRIM_VAR = "MALLOC_TRIM_THRESHOLD_"
WORKER_PROFILER = "distributed.worker.profile.enabled"

if TYPE_CHECKING:
    from distributed import Client, LocalCluster, Security

__all__ = ["DaskBackend", "make_secrets_dir"]


def _allowed_failures(dask_scheduler: Any) -> int:
    return dask_scheduler.allowed_failures


def trim_threshold() -> str | None:
    """On a worker: its MALLOC_TRIM_THRESHOLD_ (a function of this module, so the worker reads its own)."""
    return os.environ.get(TRIM_VAR)


class DaskBackend(Backend):
    name = "dask"
    holds_results = True  # outputs stay in worker memory and merge there (outputs.EnginePlacement)
    # the scheduler hands out queued tasks highest ``priority=`` first, then in submission order; a worker
    # already holds up to ceil(worker-saturation 1.1 x threads) of them, which go first
    honours_priority = True

    def __init__(
        self,
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
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        cluster_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workers)
        if client is not None and address is not None:
            raise ExecutorOptionError("dask: give client= or address=, not both")
        if (cluster is not None or gateway is not None) and (client is not None or address is not None):
            raise ExecutorOptionError("dask: give one of client=, address=, cluster=, gateway= "
                                      "(with gateway=, cluster= names one of your gateway clusters)")
        self._adapt = check_adapt("dask", adapt)
        self._worker_timeout = check_worker_timeout("dask", worker_timeout)
        self._facility = facility(cluster, gateway, auth, cluster_options, workers, self._adapt,
                                  self._worker_timeout)
        self._managed: ManagedCluster | None = None
        self._given_cluster, self._gateway = cluster, gateway  # for describe()
        if workers is not None and (client is not None or address is not None):
            raise ExecutorOptionError("dask: workers= starts a LocalCluster; it cannot go with client= or address=")
        if secrets_dir is not None and security is not None:
            raise ExecutorOptionError("dask: give secrets_dir= or security=, not both")
        if client is not None and (secrets_dir is not None or security is not None):
            raise ExecutorOptionError("dask: a client= already has its security; drop secrets_dir=/security=")
        if not isinstance(processes, bool):
            raise ExecutorOptionError(f"dask: processes must be True or False, got {processes!r}")
        if client is not None:
            from distributed import Client

            if not isinstance(client, Client):
                raise ExecutorOptionError(f"dask: client must be a distributed.Client, got {client!r}")
        if security is not None:
            from distributed import Security

            if not isinstance(security, Security):
                raise ExecutorOptionError(f"dask: security must be a distributed.Security, got {security!r}")
        if secrets_dir is not None:  # check the files now: a missing one is named at build time
            security = client_security(secrets_dir) if address is not None else cluster_security(secrets_dir)
        if address is not None:
            address = self._check_address(address, security)
        if workers is None and client is None and address is None and self._facility is None:
            self._workers = default_workers()
        self._user_client = client
        self._address = address
        self._security = security
        self._processes = processes
        self._client: Client | None = None
        self._cluster: LocalCluster | None = None
        self._seen_workers = 0
        self._checked_scheduler = False
        self._pushed: PushedResults | None = None  # chunk metadata arriving as events, while started

    @staticmethod
    def _check_address(address: Any, security: Security | None) -> str:
        if not isinstance(address, str) or not address:
            raise ExecutorOptionError(f"dask: address must be a string like 'tls://host:8786', got {address!r}")
        tls = security is not None and security.require_encryption
        if "://" not in address:
            return ("tls://" if tls else "tcp://") + address
        scheme = address.split("://", 1)[0]
        if scheme == "tls" and security is None:
            raise ExecutorOptionError(f"dask: {address} is a TLS scheduler; give secrets_dir= (or security=)")
        if tls and scheme != "tls":
            raise ExecutorOptionError(f"dask: secrets_dir=/security= need a tls:// address, got {address!r}")
        return address

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            return f"the dask backend needs the 'distributed' package ({exc})"
        return None

    # -- lifetime ----------------------------------------------------------------
    def _start(self) -> None:
        from distributed import Client, LocalCluster

        if self._facility is not None:
            managed = self._facility()
            self._client = managed.start()
            self._managed = managed
        elif self._user_client is not None:
            if self._user_client.status not in ("running", "connecting", "newly-created"):
                raise BackendUnavailable(f"dask: the client given is {self._user_client.status}")
            self._client = self._user_client
        elif self._address is not None:
            try:
                self._client = Client(self._address, security=self._security, set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise BackendUnavailable(
                    f"dask: cannot connect to the scheduler at {self._address}: {type(exc).__name__}: {exc}"
                ) from exc
        else:
            import dask

            # dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's dynamic mmap
            # threshold: every buffer of a chunk's arrays is then mmap'd and unmapped again, and Q8 spends
            # 40 % of its CPU in the kernel (docs/performance.md). Our workers keep glibc's default.
            environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
            environ.pop(TRIM_VAR, None)
            # nor do they run dask's statistical profiler (a sample of every thread's stack each 10 ms, for
            # the dashboard): ADL Q8 on 2 workers, efficiency 0.87-0.90 with it, 0.92-0.94 without (docs/performance.md)
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, WORKER_PROFILER: False}):
                self._cluster = LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=self._processes,
                    # in this process the workers talk over inproc://, which a host= makes the scheduler refuse
                    **({"host": "127.0.0.1"} if self._processes else {}),
                    dashboard_address="127.0.0.1:0",  # its HTTP server binds here, not on 0.0.0.0:8787
                    security=self._security,
                    # a task on a lost worker fails (KilledWorker): the driver retries it, and counts it
                    scheduler_kwargs={"allowed_failures": 0},
                )
            try:
                self._client = Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                self._cluster = None
                raise
        if self._cluster is None and not self._checked_scheduler:
            self._checked_scheduler = True
            self._warn_if_scheduler_retries()
            self._warn_if_workers_trim()
        self._pushed = PushedResults.attach(self._client)

    def _warn_if_scheduler_retries(self) -> None:
        try:
            allowed = self._client.run_on_scheduler(_allowed_failures)
        except Exception:  # the scheduler may refuse run_on_scheduler; nothing to check then
            return
        if allowed:
            warnings.warn(
                f"dask: the scheduler re-runs a task whose worker died up to {allowed} times "
                "(distributed.scheduler.allowed-failures); those attempts do not reach the driver or "
                "its report. Start the scheduler with DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0.",
                stacklevel=2,
            )

    def _warn_if_workers_trim(self) -> None:
        try:
            trimming = [w for w, v in self._client.run(trim_threshold).items() if v]
        except Exception:  # no worker yet (adaptive), or run refused: nothing to check
            return
        if trimming:
            log.warning(
                "dask: %d of the workers run with %s set (dask's default distributed.nanny.pre-spawn-environ), "
                "which makes glibc map and unmap every large array: chunk tasks can take up to twice the time. "
                "Start the workers with that variable removed from distributed.nanny.pre-spawn-environ.",
                len(trimming), TRIM_VAR)

    def _stop(self) -> None:
        _ = self.workers  # remember the count for a report begun before the next start
        pushed, self._pushed = self._pushed, None
        if pushed is not None:
            pushed.release()
        managed, self._managed = self._managed, None
        if managed is not None:  # it closes our client and gives back what the run asked for
            self._client = None
            managed.stop()
            return
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        try:
            if client is not None and client is not self._user_client:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()

    # -- what the driver uses ------------------------------------------------------
    def submit(self, fn: Callable[[Any], Any], arg: Any, priority: int = 0) -> Future:
        if self._client is None:
            raise BackendUnavailable("dask: the backend is not started")
        if self._client.status not in ("running", "newly-created"):
            # reconnecting after losing the scheduler: a future submitted now would never finish
            raise WorkerLost(f"dask: the client is {self._client.status} (it lost the scheduler)")
        # a distributed Future: add_done_callback/result/cancel; a lost task raises KilledWorker
        future = self._client.submit(fn, arg, pure=False, retries=0, priority=priority)
        if self._managed is not None:
            self._managed.wait_first_worker()  # adapt=(0, n): the work asks for the first worker
        return future

    def submit_many(self, fn: Callable[[Any], Any], args: list[Any], priority: int = 0) -> list[Future]:
        """One ``client.map``: one message to the scheduler for all of them."""
        if not args:
            return []
        if self._client is None or self._client.status not in ("running", "newly-created"):
            return super().submit_many(fn, args, priority)  # submit() says why, for each
        futures = self._client.map(fn, args, pure=False, retries=0, priority=priority)
        if self._managed is not None:
            self._managed.wait_first_worker()
        return futures

    def submit_held(self, fn: Callable[[Any], Any], strip: Callable[[Any], Any],
                    args: list[Any], priority: int = 0) -> list[tuple[Future, Any]]:
        """Chunk batches whose outputs stay on the workers: one task each, its metadata pushed as an event
        (``pushed.py``) instead of fetched by a second task."""
        if self._pushed is None or self._client.status not in ("running", "newly-created"):
            return super().submit_held(fn, strip, args, priority)  # submit() says why, for each
        out = self._pushed.submit(fn, args, priority)
        if self._managed is not None:
            self._managed.wait_first_worker()
        return out

    def _nthreads(self) -> dict[str, int]:
        client = self._client or self._user_client
        if client is None or self._cluster is not None:
            return {}
        try:
            return dict(client.nthreads())
        except Exception:
            return {}

    @property
    def workers(self) -> int:
        """Our LocalCluster's size; for an external cluster the workers connected now
        (while not connected: as many as at the last connection)."""
        if self._address is None and self._user_client is None and self._facility is None:
            return self._workers or 1
        n = len(self._nthreads())
        if n:
            if n != self._seen_workers and self._seen_workers:
                log.info("dask: %d workers connected (%d before)", n, self._seen_workers)
            self._seen_workers = n
        return n or self._seen_workers or 1

    def max_inflight(self) -> int:
        threads = sum(self._nthreads().values()) or self.workers
        if self._adapt is not None:  # enough queued work for adaptive scaling to ask for up to the maximum
            threads = max(threads, self._adapt[1])
        return 2 * threads

    @property
    def workers_local(self) -> bool:
        return self._cluster is not None  # our LocalCluster

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> process id (of the worker process, not of its nanny)."""
        return dict(self._client.run(os.getpid)) if self._client is not None else {}

    def describe(self) -> str:
        """The engine as it is: ``dask(2 workers, LocalCluster)``, ``dask(2 workers, SLURMCluster at
        tcp://..., adapt=(0, 2))``, ``dask(3 workers, client of scheduler tcp://...)``."""
        ours = self._address is None and self._user_client is None and self._facility is None
        if ours:
            n = self.workers
            where = "LocalCluster" + ("" if self._processes else " in this process")
        else:
            n = len(self._nthreads()) or self._seen_workers
            where = self._where()
        size = plural(n, "worker") if n else "no worker yet"
        return f"dask({size}, {where}{f', adapt={self._adapt}' if self._adapt else ''})"

    def _where(self) -> str:
        """An engine we did not start: the cluster's class and scheduler, or the client's scheduler."""
        if self._gateway is not None:
            if self._managed is not None and self._managed.label:
                return self._managed.label  # the gateway cluster's name, once it has one
            return (f"gateway cluster {self._given_cluster} at {self._gateway}" if self._given_cluster
                    else f"a new gateway cluster at {self._gateway}")
        if self._given_cluster is not None:
            cluster = self._given_cluster
            try:
                address = cluster.scheduler_address
            except Exception:  # a cluster closed by its owner
                address = None
            return type(cluster).__name__ + (f" at {address}" if address else "")
        if self._user_client is not None:
            client = self._user_client
            try:
                address = client.scheduler.address
            except Exception:
                address = None
            cluster = getattr(client, "cluster", None)
            of = f"{type(cluster).__name__} " if cluster is not None else ""
            return f"client of {of}scheduler {address}" if address else f"client of {of}scheduler".rstrip()
        return self._address

    @property
    def cluster_name(self) -> str | None:
        """The gateway cluster's name (or the cluster object's), while started."""
        cluster = self._managed.cluster if self._managed is not None else None
        return getattr(cluster, "name", None)
