"""A real dask-gateway-server on 127.0.0.1 for tests, benchmarks and demos.

One server process (it starts its own proxy) with password authentication
(:class:`~casa_executors.standins.gateway_server.PasswordAuthenticator`, one
password per user) and one of two backends:

- ``backend="local"``: dask-gateway's ``UnsafeLocalBackend``: schedulers and
  workers are local processes of the gateway's account;
- ``backend="slurm"``: dask-gateway's ``SlurmBackend`` on a
  :class:`~casa_executors.standins.slurm.LocalSlurm`: the scheduler and every
  worker are Slurm jobs (submitted from the gateway's account, see
  ``gateway_server.SlurmSharedAccountBackend``).

Clusters are reached as ``gateway://127.0.0.1:PORT/<name>`` through the proxy's
one port (HTTP and TLS share it), over TLS 1.3 with per-cluster certificates.
distributed 2026.8 has no ``dask-scheduler``/``dask-worker`` commands:
scheduler and workers run as ``<venv>/bin/dask scheduler|worker``.

:meth:`LocalGateway.stop` stops the server by PID (it stops its clusters and
its proxy on the way out), then whatever still carries this gateway's marker
in its environment. The config file (it holds the passwords) is mode 600 in a
700 directory.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from casa_executors import procs
from casa_executors.standins.ports import free_port

if TYPE_CHECKING:
    from dask_gateway import BasicAuth

    from casa_executors.standins.slurm import LocalSlurm

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent
MARKER = "CASA_GATEWAY_RUN"  # in the environment of every scheduler and worker of one gateway


def _cwd(p: psutil.Process) -> str:
    try:
        return p.cwd()
    except psutil.Error:
        return ""


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


class GatewayError(RuntimeError):
    """The server did not start; the message carries its log tail."""


def gateway_unavailable() -> str | None:
    """None if a local dask-gateway-server can be started here, else why not."""
    for module, pkg in (("dask_gateway", "dask-gateway"),
                        ("dask_gateway_server", "dask-gateway-server[local,jobqueue]")):
        try:
            __import__(module)
        except ImportError:
            return f"dask-gateway is not installed (pip install {pkg})"
    for exe in ("dask-gateway-server", "dask"):
        if not (BIN / exe).exists():
            return f"{BIN / exe} is missing (pip install dask-gateway-server distributed)"
    return None


_LIVE: set[LocalGateway] = set()


@atexit.register
def _stop_all() -> None:
    for gw in list(_LIVE):
        gw.stop()


class LocalGateway:
    """``with LocalGateway({"alice": "pw-a", "bob": "pw-b"}) as gw: Gateway(gw.address, auth=gw.auth("alice"))``."""

    def __init__(self, users: dict[str, str] | None = None, backend: str = "local",
                 slurm: LocalSlurm | None = None, worker_memory_gb: float = 1.0,
                 start_timeout: float = 30.0) -> None:
        if backend not in ("local", "slurm"):
            raise ValueError(f"backend must be 'local' or 'slurm', not {backend!r}")
        if backend == "slurm" and slurm is None:
            raise ValueError("backend='slurm' needs slurm=<a started LocalSlurm>")
        self.users = dict(users or {"alice": secrets.token_urlsafe(12), "bob": secrets.token_urlsafe(12)})
        self.backend, self.slurm = backend, slurm
        self.worker_memory_gb = worker_memory_gb
        self.start_timeout = start_timeout
        self.port = 0
        self.dir: Path | None = None
        self.marker = secrets.token_hex(8)
        self._proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def proxy_address(self) -> str:
        """Where clients reach schedulers (``gateway://`` + this): the same port."""
        return f"gateway://{LOOPBACK}:{self.port}"

    def auth(self, user: str, password: str | None = None) -> BasicAuth:
        """dask-gateway's ``BasicAuth`` for ``user`` (with its password unless another is given)."""
        from dask_gateway import BasicAuth

        return BasicAuth(user, self.users[user] if password is None else password)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- lifetime ------------------------------------------------------------------------------
    def start(self) -> LocalGateway:
        if self._proc is not None:
            return self
        reason = gateway_unavailable()
        if reason:
            raise GatewayError(reason)
        _LIVE.add(self)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="casa-gateway-"))  # 700: the config holds passwords
            self.port = free_port()
            config = self.dir / "config.py"
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self._config())
            env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", MARKER: self.marker}
            with open(self.dir / "server.log", "ab") as out:
                self._proc = subprocess.Popen([str(BIN / "dask-gateway-server"), "-f", str(config)],
                                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              cwd=self.dir, env=env)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        log.info("dask-gateway-server up at %s (%s backend)", self.address, self.backend)
        return self

    def stop(self) -> None:
        """Stop the server (and with it its clusters and proxy), then what is left, by PID."""
        _LIVE.discard(self)
        proc, self._proc = self._proc, None
        if proc is not None:
            below = procs.descendants(proc.pid)
            procs.terminate([proc], grace=20)  # it stops its clusters first: give it time
            left = [p for p in below if p.is_running()]
            if left:
                log.warning("dask-gateway-server left %s running; stopping them", [p.pid for p in left])
                procs.terminate(left, grace=5)
        left = self.leftovers()
        if left:
            procs.terminate(left, grace=5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def leftovers(self) -> list[psutil.Process]:
        """Schedulers and workers of this gateway that are still running (not the server, not its proxy)."""
        server = self._proc.pid if self._proc is not None else None
        found = {p.pid: p for p in procs.with_environ(MARKER, self.marker)}
        if self.dir is not None:  # dask's setproctitle blanks /proc/PID/environ: their work dirs give them away
            found.update({p.pid: p for p in psutil.process_iter() if _cwd(p).startswith(str(self.dir))})
        return [p for pid, p in found.items()
                if pid not in (os.getpid(), server) and _name(p) != "dask-gateway-proxy"]

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.address}/api/health", timeout=2) as r:
            return json.loads(r.read())

    def log_tail(self, lines: int = 30) -> str:
        f = self.dir / "server.log" if self.dir is not None else None
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) if f and f.exists() else ""

    def __enter__(self) -> LocalGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalGateway({self.address}, backend={self.backend!r}, running={self.pid is not None})"

    # -- internals -----------------------------------------------------------------------------
    def _config(self) -> str:
        dask = str(BIN / "dask")
        # the executor retries a task whose worker died, and counts it: the scheduler must not re-run it
        env = {MARKER: self.marker, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        lines = [
            "c = get_config()  # noqa: F821",
            f"c.DaskGateway.address = {LOOPBACK + ':0'!r}",  # the private API
            f"c.Proxy.address = {f'{LOOPBACK}:{self.port}'!r}",  # HTTP and scheduler TLS on one port
            "c.DaskGateway.authenticator_class = 'casa_executors.standins.gateway_server.PasswordAuthenticator'",
            f"c.PasswordAuthenticator.passwords = {self.users!r}",
            f"c.ClusterConfig.scheduler_cmd = {[dask, 'scheduler']!r}",
            f"c.ClusterConfig.worker_cmd = {[dask, 'worker', '--host', LOOPBACK]!r}",
            "c.ClusterConfig.worker_cores = 1",
            "c.ClusterConfig.worker_threads = 1",
            # what a user may choose per cluster (dask_gateway's cluster_options), in GiB
            "from dask_gateway_server.options import Float, Options",
            "c.Backend.cluster_options = Options(",
            f"    Float('worker_memory', {self.worker_memory_gb!r}, min=0.25, label='Worker memory (GiB)'),",
            "    handler=lambda options: {'worker_memory': int(options.worker_memory * 2**30)})",
            "c.ClusterConfig.scheduler_memory = 2**30",
            "c.ClusterConfig.idle_timeout = 0",
            "c.ClusterConfig.adaptive_period = 1",
            # find out quickly that a job or process ended
            "c.DBBackendBase.cluster_status_period = 1",
            "c.DBBackendBase.worker_status_period = 1",
            "c.DBBackendBase.check_timeouts_period = 1",
        ]
        if self.backend == "local":
            lines += [
                "c.DaskGateway.backend_class = 'dask_gateway_server.backends.local.UnsafeLocalBackend'",
                f"c.UnsafeLocalBackend.clusters_directory = {str(self.dir / 'clusters')!r}",
                f"c.UnsafeLocalBackend.inherited_environment = ['PATH', 'LANG', 'LC_ALL', 'VIRTUAL_ENV', {MARKER!r}]",
                "c.UnsafeLocalBackend.sigint_timeout = 2",
            ]
        else:
            conf = str(self.slurm.conf)
            env["SLURM_CONF"] = conf
            lines += [
                "c.DaskGateway.backend_class = "
                "'casa_executors.standins.gateway_server.SlurmSharedAccountBackend'",
                f"c.SlurmSharedAccountBackend.slurm_conf = {conf!r}",
                f"c.SlurmSharedAccountBackend.staging_root = {str(self.dir / 'staging')!r}",
                f"c.SlurmSharedAccountBackend.dask_gateway_jobqueue_launcher = "
                f"{str(BIN / 'dask-gateway-jobqueue-launcher')!r}",
                f"c.SlurmClusterConfig.partition = {self.slurm.partition!r}",
                "c.SlurmClusterConfig.staging_directory = '{home}'",  # unused: staging_root decides
            ]
        lines.append(f"c.ClusterConfig.environment = {env!r}")
        return "\n".join(lines) + "\n"

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise GatewayError(f"dask-gateway-server exited with code {self._proc.returncode}\n{self.log_tail()}")
            try:
                if self.health().get("status") == "pass":
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.1)
        raise GatewayError(f"dask-gateway-server not healthy after {self.start_timeout:.0f} s\n{self.log_tail()}")
