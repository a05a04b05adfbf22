"""The dask backend on real processes: our LocalCluster, and a TLS scheduler + 2 workers started here.

Every process started here is stopped by PID, also on failure; worker loss is
a SIGKILL to a worker process in the middle of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pytest
from analysis import Failing, assert_adl_identical, attempts, require_engine, run, same

import casa_executors as ce
from casa_executors.errors import BackendUnavailable, ExecutorOptionError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("dask")


def alive(p: psutil.Process) -> bool:
    """Running, not a zombie, and still the same process (psutil checks for a reused PID)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_procs(procs: Iterable[psutil.Process], timeout: float = 15) -> list[int]:
    """SIGTERM, wait, then SIGKILL each process; return the PIDs still alive after that."""
    procs = list(procs)
    for p in procs:
        if alive(p):
            with contextlib.suppress(psutil.Error):
                p.terminate()
    deadline = time.time() + timeout
    while any(alive(p) for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    for p in procs:
        if alive(p):
            with contextlib.suppress(psutil.Error):
                p.kill()
    time.sleep(0.3)
    return [p.pid for p in procs if alive(p)]


def worker_procs(backend) -> set[psutil.Process]:
    out = set()
    for pid in backend.worker_pids().values():
        with contextlib.suppress(psutil.Error):
            out.add(psutil.Process(pid))
    return out


@pytest.fixture
def no_new_processes():
    """Every child process a test starts is gone after it (multiprocessing's resource tracker,
    which lives as long as this interpreter, aside)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.time() + 10
    while True:
        left = [p.pid for p in me.children(recursive=True) if p.pid not in before and alive(p)
                and "resource_tracker" not in " ".join(_cmdline(p))]
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left behind: {[(pid, _cmdline(psutil.Process(pid))) for pid in left]}"


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


class Killer(threading.Thread):
    """Kills ``pick()`` by PID once the run's processing has ``min_ok`` chunks done and more to go."""

    def __init__(self, ex, pick: Callable[[], int | None], min_ok: int = 2, timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.ex, self.pick, self.min_ok, self.timeout = ex, pick, min_ok, timeout
        self.killed: psutil.Process | None = None
        self.at: float = 0.0

    def run(self) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            p = self.ex.report.processing
            if p is not None:
                ok = sum(r.status == "ok" for r in p.rows)
                if ok >= len(p.rows):
                    return  # too late
                if ok >= self.min_ok:
                    pid = self.pick()
                    if pid:
                        victim = psutil.Process(pid)
                        victim.kill()
                        self.killed, self.at = victim, time.time()
                        return
            time.sleep(0.05)


def busy_worker_pid(backend) -> int | None:
    """The PID of a worker that is running a task right now."""
    pids = backend.worker_pids()
    for addr, keys in backend._client.processing().items():
        if keys and addr in pids:
            return pids[addr]
    return None


def check_worker_loss(ex, files, reference, tmp_path, seen: set[psutil.Process]):
    log = str(tmp_path / "attempts.log")
    open(log, "w").close()
    killer = Killer(ex, lambda: busy_worker_pid(ex.backend))
    seen.update(worker_procs(ex.backend))
    killer.start()
    t0 = time.time()
    out = run(ex, files, Failing(log, bad_starts=set(), sleep=0.3), chunksize=100)
    killer.join()
    assert killer.killed, "the run ended before a worker could be killed"
    assert not alive(killer.killed)
    seen.update(worker_procs(ex.backend))
    assert same(out, reference)  # nothing lost, nothing counted twice
    rows = ex.report.rows()
    assert all(r.status == "ok" for r in rows)
    s = ex.report.summary()
    assert s["processed"] == s["chunks"] == len(rows) == 30
    assert s["attempts"] > s["chunks"]
    assert sum(r.events for r in rows) == 3000
    retried = [r for r in rows if r.attempts > 1]
    assert retried and all(r.status == "ok" for r in retried)
    assert len(attempts(log)) == 30  # every chunk started (a task killed while queued never did)
    return {"wall_s": time.time() - t0, "after_kill_s": time.time() - killer.at, "attempts": s["attempts"],
            "retried": [(r.index, r.attempts) for r in retried]}


# -- options -------------------------------------------------------------------------


def test_options_are_checked(tmp_path):
    from casa_executors.backends.dask import DaskBackend, make_secrets_dir

    with pytest.raises(ExecutorOptionError, match="client= or address="):
        ce.dask(client=object(), address="tcp://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match="workers="):
        ce.dask(address="tcp://127.0.0.1:1", workers=2)
    with pytest.raises(ExecutorOptionError, match="secrets_dir"):
        ce.dask(address="tls://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match=r"must be a distributed\.Client"):
        ce.dask(client="tcp://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match="workers must be a whole number"):
        ce.dask(workers=0)
    with pytest.raises(ExecutorOptionError, match="did you mean 'secrets_dir'"):
        ce.dask(secret_dir=str(tmp_path))
    secrets = make_secrets_dir(tmp_path / "s")
    assert sorted(p.name for p in secrets.iterdir()) == ["ca.pem", "hostcert.pem", "usercert.pem"]
    assert (secrets / "usercert.pem").stat().st_mode & 0o077 == 0
    with pytest.raises(ExecutorOptionError, match="tls:// address"):
        ce.dask(address="tcp://127.0.0.1:1", secrets_dir=str(secrets))
    with pytest.raises(ExecutorOptionError, match="not both"):
        ce.dask(address="tls://127.0.0.1:1", secrets_dir=str(secrets), security=object())
    (secrets / "hostcert.pem").unlink()
    with pytest.raises(ExecutorOptionError, match=r"has no hostcert\.pem"):
        ce.dask(address="tls://127.0.0.1:1", secrets_dir=str(secrets))
    with pytest.raises(ExecutorOptionError, match="is not a directory"):
        ce.dask(address="tls://127.0.0.1:1", secrets_dir=str(tmp_path / "nowhere"))
    # a bare host:port with certificates means TLS
    assert DaskBackend(address="127.0.0.1:1", secrets_dir=str(make_secrets_dir(tmp_path / "t")))._address == (
        "tls://127.0.0.1:1"
    )


def test_unavailable_names_the_missing_package(monkeypatch):
    from casa_executors.backends.dask import DaskBackend

    assert DaskBackend.unavailable() is None
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert "distributed" in DaskBackend.unavailable()


# -- our own LocalCluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def local():
    """One LocalCluster of 2 worker processes for the module, owned by the backend."""
    ex = ce.dask(workers=2, status=False)
    ex.backend.hold()
    procs = worker_procs(ex.backend)
    try:
        yield ex.backend, procs
    finally:
        ex.backend.release()
        left = stop_procs(procs, timeout=10)
        assert not left, f"LocalCluster worker processes left: {left}"


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_local_cluster_owned_and_stopped(tls, sample_files, reference, tmp_path, no_new_processes):
    from casa_executors.backends.dask import make_secrets_dir

    secrets = {"secrets_dir": str(make_secrets_dir(tmp_path / "s"))} if tls else {}
    ex = ce.dask(workers=2, status=False, **secrets)
    out = run(ex, sample_files)
    assert same(out, reference)
    assert ex.report.summary()["processed"] == 12
    assert ex.report.processing.workers == 2 and ex.backend._cluster is None  # stopped after the call
    assert {r.worker.split("://")[0] for r in ex.report.rows()} == {"tls" if tls else "tcp"}


def test_adl_queries_bit_identical(local, sample_files):
    assert_adl_identical(local[0], sample_files)


def test_lost_task_raises(local):
    """The scheduler does not re-run a task whose worker died: its future raises KilledWorker."""
    from distributed import KilledWorker

    backend, procs = local
    future = backend.submit(os._exit, 3)  # takes its worker down
    with pytest.raises(KilledWorker):
        future.result(timeout=60)
    backend._client.wait_for_workers(2, timeout=60)
    procs.update(worker_procs(backend))


def test_local_worker_loss(local, sample_files, reference, tmp_path):
    backend, procs = local
    ex = ce.Driver(backend=backend, status=False)
    info = check_worker_loss(ex, sample_files, reference, tmp_path, procs)
    print("LocalCluster worker loss:", info)
    assert len(backend.worker_pids()) == 2  # the nanny started a new worker


# -- a TLS scheduler and two workers as separate processes ---------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    from casa_executors.backends.dask import make_secrets_dir

    tmp = tmp_path_factory.mktemp("dask-tls")
    secrets = make_secrets_dir(tmp / "secrets")
    env = dict(os.environ, PYTHONPATH=str(REPO), DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    tls = ["--tls-ca-file", str(secrets / "ca.pem")]
    started: list[subprocess.Popen] = []
    seen: set[psutil.Process] = set()

    def start(args: list[str], name: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=tmp)
        log.close()
        started.append(p)
        return p

    try:
        sched_file = tmp / "scheduler.json"
        start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol", "tls",
               *tls, "--tls-cert", str(secrets / "hostcert.pem"), "--tls-key", str(secrets / "hostcert.pem"),
               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)], "scheduler")
        deadline = time.time() + 60
        address = None
        while address is None and time.time() < deadline:
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                assert started[0].poll() is None, (tmp / "scheduler.log").read_text()
                time.sleep(0.1)
        assert address and address.startswith("tls://127.0.0.1:")
        for i in range(2):
            start(["distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                   "--dashboard-address", "127.0.0.1:0", *tls, "--tls-cert", str(secrets / "usercert.pem"),
                   "--tls-key", str(secrets / "usercert.pem"), "--name", f"w{i}", "--memory-limit", "0",
                   "--local-directory", str(tmp / f"w{i}")], f"worker{i}")
        ex = ce.dask(address=address, secrets_dir=str(secrets), status=False)
        ex.backend.hold()
        try:
            ex.backend._client.wait_for_workers(2, timeout=60)
            seen.update(worker_procs(ex.backend))
            yield {"address": address, "secrets": secrets, "backend": ex.backend, "tmp": tmp, "seen": seen}
        finally:
            seen.update(worker_procs(ex.backend))
            ex.backend.release()
    finally:
        # nannies first (they stop their workers), then the scheduler; then any worker left, all by PID
        left = stop_procs(psutil.Process(p.pid) for p in started[1:] if p.poll() is None)
        left += stop_procs(psutil.Process(p.pid) for p in started[:1] if p.poll() is None)
        left += stop_procs(seen)
        for p in started:
            p.wait(5)
        assert not left, f"processes left behind: {left}"


def test_tls_cluster_matches_iterative(tls_cluster, sample_files, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no allowed-failures warning: the scheduler has 0
        ex = ce.dask(address=tls_cluster["address"], secrets_dir=str(tls_cluster["secrets"]), status=False)
        out = run(ex, sample_files)
    assert same(out, reference)
    assert ex.report.processing.workers == 2
    assert ex.report.summary()["attempts"] == 12
    assert {r.worker.split("://")[0] for r in ex.report.rows()} == {"tls"}


def test_existing_client_is_used_not_closed(tls_cluster, sample_files, reference):
    from distributed import Client

    from casa_executors.backends.dask.security import client_security

    client = Client(tls_cluster["address"], security=client_security(tls_cluster["secrets"]),
                    set_as_default=False)
    try:
        ex = ce.dask(client=client, status=False)
        assert ex.backend.workers == 2 and ex.backend.max_inflight() == 4
        assert same(run(ex, sample_files), reference)
        assert client.status == "running"
    finally:
        client.close()


def test_scheduler_that_retries_is_reported(sample_files, reference):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        ex = ce.dask(client=client, status=False)
        with pytest.warns(UserWarning, match="allowed-failures"):
            out = run(ex, sample_files)
    assert same(out, reference)


def test_tls_refuses_plain_tcp_and_other_ca(tls_cluster, tmp_path):
    import dask
    from distributed import Client

    from casa_executors.backends.dask import make_secrets_dir

    plain = tls_cluster["address"].replace("tls://", "tcp://")
    other = make_secrets_dir(tmp_path / "other-ca")
    with dask.config.set({"distributed.comm.timeouts.connect": "5s"}):
        with pytest.raises(OSError):
            Client(plain, set_as_default=False, timeout=5)
        with pytest.raises(BackendUnavailable, match="cannot connect"):
            ce.dask(address=plain, status=False).backend.start()
        with pytest.raises(BackendUnavailable, match=r"cannot connect.*TLS certificate"):
            ce.dask(address=tls_cluster["address"], secrets_dir=str(other), status=False).backend.start()
    assert tls_cluster["backend"].workers == 2  # nothing else joined


def test_tls_worker_loss(tls_cluster, sample_files, reference, tmp_path):
    backend = tls_cluster["backend"]
    ex = ce.Driver(backend=backend, status=False)
    info = check_worker_loss(ex, sample_files, reference, tmp_path, tls_cluster["seen"])
    print("TLS cluster worker loss:", info)
    backend._client.wait_for_workers(2, timeout=30)  # the nanny restarted it
