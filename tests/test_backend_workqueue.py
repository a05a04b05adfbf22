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
from analysis import check_priority_order, gate_closed, require_engine, run, same, started_in_order
from test_backend_contract import listening_on

import casa_executors as ce
from casa_executors.errors import ExecutorOptionError
from casa_executors.procs import alive, in_sessions

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


def test_an_idle_manager_makes_no_empty_wait(no_leftover_processes):
    """After a wait that found nothing to do, Work Queue's next wait polls its workers for up to a second
    before it dispatches anything: a task submitted to an idle manager waited that second with its worker
    idle. So once its workers are in, the manager never calls ``WorkQueue.wait`` with no task in Work
    Queue; it counts the calls it makes so (``empty_waits``, reported after each wait, hence before the
    result of any later task)."""
    from casa_executors.backends.workqueue import WorkQueueBackend

    backend = WorkQueueBackend(workers=1)
    backend.hold()
    try:
        assert backend.submit(abs, -1).result(timeout=120) == 1  # the worker and its server up
        before = backend.empty_waits  # the waits that let the worker in
        for i in range(2, 4):
            time.sleep(1.2)  # the scenario, not a synchronisation: idle longer than a Work Queue wait(1)
            assert backend.submit(abs, -i).result(timeout=60) == i
            assert backend.submit(abs, -i).result(timeout=60) == i  # and the next one at once
        assert backend.empty_waits == before, (before, backend.empty_waits)
    finally:
        backend.release()


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


def test_a_priority_task_starts_before_the_queued_ones(tmp_path, no_leftover_processes):
    """``priority=1`` (retries, merges, speculative copies) goes before Work Queue's first-in-first-out
    order: with A holding the one worker and B-F waiting in Work Queue, P (submitted last) starts next."""
    from casa_executors.backends.workqueue import WorkQueueBackend

    log, gate = tmp_path / "started", tmp_path / "gate"
    gate.touch()
    backend = WorkQueueBackend(workers=1)
    assert backend.honours_priority
    backend.hold()
    try:
        with gate_closed(str(gate)):
            queued = [backend.submit(started_in_order, (str(log), str(gate), n)) for n in "ABCDEF"]
            first = backend.submit(started_in_order, (str(log), str(gate), "P"), priority=1)
            deadline = time.monotonic() + 60
            while backend.ready < 6 and time.monotonic() < deadline:  # all but A in Work Queue (its stats)
                time.sleep(0.05)
            assert backend.ready == 6
        assert [f.result(timeout=60) for f in [*queued, first]] == [*"ABCDEF", "P"]
    finally:
        backend.release()
    check_priority_order(log.read_text().split())


def test_no_private_internals_of_work_queue():
    """The manager is a process of its own driven through Work Queue's documented Python API: no ctypes,
    no mprotect, no calls into the extension's C symbols, and this process does not load Work Queue."""
    wq_dir = REPO / "casa_executors" / "backends" / "workqueue"
    assert not (wq_dir / "native.py").exists()
    for module in wq_dir.glob("*.py"):
        text = module.read_text()
        for banned in ("mprotect", "work_queue_wait_internal", "link_attach_to_fd", "/proc/self/maps",
                       "._task", "try_count"):  # the SWIG structure behind the documented Task
            assert banned not in text, (module.name, banned)
        if module.name != "worker.py":  # the task script's PR_SET_PDEATHSIG, on the worker side
            assert "ctypes" not in text, module.name


def _worker(host_port: tuple[str, int], workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["work_queue_worker", "--cores", "1", "--single-shot", "--connect-timeout", "30", *extra,
         "--workdir", str(workdir), "-d", "all", "-o", str(workdir / "debug.log"), *host_port[0:1],
         str(host_port[1])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_a_worker_without_the_password_is_refused(tmp_path, no_leftover_processes):
    """The manager listens on every interface (cctools has no address option), so by default it takes
    only workers that give the run's password: a real work_queue_worker without it is refused and runs
    nothing, while one given the password file runs the tasks."""
    from casa_executors.backends.workqueue import WorkQueueBackend

    backend = WorkQueueBackend(port=0)
    backend.hold()
    stranger = friend = None
    try:
        pw, manager = backend.password_file, backend.manager_pid
        assert manager != os.getpid() and alive(manager)  # Work Queue runs in a process of its own
        assert pw.stat().st_mode & 0o777 == 0o600 and len(pw.read_text()) >= 32
        assert listening_on(backend.port, backend.manager_pid) in ({"0.0.0.0"}, {"::"})  # every interface
        (tmp_path / "stranger").mkdir()
        (tmp_path / "friend").mkdir()
        stranger = _worker(("127.0.0.1", backend.port), tmp_path / "stranger")
        future = backend.submit(os.getsid, 0)  # the session of whoever runs it
        # the stranger connects, is challenged for a password it does not have, and (single-shot) exits
        assert stranger.wait(60) == 0
        log = (tmp_path / "stranger" / "debug.log").read_text(errors="replace")
        assert "rx from manager: auth password" in log and "disconnecting from manager" in log, log[-2000:]
        assert "rx from manager: task" not in log  # it was given nothing to run
        assert not future.done() and backend._connected == 0
        friend = _worker(("127.0.0.1", backend.port), tmp_path / "friend", "--password", str(pw))
        assert future.result(timeout=120) == friend.pid  # ran in the session of the worker with the password
    finally:
        for proc in (stranger, friend):
            if proc is not None:
                _stop(proc)
        backend.release()
    assert backend.password_file is None and not pw.exists()
    assert backend.manager_pid is None and not alive(manager)  # stopped by PID
    for proc in (stranger, friend):
        deadline = time.time() + 5  # a warm server follows its worker within a second
        while in_sessions({proc.pid}) and time.time() < deadline:
            time.sleep(0.1)
        assert not in_sessions({proc.pid})


def test_a_manager_process_that_dies_fails_the_tasks_it_had(no_leftover_processes):
    """Nobody waits forever on a future when the manager process is killed: the reader thread sees its
    end of the socket close and fails every pending task with WorkerLost, naming the manager."""
    from casa_executors.backends.workqueue import WorkQueueBackend

    backend = WorkQueueBackend(workers=1)
    backend.hold()
    try:
        assert backend.submit(abs, -1).result(timeout=120) == 1
        future = backend.submit(time.sleep, 60)
        os.kill(backend.manager_pid, signal.SIGKILL)
        with pytest.raises(ce.WorkerLost, match="the manager process ended"):
            future.result(timeout=30)
        with pytest.raises(ce.WorkerLost, match="the manager process ended"):
            backend.submit(abs, -2)
    finally:
        backend.release()


def test_password_options(tmp_path):
    from casa_executors.backends.workqueue import WorkQueueBackend

    with pytest.raises(ExecutorOptionError, match="password= or password_file=, not both"):
        ce.workqueue(password="a", password_file=tmp_path / "x")
    with pytest.raises(ExecutorOptionError, match="password_file must be a readable file"):
        ce.workqueue(password_file=tmp_path / "missing")
    mine = tmp_path / "mine"
    mine.write_text("my own secret")
    backend = WorkQueueBackend(workers=1, password_file=mine)
    backend.hold()
    try:
        assert backend.password_file == mine.resolve()
        assert backend.submit(abs, -3).result(timeout=120) == 3  # our local worker was handed the user's file
    finally:
        backend.release()
    assert mine.read_text() == "my own secret"  # the user's file stays


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
        assert port > 0 and listening_on(port, ex.backend.manager_pid) and ex.backend.worker_pids() == []
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
