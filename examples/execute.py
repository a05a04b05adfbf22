"""Run the example notebooks top to bottom in a fresh kernel, as CI does (tests/test_examples.py).

    .venv/bin/python examples/execute.py examples/*.ipynb   # re-run them and store the outputs in place

What a notebook leaves running is found and stopped by PID: every process below
this one seen while the notebook ran (dask's processes rewrite their environment
with setproctitle), and every process with the run's marker in its environment
(which a process that left our tree still has).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient

from casa_executors import procs

EXAMPLES = Path(__file__).resolve().parent
MARKER = "CASA_EXAMPLE_RUN"


class _ProcessWatch(threading.Thread):
    """Records every process below this one (not there before) until stopped."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.seen: dict[int, psutil.Process] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            for p in psutil.Process().children(recursive=True):
                if p.pid not in self.before:
                    self.seen.setdefault(p.pid, p)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def execute(
    path: str | os.PathLike[str], timeout: int = 300, grace: float = 10.0
) -> tuple[nbformat.NotebookNode, list[str]]:
    """Execute the notebook in its own folder; returns it with outputs, and what it left running.

    A cell that fails raises ``nbclient.exceptions.CellExecutionError``; what was
    left running is stopped by PID first. ``grace``: how long what is on its way out may take.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    marker = uuid.uuid4().hex
    # the venv's tools (dask, parsl's interchange, the python Work Queue tasks run) come first on PATH
    env = dict(os.environ, **{MARKER: marker, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    watch = _ProcessWatch()
    watch.start()
    try:
        client.execute(env=env)  # shuts the kernel down at the end
    finally:
        watch.stop()
        left = leftovers(marker, list(watch.seen.values()), grace)
    return nb, left


def leftovers(marker: str, seen: list[psutil.Process], grace: float = 10.0) -> list[str]:
    """What is still running ``grace`` s after the kernel stopped; stopped by PID, described."""
    deadline = time.monotonic() + grace
    while True:
        running = {p.pid: p for p in seen if _running(p)}
        running.update({p.pid: p for p in procs.with_environ(MARKER, marker) if p.pid != os.getpid()})
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    described = []
    for p in running.values():
        try:
            described.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            described.append(str(p.pid))
    procs.terminate(list(running.values()))
    return described


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(paths: list[str]) -> int:
    for p in paths:
        t0 = time.monotonic()
        nb, left = execute(p)
        nbformat.write(nb, p)
        print(f"{p}: executed in {time.monotonic() - t0:.1f} s, {Path(p).stat().st_size / 1e3:.0f} kB"
              + (f"; LEFT RUNNING (now stopped): {left}" if left else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or sorted(str(p) for p in EXAMPLES.glob("*.ipynb"))))
