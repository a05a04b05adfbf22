"""``work_queue_worker`` processes on this machine for our manager: start, respawn, stop.

Each worker leads its own session (``start_new_session``), so what it leaves
behind (the warm servers of ``worker.py``, the task of a worker killed from
outside) is found by session and stopped by PID with it (``casa_executors.procs``).
A worker that exits is started again, up to ``RESPAWNS_PER_WORKER`` times per
worker. Workers started another way (batch jobs) would sit beside this class,
with the same ``start``/``tend``/``pids``/``stop``.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from casa_executors import procs

log = logging.getLogger(__name__)

RESPAWNS_PER_WORKER = 3


@dataclass
class _Worker:
    proc: subprocess.Popen
    log: Path


class LocalWorkers:
    """``count`` single-core workers connecting to ``host:port`` with the run's ``password_file``; logs and work
    directories in ``directory``."""

    def __init__(self, count: int, host: str, port: int, directory: Path, password_file: Path | None = None) -> None:
        self.count = count
        self._host, self._port = host, port
        self._directory, self._password_file = directory, password_file
        self._workers: list[_Worker] = []
        self._sessions: set[int] = set()  # every worker started: each leads a session
        self._respawns = 0
        self._serial = itertools.count()  # log names, never reused

    def start(self) -> None:
        for _ in range(self.count):
            self._spawn()

    def _spawn(self) -> None:
        log_file = self._directory / f"worker-{next(self._serial)}.log"
        workdir = self._directory / "workers"
        workdir.mkdir(exist_ok=True)
        # a fixed --disk: a worker that re-measures its free disk may decline ("forsake") a task
        # given all it had announced when someone else writes to the disk meanwhile; and one that finds
        # less free disk than it announced disconnects ("has less than the promised disk space"), which
        # with --single-shot means it exits: announce half of what is free, so others' writes leave margin
        disk_mb = shutil.disk_usage(workdir).free // 2**20 // 2 // max(self.count, 1)
        cmd = ["work_queue_worker", "--cores", "1", "--disk", str(disk_mb), "--single-shot", "--parent-death",
               "--connect-timeout", "60", "--idle-timeout", "900", "--workdir", str(workdir)]
        if self._password_file is not None:
            cmd += ["--password", str(self._password_file)]
        with open(log_file, "w") as out:
            proc = subprocess.Popen([*cmd, self._host, str(self._port)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._workers.append(_Worker(proc, log_file))
        self._sessions.add(proc.pid)

    def tend(self) -> bool:
        """Start workers again in place of those that exited (while the budget lasts); True if any had."""
        dead = [w for w in self._workers if w.proc.poll() is not None]
        if not dead:
            return False
        while dead and self._respawns < RESPAWNS_PER_WORKER * self.count:
            gone = dead.pop()
            self._workers.remove(gone)
            self._respawns += 1
            log.info("workqueue: local work_queue_worker %d exited (status %s); starting another",
                     gone.proc.pid, gone.proc.returncode)
            self._spawn()
        return True

    def all_exited(self) -> bool:
        return all(w.proc.poll() is not None for w in self._workers)

    def last_words(self) -> str:
        """The last line the newest worker logged (why it exited, when it did)."""
        if not self._workers:
            return ""
        return "".join(self._workers[-1].log.read_text(errors="replace").strip().splitlines()[-1:])

    def pids(self) -> list[int]:
        """PIDs of the workers that are running."""
        return [w.proc.pid for w in self._workers if w.proc.poll() is None]

    def stop(self, grace: float = 10) -> None:
        """Stop the workers (SIGTERM, ``grace`` s, SIGKILL), then whatever is left in their sessions."""
        procs.terminate([w.proc for w in self._workers if w.proc.poll() is None], grace=grace)
        # warm servers, the task of a worker killed from outside
        if left := procs.in_sessions(self._sessions):
            log.info("workqueue: killing %s, left behind by local workers", [p.pid for p in left])
            procs.kill(left)
        self._workers, self._sessions = [], set()
