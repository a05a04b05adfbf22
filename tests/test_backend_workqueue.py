"""What only the workqueue backend does: its options, which Python module it loads (Debian's
work_queue or ndcctools), the warm per-worker server, cold tasks, a task whose interpreter cannot
start, and port= with an external worker that must give the password.

What every backend does (two local workers) is in test_backend_contract.py. Every worker (and the
task processes under it) is stopped by PID and must be gone afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest
from analysis import require_engine, run, same
from test_backend_contract import listening_on

import casa_executors as ce
from casa_executors.errors import ExecutorOptionError
from casa_executors.procs import in_sessions

REPO = Path(__file__).resolve().parents[1]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("workqueue")


# -- options and imports ---------------------------------------------------------------------


def test_options_are_checked():
    with pytest.raises(ExecutorOptionError, match="port must be a TCP port"):
        ce.workqueue(port=70000)
    with pytest.raises(ExecutorOptionError, match="python must be a non-empty string"):
        ce.workqueue(python="")
    with pytest.raises(ExecutorOptionError, match="host must be an IPv4 address"):
        ce.workqueue(host="localhost")
    with pytest.raises(ExecutorOptionError, match="workers must be a whole number"):
        ce.workqueue(workers=0)
    with pytest.raises(ExecutorOptionError, match="did you mean 'password'"):
        ce.workqueue(pasword="x")
    with pytest.raises(ExecutorOptionError, match="warm must be True or False"):
        ce.workqueue(warm="yes")
    b = ce.workqueue(workers=2).backend
    assert b.workers == 2 and b.batch_size(40) == 40 // (2 * b.tasks_per_worker) and b.batch_size(3) == 1
    assert b.batch_size(8, "preprocessing") == 4  # a file's metadata is less than a task's cost: one per worker
    assert ce.workqueue(port=9123).backend.workers == 1  # none connected yet


def test_unavailable_names_what_is_missing(monkeypatch):
    from casa_executors.backends.workqueue import backend as workqueue

    assert workqueue.WorkQueueBackend.unavailable() is None
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "work_queue_worker" in workqueue.WorkQueueBackend.unavailable()
    monkeypatch.setattr(workqueue, "import_work_queue", lambda: (_ for _ in ()).throw(ImportError("gone")))
    assert "Python module (gone)" in workqueue.WorkQueueBackend.unavailable()


def test_debian_module_is_loaded_alone():
    """From a fresh interpreter without ndcctools: work_queue comes from dist-packages, alone."""
    code = textwrap.dedent("""
        import sys
        sys.modules["ndcctools"] = None  # as if not installed (it is not, here)
        from casa_executors.backends.workqueue import DIST_PACKAGES, import_work_queue
        wq = import_work_queue()
        assert wq.__file__ == DIST_PACKAGES + "/work_queue.py", wq.__file__
        assert DIST_PACKAGES not in sys.path
        import numpy
        assert "dist-packages" not in numpy.__file__
        print("ok", wq.__name__)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok work_queue", out.stderr


def test_ndcctools_work_queue_is_preferred(tmp_path, monkeypatch, sample_files, reference):
    """ndcctools is not installable here (conda only): a stand-in package wrapping Debian's module
    checks that ndcctools.work_queue is the one used, end to end."""
    pkg = tmp_path / "ndcctools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "work_queue.py").write_text(textwrap.dedent("""
        import sys
        from casa_executors.backends.workqueue.discovery import DIST_PACKAGES, _load_alone
        _wq = sys.modules.get("work_queue") or _load_alone(DIST_PACKAGES)
        globals().update({k: v for k, v in vars(_wq).items() if not k.startswith("__")})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("ndcctools")]:
        monkeypatch.delitem(sys.modules, name)
    from casa_executors.backends.workqueue import import_work_queue

    assert import_work_queue().__name__ == "ndcctools.work_queue"
    ex = ce.workqueue(workers=1, status=False)
    assert same(run(ex, sample_files[:1]), run(ce.iterative(status=False), sample_files[:1]))
    assert ex.report.summary()["attempts"] == 4


def touch(path: str) -> list:
    open(path, "w").close()
    return []


def test_warm_server_serves_only_its_own_user(tmp_path):
    """The server unpickles what a client names: a process of another user cannot even reach it
    (its FIFOs are mode 600, in a directory of mode 700 the clients check is theirs)."""
    if os.getuid() != 0:  # CI runs as root
        pytest.skip("needs root, to be another user")
    from casa_executors.backends.workqueue import worker as wq_task

    tmp_path.chmod(0o777)
    (tmp_path / "in.pkl").write_bytes(cloudpickle.dumps((touch, str(tmp_path / "ran"))))
    directory = tmp_path / "casa-servers"
    assert wq_task._own_dir(str(directory))
    server = subprocess.Popen([sys.executable, wq_task.__file__, "--serve", str(directory), "0", str(os.getpid())],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not wq_task._alive(str(directory / "0.alive")):
            assert server.poll() is None and time.time() < deadline
            time.sleep(0.1)
        directory.chmod(0o755)  # even so, the FIFOs themselves keep others out
        attempt = textwrap.dedent(f"""
            import os
            try:
                os.open("{directory}/0.req", os.O_WRONLY | os.O_NONBLOCK)
                print("opened")
            except PermissionError:
                print("denied")
        """)
        as_nobody = subprocess.run(["/usr/bin/python3", "-c", attempt], capture_output=True, text=True,
                                   timeout=90, user=65534, group=65534, env={})
        assert as_nobody.stdout.strip() == "denied", as_nobody.stderr
        assert not (tmp_path / "ran").exists()
        old = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert wq_task.ask(str(directory), 0, "in.pkl", "out.pkl") == "ok"
        finally:
            os.chdir(old)
        assert (tmp_path / "ran").exists()
    finally:
        server.kill()
        server.wait(10)


def test_tasks_reach_the_warm_server_without_starting_python(tmp_path, sample_files, reference,
                                                             no_leftover_processes):
    """Starting even a stdlib-only interpreter costs 30-130 ms a task on a busy node: once a worker's
    server is up, its tasks reach it through the shell client and no Python starts (the first task of
    each worker starts one, which starts the server)."""
    starts = tmp_path / "starts"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {starts}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    ex = ce.workqueue(workers=2, python=str(python), status=False)
    with ex:
        assert same(run(ex, sample_files), reference)
        assert same(run(ex, sample_files), reference)
        tasks = ex.backend.sent
    clients = [line for line in starts.read_text().splitlines() if "casa_wq_worker.py in.pkl" in line]
    assert tasks >= 10 and 1 <= len(clients) <= 2, (tasks, clients)


def test_a_task_submitted_to_an_idle_manager_starts_at_once(no_leftover_processes):
    """After a wait that found nothing to do, Work Queue's next wait polls its workers for up to a second
    before it dispatches anything: a task submitted to an idle manager waited that second with its worker
    idle (once per phase, and whenever the driver sent the next task while the manager waited)."""
    from casa_executors.backends.workqueue import WorkQueueBackend

    backend = WorkQueueBackend(workers=1)
    backend.hold()
    try:
        assert backend.submit(abs, -1).result(timeout=120) == 1  # the worker and its server up
        latencies = []
        for i in range(4):
            time.sleep(1.2)  # the manager's waits find nothing to do
            t0 = time.perf_counter()
            assert backend.submit(abs, -i).result(timeout=60) == i
            latencies.append(time.perf_counter() - t0)
    finally:
        backend.release()
    assert sorted(latencies)[1] < 0.5, latencies  # was about a second each


def _started_after(seconds: float) -> float:
    start = time.time()
    time.sleep(seconds)
    return start


def test_tasks_start_in_the_order_submitted(no_leftover_processes):
    """Among equal priorities Work Queue dispatches the newest task first: the second task of a burst
    used to run last, and the run's end (its merge) waited for it with the workers free."""
    from casa_executors.backends.workqueue import WorkQueueBackend

    backend = WorkQueueBackend(workers=2)
    backend.hold()
    try:
        for f in [backend.submit(abs, -1), backend.submit(abs, -2)]:
            f.result(timeout=120)  # both workers and their servers up
        futures = [backend.submit(_started_after, 0.3) for _ in range(8)]
        starts = [f.result(timeout=120) for f in futures]
    finally:
        backend.release()
    # two at a time, in order: each task starts no later than any task submitted after it (+ jitter)
    late = [(i, j) for i in range(8) for j in range(i + 1, 8) if starts[i] > starts[j] + 0.15]
    assert not late, [round(s - starts[0], 2) for s in starts]


def test_a_submission_ends_the_wait_at_once():
    """Work Queue's wait lasts until a task finishes or the next whole second: a task submitted
    meanwhile waited up to a second with a worker idle. With the wake-up pipe the wait ends at once."""
    from casa_executors.backends.workqueue import import_work_queue
    from casa_executors.backends.workqueue.native import LOOPBACK, Waiter, bound_to

    wq = import_work_queue()
    with bound_to(wq, LOOPBACK):
        q = wq.WorkQueue(port=0)
    r, w = os.pipe()
    wait = Waiter(wq, q, r)
    try:
        assert wait.wakes
        wait(1)  # Work Queue's first wait does not poll: from the second on, it sleeps up to a second
        t0 = time.perf_counter()
        assert wait(1) is None
        assert time.perf_counter() - t0 > 0.5  # nothing to do: it waited
        os.write(w, b"\0")
        t0 = time.perf_counter()
        assert wait(1) is None
        assert time.perf_counter() - t0 < 0.3
    finally:
        wait.close()
        os.close(w)
        q._free_queue()


# -- local workers started for one call -------------------------------------------------------


def test_cold_tasks_match_iterative(sample_files, reference, no_leftover_processes):
    """warm=False: every task a fresh interpreter (no per-worker server)."""
    ex = ce.workqueue(workers=2, warm=False, status=False)
    assert same(run(ex, sample_files), reference)
    assert ex.report.summary()["attempts"] == 12


def test_broken_task_is_worker_lost(sample_files):
    """A task whose interpreter cannot start reaches the driver as WorkerLost, with the reason."""
    ex = ce.workqueue(workers=1, python="/nonexistent/python", status=False, retries=0)
    with pytest.raises(ce.WorkerLost, match="/nonexistent/python") as err:
        run(ex, sample_files[:1])
    assert type(err.value) is ce.WorkerLost  # the engine's own error, with the chunk's attributes and note
    assert err.value.attempts == 1 and err.value.phase == "preprocessing" and err.value.report is ex.report
    assert "WorkerLost: workqueue" in "\n".join(err.value.__notes__)
    assert ex.report.failed_files() and ex.backend._staging is None


# -- port=: the manager only, a worker started here --------------------------------------------


def test_port_with_external_worker(sample_files, reference, tmp_path, no_leftover_processes):
    ex = ce.workqueue(port=0, password="s3cret", status=False)
    (tmp_path / "pw").write_text("s3cret")
    with ex:
        port = ex.backend.port
        assert port > 0 and listening_on(port) == {"127.0.0.1"} and ex.backend.worker_pids() == []
        worker = subprocess.Popen(
            ["work_queue_worker", "--cores", "1", "--single-shot", "--connect-timeout", "30",
             "--password", str(tmp_path / "pw"), "--workdir", str(tmp_path), "127.0.0.1", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert ex.backend.wait_for_workers(1, timeout=30) == 1
            assert same(run(ex, sample_files), reference)
            assert ex.report.processing.workers == 1
            assert {r.worker for r in ex.report.rows()} == {f"{os.uname().nodename}:{worker.pid}"}
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
            deadline = time.time() + 5  # its warm server follows it within a second
            while in_sessions({worker.pid}) and time.time() < deadline:
                time.sleep(0.1)
            assert not in_sessions({worker.pid})
