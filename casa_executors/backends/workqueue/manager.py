"""The Work Queue manager, in a process of its own (as Parsl runs it): ``python manager.py FD``.

The driver (``backend.py``) starts this script with ``subprocess`` (fork and exec at once: no copy of
the driver's threads, XRootD's client threads among them, runs here) and talks to it through the socket
``FD`` (``channel.py``). Every Work Queue call happens in this process's one thread, through the
documented bindings only: ``WorkQueue.wait(timeout)`` holds this process's GIL while it waits, which
stops nothing in the driver.

Listening address: the manager listens on every interface. cctools 9.9 has no way to choose the address:
``WorkQueue(port, name, shutdown, stats_log, transactions_log, debug_log)`` takes none, and the C
library creates the socket with ``q->manager_link = link_serve(port)`` (work_queue.c,
``work_queue_ssl_create``), where ``link_serve(port)`` is ``link_serve_address(0, port)`` (dttools
link.c), i.e. the wildcard address; the only environment variables read there are
``WORK_QUEUE_PORT``, ``WORK_QUEUE_LOW_PORT``/``HIGH_PORT`` (ports) and ``CCTOOLS_IP_MODE`` (address
family). So a worker must give the run's password (``specify_password_file``) to be let in.

What waiting costs: ``wait(1)`` returns when a task finishes or the next whole second comes; a task the
driver submits meanwhile reaches Work Queue after it. So after a result, with nothing queued in Work
Queue for the worker that just freed up, the loop gives the driver ``AFTER_RESULT_S`` to send its next
task before it waits again; and it never waits with no task in Work Queue once the expected workers
are connected, since a wait that found nothing to do makes Work Queue's next one poll its workers for up
to a second before it dispatches anything.

Messages in: ``("submit", key, directory)``, ``("cancel", key)``, ``("expect", n)``, ``("stop",)``.
Out: ``("ready", port)`` or ``("error", why)`` first, then ``("done", key, why | None)``,
``("lost", key, why)`` and ``("stats", connected, workers lost, requeued)``.

Retries belong to the driver. Work Queue silently re-sends a task whose worker was lost
(``specify_max_retries`` does not change that in cctools 9.9), so a task that goes back to the queue
(or is dispatched again) while Work Queue counts a lost worker is cancelled here and reported
``lost``: the driver retries it and the report counts the attempt. A task a worker merely declined
(FORSAKEN: it found fewer resources than it had announced) goes back without a lost worker; Work
Queue re-sends those itself, nothing ran, and ``requeued`` counts them.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

if __package__:
    from .channel import Channel
    from .discovery import import_work_queue
else:  # run by path: its siblings, not the casa_executors package
    from channel import Channel  # type: ignore[no-redef]
    from discovery import import_work_queue  # type: ignore[no-redef]

AFTER_RESULT_S = 0.05  # after a result, how long the driver may take to send the next task
BURST_S = 0.002  # after one submission, how long to wait for the rest of a burst before waiting in Work Queue
IDLE_S = 5.0  # with nothing to do, how often to look at the channel


def dispatches(task: Any) -> int:
    """How many times Work Queue has dispatched ``task``: the ``try_count`` field of ``struct
    work_queue_task``, documented in work_queue.h. The bindings' documented ``Task.total_submissions``
    reads a field that cctools has since removed (an ``AttributeError`` in 9.9), so the same count is
    then read from the task's C structure, as SWIG exposes it."""
    try:
        return int(task.total_submissions)
    except AttributeError:
        return int(task._task.try_count)


@dataclass
class _Tracked:
    key: int
    task: Any  # the Work Queue Task
    directory: str
    back: int = 0  # the last dispatch after which it was seen back in the queue


class Manager:
    def __init__(self, wq: Any, q: Any, chan: Channel, config: dict[str, Any]) -> None:
        self.wq, self.q, self.chan, self.config = wq, q, chan, config
        self.tasks: dict[int, _Tracked] = {}  # by Work Queue task id
        self.ids: dict[int, int] = {}  # driver key -> Work Queue task id
        self.expected = int(config.get("expect", 1))
        self.connected = self.lost_workers = self.requeued = self.ready = 0
        self.stopping = False
        self._stats: tuple[int, int, int] | None = None

    # -- messages from the driver ---------------------------------------------------------------
    def take(self, timeout: float) -> None:
        """Handle what the driver sent: wait up to ``timeout`` for the first message, then ``BURST_S``."""
        while not self.stopping and self.chan.poll(timeout):
            try:
                message = self.chan.recv()
            except (EOFError, OSError):  # the driver is gone
                self.stopping = True
                return
            getattr(self, "_on_" + message[0])(*message[1:])
            timeout = BURST_S

    def _on_submit(self, key: int, directory: str) -> None:
        c = self.config
        t = self.wq.Task(c["command"])
        t.specify_input_file(c["worker_script"], c["worker_script_name"], cache=True)
        if c["warm"]:
            t.specify_input_file(c["client"], c["client_name"], cache=True)
            t.specify_environment_variable("CASA_WQ_KEY", c["key"])
        t.specify_input_file(os.path.join(directory, "in.pkl"), "in.pkl", cache=False)
        t.specify_output_file(os.path.join(directory, "out.pkl"), "out.pkl", cache=False)
        t.specify_cores(1)
        # first submitted, first dispatched: among equal priorities Work Queue dispatches the newest task
        # first, and a task submitted early (a batch whose merge the run's end waits for) starved behind
        # the later ones while workers were free (docs/workqueue.md)
        t.specify_priority(-float(key))
        t.specify_environment_variable("PYTHONPATH", c["pythonpath"])
        t.specify_environment_variable("CASA_WQ_WARM", "1" if c["warm"] else "0")
        t.specify_tag(str(key))
        task_id = self.q.submit(t)
        self.tasks[task_id] = _Tracked(key, t, directory)
        self.ids[key] = task_id

    def _on_cancel(self, key: int) -> None:
        task_id = self.ids.pop(key, None)
        if task_id is not None:
            self.q.cancel_by_taskid(task_id)
            del self.tasks[task_id]

    def _on_expect(self, n: int) -> None:
        self.expected = max(self.expected, int(n))

    def _on_stop(self) -> None:
        self.stopping = True

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        after_result = False
        while not self.stopping:
            if self.tasks:
                self.take(AFTER_RESULT_S if after_result and not self.ready else 0.0)
            else:
                # no task: with the expected workers in, wait for the driver (not in Work Queue: see above)
                self.take(0.0 if self.connected < self.expected else IDLE_S)
            if self.stopping:
                break
            if not self.tasks and self.connected >= self.expected:
                continue
            done = self.q.wait(1)
            stats = self.q.stats
            lost = getattr(stats, "total_workers_lost", getattr(stats, "workers_lost", 0))
            worker_lost, self.lost_workers = lost > self.lost_workers, lost
            after_result = done is not None
            if done is not None:
                self._finish(done, worker_lost)
            self._watch(worker_lost)
            self.connected = stats.workers_connected
            now = (self.connected, self.lost_workers, self.requeued)
            if now != self._stats:
                self._stats = now
                self.chan.send("stats", *now)

    def _finish(self, t: Any, worker_lost: bool) -> None:
        tracked = self.tasks.pop(t.id, None)
        if tracked is None:
            return
        self.ids.pop(tracked.key, None)
        if self._resent(tracked, self.wq.WORK_QUEUE_TASK_DONE, worker_lost):
            # lost, sent again and done within one wait: the driver retries, so that the report counts it
            self.chan.send("lost", tracked.key, self._lost_why(t))
        elif (t.result == self.wq.WORK_QUEUE_RESULT_SUCCESS and t.return_status == 0
              and os.path.exists(os.path.join(tracked.directory, "out.pkl"))):
            self.chan.send("done", tracked.key, None)
        else:
            lines = (t.output or "").strip().splitlines()
            tail = f": {lines[-1][:200]}" if lines else ""
            result = getattr(t, "result_str", None) or t.result
            self.chan.send("done", tracked.key, f"workqueue: task {t.id} on {t.hostname or '?'} failed "
                                                f"({result}, exit {t.return_status}){tail}")

    def _resent(self, tracked: _Tracked, state: int, worker_lost: bool) -> bool:
        """Did the task go back to the queue since the last look, because a worker was lost?

        A task in the queue after its n-th dispatch, or dispatched n + 1 times, went back after dispatch n.
        """
        tries = dispatches(tracked.task)
        back = tries if state == self.wq.WORK_QUEUE_TASK_READY else tries - 1
        if back <= tracked.back:
            return False
        tracked.back = back
        if not worker_lost:
            self.requeued += 1  # a worker declined it (FORSAKEN): nothing ran, Work Queue sends it again
        return worker_lost

    def _lost_why(self, t: Any) -> str:
        return f"workqueue: lost the worker running task {t.id} ({t.hostname or 'unknown host'})"

    def _watch(self, worker_lost: bool) -> None:
        """Cancel the tasks Work Queue re-queued after losing their worker, and tell the driver."""
        ready = 0
        for task_id, tracked in list(self.tasks.items()):
            state = self.q.task_state(task_id)
            ready += state == self.wq.WORK_QUEUE_TASK_READY
            if self._resent(tracked, state, worker_lost):
                self.q.cancel_by_taskid(task_id)
                del self.tasks[task_id]
                self.ids.pop(tracked.key, None)
                self.chan.send("lost", tracked.key, self._lost_why(tracked.task))
        self.ready = ready


def main(argv: list[str]) -> int:
    chan = Channel(socket.socket(fileno=int(argv[0])))
    kind, config = chan.recv()
    assert kind == "config", kind
    # started with -S: the driver's path, after the standard library (whose distutils Work Queue imports)
    sys.path.extend(p for p in config.get("sys_path", ()) if p not in sys.path)
    try:
        wq = import_work_queue()
        q = wq.WorkQueue(port=config["port"], name=config["name"])
    except Exception as exc:  # the bindings raise a bare Exception when the port is taken
        chan.send("error", f"workqueue: cannot listen on port {config['port']}: {exc}")
        return 1
    q.specify_password_file(config["password_file"])
    if config.get("catalog"):  # submit= with adapt=: the factory reads our queue there (slurm.py)
        host, _, port = config["catalog"].rpartition(":")
        q.specify_catalog_server(host, int(port))
    chan.send("ready", q.port)
    started = time.monotonic()
    try:
        Manager(wq, q, chan, config).run()
    except (BrokenPipeError, ConnectionResetError):  # the driver is gone
        pass
    print(f"casa workqueue manager: stopped after {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
