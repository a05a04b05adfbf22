"""A per-user Dask cluster through dask-gateway.

``dask(gateway="https://gateway.example", auth=..., adapt=(0, 200))`` creates
a cluster for this user and shuts it down after the run (unless the executor
is held with ``with ex:``); ``cluster="<name>"`` connects to one of the user's
existing clusters instead, which stays up. The client reaches the scheduler
through the gateway's proxy over TLS, with the cluster's own certificate.

Errors name what went wrong, as :class:`BackendUnavailable`: the gateway
refused the credentials (401), the cluster belongs to someone else (403), the
gateway cannot be reached, no worker joined within ``worker_timeout``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from casa_executors.backends.dask.cluster import ManagedCluster
from casa_executors.backends.scaling import Adapt
from casa_executors.errors import BackendUnavailable, ExecutorOptionError


def make_auth(auth: Any) -> Any:
    """dask-gateway's auth: an ``Auth`` object, a kind (``"basic"``, ``"kerberos"``, ``"jupyterhub"``),
    ``(user, password)`` for HTTP Basic, or None for the dask config's ``gateway.auth``."""
    from dask_gateway import BasicAuth
    from dask_gateway.auth import get_auth

    if isinstance(auth, tuple) and len(auth) == 2 and all(isinstance(x, str) for x in auth):
        return BasicAuth(*auth)
    try:
        return get_auth(auth)
    except (TypeError, ValueError) as exc:
        raise ExecutorOptionError(
            f"dask: auth must be a dask_gateway Auth object, 'basic', 'kerberos', 'jupyterhub' or "
            f"(user, password); {exc}"
        ) from None


def close_gateway(gateway: Any) -> None:
    """``Gateway.close()``, and no second close at garbage collection: dask-gateway 2026.3's ``__del__``
    closes again, which raises on distributed 2026.8 once the loop has stopped ("Exception ignored")."""
    if gateway is None or not hasattr(gateway, "_loop_runner"):
        return
    try:
        with contextlib.suppress(RuntimeError):  # closed before (its loop is gone)
            gateway.close()
    finally:
        del gateway._loop_runner  # __del__ closes only what still has one


def _user(auth: Any) -> str:
    name = getattr(auth, "username", None)
    return f"user {name!r}" if name else "this user"


def gateway_error(exc: BaseException, address: str, auth: Any, name: str | None) -> BackendUnavailable:
    """A dask-gateway client error as a sentence that says what to fix."""
    status = getattr(exc, "status", None)
    who = _user(auth)
    if status == 401:
        why = f"the gateway at {address} refused the credentials of {who} (401 Unauthorized): check auth="
    elif status == 403:
        why = f"the gateway at {address} does not let {who} use cluster {name!r} (403 Forbidden)"
    elif status == 404 or (isinstance(exc, ValueError) and name and name in str(exc)):
        why = f"the gateway at {address} has no cluster {name!r} for {who}"
    elif isinstance(exc, (OSError, TimeoutError)):
        why = f"cannot reach the gateway at {address}: {type(exc).__name__}: {exc}"
    else:
        why = f"the gateway at {address} failed: {type(exc).__name__}: {exc}"
    return BackendUnavailable(f"dask: {why}")


class GatewayCluster(ManagedCluster):
    """A gateway cluster for one run: ours (created here) or the user's (connected by name)."""

    def __init__(self, address: str, auth: Any, name: str | None, options: dict[str, Any] | None,
                 workers: int | None, adapt: Adapt | None, worker_timeout: float) -> None:
        self.address, self.auth, self.name, self.options = address, auth, name, options
        self.gateway: Any = None
        super().__init__(None, workers, adapt, worker_timeout, owned=name is None, label="")

    def start(self):
        from dask_gateway import Gateway

        try:
            self.gateway = Gateway(self.address, auth=self.auth)
            if self.name is None:
                self.cluster = self.gateway.new_cluster(cluster_options=self._options(), shutdown_on_close=False)
            else:
                self.cluster = self.gateway.connect(self.name)
        except BackendUnavailable:
            self._close_gateway()
            raise
        except Exception as exc:
            self._close_gateway()
            raise gateway_error(exc, self.address, self.auth, self.name) from exc
        self.label = f"gateway cluster {self.cluster.name} at {self.address}"
        try:
            return super().start()
        except BaseException:
            self._close_gateway()
            raise

    def _options(self) -> Any:
        if not self.options:
            return None
        try:
            options = self.gateway.cluster_options()
            for key, value in self.options.items():
                options[key] = value
            return options
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise BackendUnavailable(f"dask: cluster_options {self.options!r} do not fit what the gateway at "
                                     f"{self.address} offers: {exc}") from None

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._close_gateway()

    def _release(self) -> None:
        if not self.owned:
            super()._release()  # the user's cluster: give back the workers the run asked for
        if self.cluster is not None:  # our handle (and its own Gateway client); ours to shut down if we made it
            with contextlib.suppress(Exception):
                self.cluster.close(shutdown=self.owned)
            close_gateway(getattr(self.cluster, "gateway", None))

    def _close_gateway(self) -> None:
        gateway, self.gateway = self.gateway, None
        close_gateway(gateway)

    def pending(self) -> str:
        try:
            report = self.gateway.get_cluster(self.cluster.name)
            status = getattr(report.status, "name", str(report.status))
        except Exception as exc:
            return f"the gateway could not be asked about it ({type(exc).__name__}: {exc})"
        return (f"the gateway lists it as {status} with no worker connected: its backend could not start one "
                "(a batch job refused or still queued, or a limit such as cluster_max_workers)")
