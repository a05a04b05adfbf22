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

Messages in: ``("submit", key, directory, priority)``, ``("cancel", key)``, ``("expect", n)``, ``("stop",)``.
Out: ``("ready", port)`` or ``("error", why)`` first, then ``("done", key, why | None)``,
``("lost", key, why)`` and ``("stats", connected, workers lost, requeued, empty waits, ready)``, sent after
the wait that changed them (so before any result that a later wait brings). ``empty waits`` counts the
calls of ``WorkQueue.wait`` made with no task in Work Queue: once the expected workers are in, the
loop makes none (tests/test_backend_workqueue.py reads it). ``ready``: tasks in Work Queue waiting for a
worker (``task_state`` READY), so a driver can tell which tasks the next free worker chooses among.

Retries belong to the driver. Work Queue silently re-sends a task whose worker was lost
(``specify_max_retries`` does not change that in cctools 9.9), so a task seen back in the queue after
it was seen on a worker, while Work Queue counts a lost worker, is cancelled here and reported ``lost``:
the driver retries it and the report counts the attempt. A task lost and sent again between two looks
is caught when it comes back: its documented ``total_cmd_execution_time`` ("including time running on
workers that disconnected") exceeds its ``cmd_execution_time`` (the attempt that finished). A task a
worker merely declined (FORSAKEN: it found fewer resources than it had announced) goes back without a
lost worker; Work Queue re-sends those itself, nothing ran, and ``requeued`` counts them.

Only documented calls are used for this: ``task_state``, the stats' ``total_workers_lost`` and the two
execution times. (The documented ``Task.total_submissions`` reads a field cctools has removed: it
raises ``AttributeError`` in 9.9.)
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
# Work Queue dispatches the highest priority first: the driver's priority counts in steps of this, the key
# (first submitted, first dispatched) below it; exact in a double while keys stay below 2**52
PRIORITY_STEP = 2.0**52


def lost_an_attempt(task: Any) -> bool:
    """Did a finished ``task`` run before on a worker that disconnected? Its total execution time counts
    every attempt, its execution time only the one that finished (both documented, in microseconds)."""
    return int(task.total_cmd_execution_time) > int(task.cmd_execution_time)


@dataclass
class _Tracked:
    key: int
    task: Any  # the Work Queue Task
    directory: str
    on_worker: bool = False  # seen running or finished on a worker since it was last seen in the queue


class Manager:
    def __init__(self, wq: Any, q: Any, chan: Channel, config: dict[str, Any]) -> None:
        self.wq, self.q, self.chan, self.config = wq, q, chan, config
        self.tasks: dict[int, _Tracked] = {}  # by Work Queue task id
        self.ids: dict[int, int] = {}  # driver key -> Work Queue task id
        self.expected = int(config.get("expect", 1))
        self.connected = self.lost_workers = self.requeued = self.ready = 0
        self.empty_waits = 0  # WorkQueue.wait calls with no task in Work Queue
        self.stopping = False
        self._stats: tuple[int, int, int, int, int] | None = None

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

    def _on_submit(self, key: int, directory: str, priority: int = 0) -> None:
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
        # the later ones while workers were free (docs/workqueue.md); the driver's priority (1: retries,
        # merges, speculative copies) before that
        t.specify_priority(priority * PRIORITY_STEP - float(key))
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
            self.empty_waits += not self.tasks
            done = self.q.wait(1)
            stats = self.q.stats
            lost = getattr(stats, "total_workers_lost", getattr(stats, "workers_lost", 0))
            worker_lost, self.lost_workers = lost > self.lost_workers, lost
            after_result = done is not None
            if done is not None:
                self._finish(done)
            self._watch(worker_lost)
            self.connected = stats.workers_connected
            now = (self.connected, self.lost_workers, self.requeued, self.empty_waits, self.ready)
            if now != self._stats:
                self._stats = now
                self.chan.send("stats", *now)

    def _finish(self, t: Any) -> None:
        tracked = self.tasks.pop(t.id, None)
        if tracked is None:
            return
        self.ids.pop(tracked.key, None)
        if lost_an_attempt(t):
            # lost and sent again between two looks: the driver retries, so that the report counts it
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

    def _back(self, tracked: _Tracked, state: int) -> bool:
        """Is the task back in the queue after it was seen on a worker? (Our own bookkeeping of the
        states Work Queue reports, look after look.)"""
        if state in (self.wq.WORK_QUEUE_TASK_RUNNING, self.wq.WORK_QUEUE_TASK_WAITING_RETRIEVAL):
            tracked.on_worker = True
            return False
        if state != self.wq.WORK_QUEUE_TASK_READY or not tracked.on_worker:
            return False
        tracked.on_worker = False
        return True

    def _lost_why(self, t: Any) -> str:
        return f"workqueue: lost the worker running task {t.id} ({t.hostname or 'unknown host'})"

    def _watch(self, worker_lost: bool) -> None:
        """Cancel the tasks Work Queue re-queued after losing their worker, and tell the driver."""
        ready = 0
        for task_id, tracked in list(self.tasks.items()):
            state = self.q.task_state(task_id)
            ready += state == self.wq.WORK_QUEUE_TASK_READY
            if not self._back(tracked, state):
                continue
            if not worker_lost:
                self.requeued += 1  # a worker declined it (FORSAKEN): nothing ran, Work Queue sends it again
            else:
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
