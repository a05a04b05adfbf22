"""Work Queue workers as Slurm jobs: ``workqueue(submit="slurm", workers=N | adapt=(min, max))``.

cctools' ``work_queue_factory -T slurm`` watches our manager and keeps between
``min`` and ``max`` workers submitted (``workers=N``: exactly N), one core
each; a worker idle for ``IDLE_S`` seconds exits and its job ends, and the
factory, stopped by PID when the run ends, cancels the jobs it still has.

Each job runs a small wrapper instead of the bare worker: ``umask 077`` and a
fresh private work directory (``mktemp -d`` under the job's ``$TMPDIR``),
removed when the job ends. Tasks and their inputs, the bearer token inside
them included, therefore sit on the worker's disk readable by the job's owner
only. (cctools 9.9 does not encrypt manager-worker traffic; the run's password file,
given to the factory with ``--password``, keeps strangers' workers out.)

Jobs carry a ``--comment`` naming this manager, so that whatever the factory
leaves behind can still be found and cancelled.

``adapt=``: the factory sizes the pool from the manager's queue (tasks waiting
and running, workers connected). Asked directly (``<host> <port>``), cctools
9.9's factory reads it without authenticating (its ``do_direct_query`` sends
``queue_status`` on a bare connection; ``--password`` only goes to the
workers), so our password-protected manager answers nothing ("couldn't read
queue status") and the factory never goes beyond ``--min-workers``. So with
``adapt=`` the run starts a ``catalog_server`` of its own (on the address the
workers dial, a free port, stopped by PID with the factory), the manager
advertises itself there under the run's own project name
(``specify_catalog_server``; ``name=`` is not used), and the factory is run
with ``-M <project> --catalog <host:port>``, the catalog mode cctools
documents; its workers find the manager through the same catalog and still
give the password. Both loops are cctools' own: the manager sends its status
when ``wait`` first runs with work queued, then at most every 60 s
(``WORK_QUEUE_UPDATE_INTERVAL``), and the factory looks every 30 s; neither is
a setting in 9.9. So the first workers are asked for within about 30 s of the
first task, and the pool grows further at that pace.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from casa_executors import procs
from casa_executors.backends.scaling import Adapt, describe_size, slurm_job_states, wait_for_workers
from casa_executors.errors import BackendUnavailable, ExecutorOptionError

log = logging.getLogger(__name__)

SUBMITTERS = ("slurm",)
IDLE_S = 10  # a worker without a task for this long exits (adapt gives it back)
CATALOG_START_S = 10  # how long catalog_server may take to write its port


def submit_unavailable(kind: str) -> str | None:
    for tool in ("work_queue_factory", "work_queue_worker", "sbatch", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return f"workqueue: submit={kind!r} needs {tool} on PATH (coop-computing-tools, slurm-client)"
    return None


def _wrapper(worker: str) -> str:
    return "\n".join([
        "#!/bin/sh",
        "# a private work directory for this worker, gone when the job ends",
        "umask 077",
        'd=$(mktemp -d "${TMPDIR:-/tmp}/casa-wq-worker.XXXXXXXX") || exit 1',
        "trap 'rm -rf \"$d\"' EXIT",
        f'{shlex.quote(worker)} --workdir "$d" "$@" &',
        "child=$!",
        "# cancelled: the task files go at once (Slurm's SIGKILL may come before the worker has stopped),",
        "# and what the stopping worker (or its warm server, which leaves the job's process group and follows",
        "# the worker within half a second) wrote meanwhile goes after it",
        "trap 'rm -rf \"$d\"; kill -TERM $child 2>/dev/null; wait $child; sleep 1; rm -rf \"$d\"; exit 143' TERM INT",
        'wait "$child"',
        "",
    ])


class Catalog:
    """A ``catalog_server`` for one run: the manager reports its queue there, the factory and its workers read it.

    ``-Z`` has it pick a free port and write it to a file (no race for the port), ``-S`` answers queries in
    its own process (no children to stop), and ``-u ''`` keeps it from reporting itself to cctools' public
    catalogs, its default."""

    def __init__(self, host: str, scratch: Path) -> None:
        self.host, self.scratch = host, scratch
        self._proc: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> str:
        """Start it; its ``host:port``."""
        binary = shutil.which("catalog_server")
        if binary is None:
            raise BackendUnavailable("workqueue: submit= with adapt= needs catalog_server on PATH "
                                     "(coop-computing-tools)")
        self.scratch.mkdir(mode=0o700)
        port_file = self.scratch / "catalog.port"
        cmd = [binary, "-Z", str(port_file), "-S", "-u", "", "-o", str(self.scratch / "catalog.log")]
        if self.host not in ("0.0.0.0", ""):
            cmd += ["-I", self.host]  # else every interface, as the manager
        with open(self.scratch / "catalog.out", "wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.scratch)
        port, deadline = None, time.monotonic() + CATALOG_START_S
        while port is None and self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # it says nothing else when it listens
            port = _read_port(port_file)
        if port is None:
            why = (self.scratch / "catalog.out").read_text(errors="replace").strip().splitlines()[-1:]
            self.stop()
            raise BackendUnavailable(f"workqueue: catalog_server did not start within {CATALOG_START_S} s"
                                     f"{': ' + why[0] if why else ''}")
        self.address = f"{manager_address(self.host)}:{port}"
        log.info("catalog_server for the factory at %s", self.address)
        return self.address

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            procs.terminate([proc], grace=5)


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def batch_workers(submit: object, workers: int | None, adapt: Adapt | None, batch_options: object,
                  worker_timeout: float) -> BatchWorkers | None:
    """Check ``submit=`` and the options that go with it; the factory to start, or None."""
    if submit is None:
        if adapt is not None or batch_options is not None:
            raise ExecutorOptionError("workqueue: adapt= and batch_options= need submit= (e.g. submit='slurm')")
        return None
    if submit not in SUBMITTERS:
        raise ExecutorOptionError(f"workqueue: submit must be one of: {', '.join(SUBMITTERS)}; got {submit!r}")
    if workers is not None and adapt is not None:
        raise ExecutorOptionError("workqueue: give workers= or adapt=, not both")
    if batch_options is not None and not isinstance(batch_options, str):
        raise ExecutorOptionError(f"workqueue: batch_options must be a string of sbatch options, got "
                                  f"{batch_options!r}")
    return BatchWorkers(str(submit), workers, adapt, batch_options or "", worker_timeout)


class BatchWorkers:
    """One ``work_queue_factory`` for one manager, and the jobs it submits."""

    def __init__(self, kind: str, workers: int | None, adapt: Adapt | None, batch_options: str = "",
                 worker_timeout: float = 300.0) -> None:
        self.kind, self.workers, self.adapt = kind, workers, adapt
        self.batch_options, self.worker_timeout = batch_options, worker_timeout
        self.tag = f"casa-wq-{secrets.token_hex(6)}"
        self._proc: subprocess.Popen | None = None
        self.scratch: Path | None = None
        self.seen = False
        self.failed: BackendUnavailable | None = None
        self._catalog: Catalog | None = None

    @property
    def at_start(self) -> bool:
        """Workers are asked for before any work: the run waits for the first one when it starts."""
        lo, _ = self.bounds
        return lo > 0

    def wait_first(self, connected: Callable[[], int]) -> None:
        """Return once a worker is connected; after ``worker_timeout`` raise, and from then on at once."""
        if self.seen:
            return
        if self.failed is not None:
            raise self.failed
        try:
            wait_for_workers(connected, self.worker_timeout, lambda: self.missing(self.worker_timeout), self.alive)
        except BackendUnavailable as exc:
            self.failed = exc
            raise
        self.seen = True

    @property
    def bounds(self) -> tuple[int, int]:
        return self.adapt if self.adapt is not None else (self.workers or 1, self.workers or 1)

    def manager_config(self, host: str, staging: Path, name: str | None) -> dict[str, str]:
        """What the manager needs before it starts: with ``adapt=``, the catalog to report its queue to
        (started here) and the project name to report it under (see the module's docstring)."""
        if self.adapt is None:
            return {}
        if name is not None:
            log.warning("workqueue: with submit= and adapt= the manager is listed in the run's own catalog "
                        "as %s; name=%r is not used", self.tag, name)
        self._catalog = Catalog(host, staging / "catalog")
        return {"name": self.tag, "catalog": self._catalog.start()}

    def start(self, manager: str, port: int, staging: Path, password_file: Path | None) -> None:
        self.seen, self.failed = False, None
        reason = submit_unavailable(self.kind)
        if reason:
            raise BackendUnavailable(reason)
        worker = shutil.which("work_queue_worker") or "work_queue_worker"
        self.scratch = staging / "factory"
        self.scratch.mkdir(mode=0o700)
        wrapper = staging / "casa_wq_worker"  # the factory copies it into its scratch directory
        wrapper.write_text(_wrapper(worker))
        wrapper.chmod(0o700)
        lo, hi = self.bounds
        options = f"--comment={self.tag} {self.batch_options}".strip()
        cmd = ["work_queue_factory", "-T", self.kind, "--min-workers", str(lo), "--max-workers", str(hi),
               "--cores", "1", "--timeout", str(IDLE_S), "--worker-binary", str(wrapper),
               "--scratch-dir", str(self.scratch), "--batch-options", options, "--parent-death",
               "-o", str(self.scratch / "factory.log")]
        if password_file is not None:
            cmd += ["--password", str(password_file)]
        if self._catalog is not None:  # the project name has no regular expression characters: it is our tag
            cmd += ["--manager-name", self.tag, "--catalog", self._catalog.address]
        else:
            cmd += [manager, str(port)]
        with open(self.scratch / "factory.out", "wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.scratch)
        log.info("work_queue_factory -T %s for %s:%d, %s", self.kind, manager, port,
                 describe_size(self.workers, self.adapt))

    def alive(self) -> str | None:
        """None while the factory runs, else why it stopped (for a clear error instead of a long wait)."""
        if self._proc is None or self._proc.poll() is None:
            return None
        tail = (self.scratch / "factory.out").read_text(errors="replace").strip().splitlines()[-3:]
        return f"workqueue: work_queue_factory exited with code {self._proc.returncode}: {' | '.join(tail)}"

    def job_ids(self) -> list[str]:
        """Jobs this factory submitted that Slurm still lists."""
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True, timeout=10,
                                 stdin=subprocess.DEVNULL).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line.split()[0] for line in out.splitlines() if line.strip().endswith(self.tag)]

    def missing(self, timeout: float) -> str:
        ids = self.job_ids()
        jobs = (f"its job(s) {', '.join(ids)} ({slurm_job_states(ids)})" if ids
                else "no job of it is in the queue (see factory.log)")
        return (f"workqueue: no worker joined within {timeout:g} s (work_queue_factory -T {self.kind}, "
                f"{describe_size(self.workers, self.adapt)}); {jobs}. Raise worker_timeout= if the queue is slow")

    def stop(self) -> None:
        """Stop the factory by PID (it cancels its jobs), then cancel any job of ours still listed."""
        proc, self._proc = self._proc, None
        if proc is not None:
            procs.terminate([proc], grace=15)
        catalog, self._catalog = self._catalog, None
        if catalog is not None:
            catalog.stop()
        left = self.job_ids()
        if left:
            log.warning("workqueue: cancelling jobs the factory left: %s", left)
            subprocess.run(["scancel", *left], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


def manager_address(host: str) -> str:
    """The address batch workers dial: this machine's name when the manager listens on every interface."""
    if host in ("0.0.0.0", ""):
        import socket

        return socket.getfqdn()
    return host
