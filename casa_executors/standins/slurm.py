"""A real one-node Slurm cluster (munged, slurmctld, slurmd) on 127.0.0.1 for tests, benchmarks and demos.

Everything lives in one private directory: the munge key (mode 400) and socket,
``slurm.conf``, the controller's state, slurmd's spool, pid and log files. The
daemons run in the foreground as our children, on free ports, and talk only over
127.0.0.1 (``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny``). Clients (``sbatch``,
``squeue``, dask-jobqueue, parsl, the cctools submit scripts) find this cluster
through ``SLURM_CONF``: :meth:`LocalSlurm.export` sets it in ``os.environ``.

:meth:`LocalSlurm.stop` cancels every job, waits until ``squeue`` is empty,
stops the three daemons by PID and then anything that still carries this
cluster's ``SLURM_CONF`` in its environment (a job step's ``slurmstepd`` or a
job process that outlived its step). Needs root: slurmd starts jobs as their
users, and munged's key must be owned by the user it runs as.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from casa_executors import procs
from casa_executors.standins.ports import free_ports

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
NODE = "localhost"  # resolves on every machine, unlike the hostname
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo")


class SlurmError(RuntimeError):
    """The cluster could not start, or a Slurm command failed; the message carries the log tail."""


def slurm_unavailable() -> str | None:
    """None if a local Slurm can be started here, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing: "
                "apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts jobs as their users)"
    return None


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass(frozen=True)
class Job:
    id: str
    state: str  # squeue's long form: PENDING, RUNNING, COMPLETING...
    name: str
    user: str


_LIVE: set[LocalSlurm] = set()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


class LocalSlurm:
    """A one-node Slurm: ``with LocalSlurm() as slurm: ...`` (``SLURM_CONF`` exported while inside).

    ``cpus`` may exceed the machine's cores (jobs then share them); ``memory_mb``
    is what jobs may ask for in total (dask-jobqueue asks for ``--mem``).
    """

    def __init__(self, cpus: int = 8, memory_mb: int = 16_000, partition: str = "debug",
                 start_timeout: float = 30.0) -> None:
        self.cpus, self.memory_mb, self.partition = cpus, memory_mb, partition
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.conf: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._saved_conf: str | None = None
        self._exported = False

    # -- what clients need -------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The variables a client command needs (``SLURM_CONF``)."""
        if self.conf is None:
            raise SlurmError("the local Slurm is not started")
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        """A Slurm client command against this cluster; its stdout."""
        proc = subprocess.run(list(argv), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def jobs(self) -> list[Job]:
        """Every job ``squeue`` lists (pending, running, completing)."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%j|%u")
        return [Job(*line.split("|", 3)) for line in out.splitlines() if line.strip()]

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%T").strip()

    def export(self) -> None:
        """Point every Slurm client this process starts at this cluster (``os.environ['SLURM_CONF']``)."""
        if not self._exported:
            self._saved_conf = os.environ.get("SLURM_CONF")
            os.environ["SLURM_CONF"] = self.env["SLURM_CONF"]
            self._exported = True

    def unexport(self) -> None:
        if self._exported:
            if self._saved_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._saved_conf
            self._exported = False

    # -- lifetime ------------------------------------------------------------------------------
    def start(self) -> LocalSlurm:
        if self._procs:
            return self
        reason = slurm_unavailable()
        if reason:
            raise SlurmError(reason)
        _LIVE.add(self)
        try:
            self._layout()
            self._start_munge()
            self._spawn("slurmctld", [_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            # slurmd once the controller answers: it registers with it, and a configuration both refuse is
            # then reported by slurmctld's exit, not by whichever of the two a loaded machine ended first
            self._wait(lambda: self.run("sinfo", "-h", "-o", "%P") is not None, "slurmctld answering sinfo")
            self._spawn("slurmd", [_daemon("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        log.info("local Slurm up in %s (slurmctld port %s)", self.dir, self.ports[0])
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons and whatever they left, remove the directory."""
        _LIVE.discard(self)
        try:
            if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
                self.cancel_all()
        except (SlurmError, subprocess.TimeoutExpired) as exc:  # the daemons and job processes still go
            log.warning("local Slurm: %s", exc)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):  # clients of munge last
                proc = self._procs.pop(name, None)
                if proc is not None:
                    procs.terminate([proc], grace=5)
            self._stop_leftovers()
            self.unexport()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = self.conf = None

    def cancel_all(self, timeout: float = 30) -> None:
        """``scancel`` every job and wait until ``squeue`` lists none."""
        deadline = time.monotonic() + timeout
        ids = [j.id for j in self.jobs()]
        if ids:
            self.run("scancel", *ids, check=False)
        while (left := self.jobs()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            raise SlurmError(f"jobs still listed {timeout:.0f} s after scancel: {left}")

    def leftovers(self) -> list[psutil.Process]:
        """Processes (job steps, job processes) that still carry this cluster's SLURM_CONF."""
        if self.conf is None:
            return []
        mine = {os.getpid(), *(p.pid for p in self._procs.values())}
        return [p for p in procs.with_environ("SLURM_CONF", str(self.conf)) if p.pid not in mine
                and _is_job_process(p)]

    def _stop_leftovers(self) -> None:
        left = self.leftovers()
        if left:
            log.warning("stopping %d processes left by Slurm jobs: %s", len(left), [p.pid for p in left])
            procs.terminate(left, grace=2)

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def __enter__(self) -> LocalSlurm:
        self.start()
        self.export()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalSlurm({self.dir}, running={bool(self.pids)})"

    # -- internals -----------------------------------------------------------------------------
    def _layout(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="casa-slurm-"))
        self.dir.chmod(0o755)  # jobs of other users read slurm.conf through it
        for sub, mode in (("munge", 0o755), ("munge-key", 0o700), ("state", 0o700), ("spool", 0o755),
                          ("log", 0o700), ("run", 0o755)):
            (self.dir / sub).mkdir(mode=mode)
            (self.dir / sub).chmod(mode)
        self.ports = free_ports(2)
        self.munge_socket = self.dir / "munge" / "munge.socket.2"  # its folder: 755, or munged refuses others
        self.conf = self.dir / "slurm.conf"
        self.conf.write_text(self._conf_text())
        self.conf.chmod(0o644)

    def _conf_text(self) -> str:
        d = self.dir
        lines = {
            "ClusterName": "casa",
            "SlurmctldHost": f"{NODE}({LOOPBACK})",
            "SlurmctldPort": self.ports[0],
            "SlurmdPort": self.ports[1],
            "CommunicationParameters": "NoCtldInAddrAny,NoInAddrAny",  # both daemons listen on 127.0.0.1 only
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "StateSaveLocation": d / "state",
            "SlurmdSpoolDir": d / "spool",
            "SlurmctldPidFile": d / "run" / "slurmctld.pid",
            "SlurmdPidFile": d / "run" / "slurmd.pid",
            "SlurmctldLogFile": d / "log" / "slurmctld.log",
            "SlurmdLogFile": d / "log" / "slurmd.log",
            "ProctrackType": "proctrack/pgid",  # a job process whose parent died is still signalled (not so linuxproc)
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SwitchType": "switch/none",
            "MpiDefault": "none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core_Memory",
            "DefMemPerCPU": 512,  # a job that names no memory does not take the whole node's
            "SlurmdParameters": "config_overrides",  # more CPUs than the machine has: jobs share cores
            "ReturnToService": 2,
            "MailProg": "/bin/true",
            "KillWait": 5,  # seconds between SIGTERM and SIGKILL when a job is cancelled (sites: often 30)
            "MinJobAge": 5,
            "SchedulerParameters": "sched_interval=1",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items())
        text += (f"NodeName={NODE} NodeHostname={NODE} NodeAddr={LOOPBACK} CPUs={self.cpus} "
                 f"RealMemory={self.memory_mb} State=UNKNOWN\n"
                 f"PartitionName={self.partition} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n")
        return text

    def _start_munge(self) -> None:
        key = self.dir / "munge-key" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))
        m = self.dir / "munge"
        self._spawn("munged", [_daemon("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--log-file={m / 'munged.log'}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged's socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        with open(self.dir / "log" / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=env, cwd=self.dir)

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._check_running(what)
            with contextlib.suppress(SlurmError, subprocess.TimeoutExpired):
                if ready():
                    return
            if time.monotonic() >= deadline:
                self._check_running(what)  # a daemon that exited while a client command waited is named
                raise SlurmError(f"no {what} after {self.start_timeout:.0f} s\n" + self.log_tail())
            time.sleep(0.1)

    def _check_running(self, what: str) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with code {proc.returncode} while waiting for {what}\n"
                                 + self.log_tail())

    def _wait_idle(self) -> None:
        self._wait(lambda: self.node_state() == "idle", "idle node in sinfo")

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        if self.dir is not None:
            for f in sorted([*(self.dir / "log").glob("*"), self.dir / "munge" / "munged.log"]):
                if f.is_file():
                    tail = f.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {f.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def files_of_jobs(self) -> Iterator[Path]:
        """Every file in the controller's state and slurmd's spool (job scripts, environments)."""
        if self.dir is None:
            return
        for sub in ("state", "spool"):
            for root, _, files in os.walk(self.dir / sub):
                for f in files:
                    yield Path(root, f)


def _is_job_process(p: psutil.Process) -> bool:
    """A job step daemon or a process of a job (not a client command or a daemon of ours)."""
    try:
        return p.name().startswith("slurmstepd") or "SLURM_JOB_ID" in p.environ()
    except psutil.Error:
        return False
