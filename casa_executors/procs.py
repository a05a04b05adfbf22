"""Stopping processes by PID: the one place that signals, waits and reaps.

Every engine and stand-in we start is stopped through here: SIGTERM, a grace
period, SIGKILL for what is still running, and a wait that reaps our own
children. psutil does the process-table work (descendants, zombies, waits).
Worker-side scripts that must stay stdlib-only (``backends/workqueue/worker.py``,
``standins/relay.py``) keep their own few lines.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Iterable

import psutil

log = logging.getLogger(__name__)

ProcessLike = int | psutil.Process | subprocess.Popen


def _as_process(p: ProcessLike) -> psutil.Process | None:
    try:
        if isinstance(p, psutil.Process):
            return p
        return psutil.Process(p.pid if isinstance(p, subprocess.Popen) else int(p))
    except (psutil.NoSuchProcess, ValueError):
        return None


def alive(pid: int) -> bool:
    """True if ``pid`` is a running process (a zombie does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid``, children first."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def cmdline(pid: int) -> str:
    """The command line of ``pid`` joined by spaces; empty if it is gone or not ours to read."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def with_environ(name: str, value: str, among: Iterable[psutil.Process] | None = None) -> list[psutil.Process]:
    """Processes whose environment has ``name=value`` (a marker we set on what we start), among ``among``
    (every process when None)."""
    found = []
    for proc in psutil.process_iter() if among is None else among:
        try:
            if proc.environ().get(name) == value:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def children(pid: int | None = None) -> list[psutil.Process]:
    """The direct children of ``pid`` (this process by default)."""
    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []


def in_sessions(sids: Iterable[int]) -> list[psutil.Process]:
    """Running processes (not this one, not zombies) whose session is one of ``sids``: what the
    session leaders we started (``start_new_session=True``) left behind, orphans included."""
    sids = set(sids)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) in sids and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return found


def wait_or_kill(procs: Iterable[ProcessLike], grace: float = 5.0) -> list[int]:
    """Give processes already on their way out ``grace`` seconds, then SIGKILL the rest.

    For a process told to stop some other way (stdin closed, a pipe closed);
    returns the PIDs killed. ``subprocess.Popen`` objects and our own children
    are reaped, so no zombie is left.
    """
    procs = list(procs)
    targets = [p for p in (_as_process(x) for x in procs) if p is not None and p.pid != os.getpid()]
    _, survivors = psutil.wait_procs(targets, timeout=grace) if grace > 0 else ([], targets)
    killed = []
    for p in survivors:
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.Error:
            pass
    if killed:
        log.info("killed %s after a %.1f s grace period", killed, grace)
        psutil.wait_procs(survivors, timeout=5)
    for x in procs:
        if isinstance(x, subprocess.Popen):
            try:
                x.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("process %d did not exit after SIGKILL", x.pid)
    return killed


def terminate(procs: Iterable[ProcessLike], grace: float = 5.0, sig: int = signal.SIGTERM) -> list[int]:
    """Send ``sig``, wait up to ``grace`` seconds, SIGKILL the rest; returns the PIDs killed.

    ``subprocess.Popen`` objects are waited for too, so no zombie is left.
    """
    procs = list(procs)
    for x in procs:
        p = _as_process(x)
        if p is not None and p.pid != os.getpid():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
    return wait_or_kill(procs, grace=grace)


def kill(procs: Iterable[ProcessLike]) -> list[int]:
    """SIGKILL at once (a process that must not clean up, or whose parent is gone)."""
    return wait_or_kill(procs, grace=0)


def terminate_tree(root: ProcessLike, grace: float = 5.0) -> list[int]:
    """Stop ``root`` and every process below it (found before the signal)."""
    proc = _as_process(root)
    try:
        below = proc.children(recursive=True) if proc is not None else []
    except psutil.Error:
        below = []
    items: list[ProcessLike] = [root, *below]
    return terminate(items, grace=grace)
