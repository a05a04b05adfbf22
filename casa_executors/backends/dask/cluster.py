"""A cluster the dask backend did not start itself: sized for the run, waited for, given back.

``dask(cluster=<any distributed or dask-jobqueue cluster>, workers=N | adapt=(min, max))``:
the cluster object stays the user's (never closed here); what the run asked
for is given back when the work ends, by adaptivity: ``adapt=`` stays on, and
``workers=N`` turns into ``adapt(0, N)`` after the run, so idle workers go
within seconds while the next call (coffea's Runner makes two) still finds
the busy ones. A dask-gateway cluster goes through the same class
(``backends.dask.gateway`` opens it and says whether it is ours to shut down).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from casa_executors.backends.scaling import Adapt, describe_size, slurm_job_states, wait_for_workers
from casa_executors.errors import BackendUnavailable, ExecutorOptionError

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


def check_cluster(cluster: Any) -> None:
    """Anything with ``scale``, ``adapt`` and a scheduler address, as distributed's ``Cluster`` API has."""
    missing = [a for a in ("scale", "adapt", "scheduler_address") if not hasattr(cluster, a)]
    if missing:
        raise ExecutorOptionError(
            f"dask: cluster must be a distributed/dask-jobqueue/dask-gateway cluster object "
            f"(with scale, adapt and scheduler_address); {type(cluster).__name__} has no {', '.join(missing)}"
        )


class ManagedCluster:
    """One run's use of a cluster: size it, connect, wait for a first worker, give back what was asked for."""

    def __init__(self, cluster: Any, workers: int | None, adapt: Adapt | None, worker_timeout: float,
                 owned: bool = False, label: str | None = None) -> None:
        self.cluster, self.workers, self.adapt = cluster, workers, adapt
        self.worker_timeout, self.owned = worker_timeout, owned
        self.label = label if label is not None else type(cluster).__name__
        self.client: Client | None = None
        self.seen_worker = False
        self._no_worker: BackendUnavailable | None = None

    # -- lifetime ------------------------------------------------------------------------------
    def start(self) -> Client:
        self._size()
        try:
            self.client = self._connect()
            if (self.adapt and self.adapt[0] > 0) or self.workers:
                self.wait_first_worker()  # the run can start on one; the rest join as they come
        except BaseException:
            self.stop()  # what was asked for is given back (a cluster we created is shut down)
            raise
        return self.client

    def _size(self) -> None:
        # always through adapt(): it replaces the adaptivity a previous run left on (scale() would not)
        if self.adapt is not None:
            self.cluster.adapt(minimum=self.adapt[0], maximum=self.adapt[1])
        elif self.workers:
            self.cluster.adapt(minimum=self.workers, maximum=self.workers)

    def _connect(self) -> Client:
        from distributed import Client

        if not _in_process(self.cluster):
            return self.cluster.get_client(set_as_default=False)  # dask-gateway: its TLS security comes with it
        return Client(self.cluster, set_as_default=False)

    def stop(self) -> None:
        """Close our client, give back the workers the run asked for; shut the cluster down if ours."""
        client, self.client = self.client, None
        try:
            if client is not None:
                client.close()
        finally:
            self._release()

    def _release(self) -> None:
        """Give back what the run asked for. Coffea's Runner calls the executor twice (preprocessing,
        processing): workers idle between the calls are released by adaptivity, not cancelled and
        submitted again. ``adapt=`` stays on (idle workers go within seconds); ``workers=N`` becomes
        ``adapt(0, N)``; a cluster we created is shut down."""
        if self.owned:
            with contextlib.suppress(Exception):
                (getattr(self.cluster, "shutdown", None) or self.cluster.close)()
            return
        try:
            if self.adapt is None and self.workers:
                self.cluster.adapt(minimum=0, maximum=self.workers)
        except Exception as exc:  # a cluster already closed by its owner has nothing to give back
            log.info("dask: could not give the workers of %s back: %s", self.label, exc)

    # -- workers ---------------------------------------------------------------------------------
    def connected(self) -> int:
        if self.client is None:
            return 0
        try:
            n = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        except TypeError:  # older distributed: no n_workers argument
            n = len(self.client.scheduler_info().get("workers", {}))
        except Exception:
            return 0
        self.seen_worker = self.seen_worker or n > 0
        return n

    def wait_first_worker(self) -> None:
        """Return once a worker is connected; after ``worker_timeout`` raise, and from then on at once."""
        if self.seen_worker:
            return
        if self._no_worker is not None:
            raise self._no_worker
        try:
            wait_for_workers(self.connected, self.worker_timeout, self.missing)
        except BackendUnavailable as exc:
            self._no_worker = exc
            raise
        self.seen_worker = True

    def missing(self) -> str:
        return (f"dask: no worker joined {self.label} within {self.worker_timeout:g} s "
                f"(asked for {describe_size(self.workers, self.adapt)}); {self.pending()}. "
                "Raise worker_timeout= if the queue is slow")

    def pending(self) -> str:
        """What the cluster did about workers: its batch jobs and their queue state, if it has any."""
        jobs = {name: getattr(job, "job_id", None) for name, job in getattr(self.cluster, "workers", {}).items()}
        if not jobs:
            return "the cluster has started no worker"
        ids = [j for j in jobs.values() if j]
        if not ids:
            return f"{len(jobs)} worker(s) requested, no batch job submitted for them"
        text = f"{len(ids)} batch job(s) submitted: {', '.join(ids)}"
        submit = str(getattr(getattr(self.cluster, "job_cls", None), "submit_command", ""))
        states = slurm_job_states(ids) if submit.startswith("sbatch") else None
        return f"{text} ({states})" if states else text


def _in_process(cluster: Any) -> bool:
    """A distributed ``Cluster`` (LocalCluster, dask-jobqueue...), not a dask-gateway one run by a server."""
    from distributed.deploy import Cluster

    return isinstance(cluster, Cluster)


def facility(cluster: Any, gateway: Any, auth: Any, cluster_options: Any, workers: int | None,
             adapt: Adapt | None, worker_timeout: float) -> Callable[[], ManagedCluster] | None:
    """Check ``cluster=``/``gateway=`` and their options now; return what builds the run's cluster handle."""
    if auth is not None or cluster_options is not None:
        if gateway is None:
            raise ExecutorOptionError("dask: auth= and cluster_options= go with gateway=")
    if cluster_options is not None and not isinstance(cluster_options, dict):
        raise ExecutorOptionError(f"dask: cluster_options must be a dict, got {cluster_options!r}")
    if workers is not None and adapt is not None:
        raise ExecutorOptionError("dask: give workers= or adapt=, not both")
    if gateway is not None:
        if not isinstance(gateway, str) or not gateway.startswith(("http://", "https://")):
            raise ExecutorOptionError(f"dask: gateway must be the gateway's URL (http://... or https://...), "
                                      f"got {gateway!r}")
        if cluster is not None and not isinstance(cluster, str):
            raise ExecutorOptionError("dask: with gateway=, cluster= is the name of one of your gateway clusters")
        from casa_executors.backends.dask.gateway import GatewayCluster, make_auth

        auth_obj = make_auth(auth)
        return lambda: GatewayCluster(gateway, auth_obj, cluster, cluster_options, workers, adapt, worker_timeout)
    if cluster is None:
        if adapt is not None:
            raise ExecutorOptionError("dask: adapt= sizes a cluster you give: add cluster= or gateway=")
        return None
    if isinstance(cluster, str):
        raise ExecutorOptionError(f"dask: cluster={cluster!r} names a gateway cluster: add gateway=")
    check_cluster(cluster)
    return lambda: ManagedCluster(cluster, workers, adapt, worker_timeout)
