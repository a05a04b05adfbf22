"""The parsl backend on real processes: a local HighThroughputExecutor, and a user Config.

Parsl's LocalProvider detaches its worker pools (their parent is init), so the
tests follow them by PID: the interchange, each block's shell and everything
under it, seen while the run goes on, must all be gone afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import psutil
import pytest
from analysis import Failing, assert_adl_identical, attempts, require_engine, run, same

import casa_executors as ce
from casa_executors.errors import ExecutorOptionError


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("parsl")


def alive(p: psutil.Process) -> bool:
    """Running, not a zombie, and still the same process (psutil checks for a reused PID)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def engine_procs(backend) -> dict[psutil.Process, str]:
    """Process -> role for every process of the backend's running DataFlowKernel."""
    dfk = backend.dfk
    out: dict[psutil.Process, str] = {}
    if dfk is None:
        return out
    for ex in dfk.executors.values():
        with contextlib.suppress(psutil.Error, AttributeError):
            out[psutil.Process(ex.interchange_proc.pid)] = "interchange"
        provider = getattr(ex, "provider", None)
        for job in list(getattr(provider, "resources", {}).values()):
            with contextlib.suppress(psutil.Error, KeyError):
                block = psutil.Process(job["remote_pid"])
                out[block] = "block"
                for child in block.children(recursive=True):
                    out[child] = " ".join(child.cmdline()[:2])
    return out


def pools(backend) -> list[psutil.Process]:
    return [p for p, role in engine_procs(backend).items() if "process_worker_pool" in role and alive(p)]


class Watch(threading.Thread):
    """Records the engine's processes while a run goes on."""

    def __init__(self, backend) -> None:
        super().__init__(daemon=True)
        self.backend, self.seen, self.stop = backend, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.seen.update(engine_procs(self.backend))
            time.sleep(0.1)

    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def assert_gone(procs: dict[psutil.Process, str], timeout: float = 15) -> None:
    """All ``procs`` end within ``timeout``; any left is killed by PID and fails the test."""
    deadline = time.time() + timeout
    while any(alive(p) for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    left = {p.pid: role for p, role in procs.items() if alive(p)}
    for p in procs:
        if alive(p):
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not left, f"parsl processes left behind: {left}"


# -- options -------------------------------------------------------------------------------


def test_options_are_checked(tmp_path):
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
    from parsl.jobs.error_handlers import windowed_error_handler
    from parsl.providers import LocalProvider

    with pytest.raises(ExecutorOptionError, match="not both"):
        ce.parsl(config=Config(executors=[ThreadPoolExecutor()]), workers=2)
    with pytest.raises(ExecutorOptionError, match=r"parsl\.config\.Config"):
        ce.parsl(config={"executors": []})
    with pytest.raises(ExecutorOptionError, match="workers must be a whole number"):
        ce.parsl(workers=-1)
    user = Config(executors=[HighThroughputExecutor(address="127.0.0.1", provider=LocalProvider())], retries=2,
                  run_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="retries=2 is ignored"):
        ex = ce.parsl(config=user)
    copy = ex.backend._template
    assert copy.retries == 0 and user.retries == 2  # the user's object is left alone
    assert copy.executors[0].block_error_handler is windowed_error_handler
    assert user.executors[0].provider.worker_init == ""
    assert ex.backend.workers == 1  # max_workers_per_node unset: parsl's guess


def test_unavailable_names_the_missing_package(monkeypatch):
    from casa_executors.backends.parsl import ParslBackend

    assert ParslBackend.unavailable() is None
    monkeypatch.setitem(sys.modules, "parsl", None)
    assert "parsl" in ParslBackend.unavailable()


# -- workers=N: our local HighThroughputExecutor -------------------------------------------------


def test_workers_matches_iterative(sample_files, reference):
    ex = ce.parsl(workers=2, status=False)
    with Watch(ex.backend) as watch:
        out = run(ex, sample_files)
    assert same(out, reference)
    s = ex.report.summary()
    assert s["processed"] == s["attempts"] == 12 and s["workers"] == 2
    assert ex.backend.dfk is None and ex.backend._run_dir is None  # stopped, run dir removed
    assert "interchange" in watch.seen.values()
    assert any("process_worker_pool" in role for role in watch.seen.values())
    assert_gone(watch.seen)


@pytest.fixture(scope="module")
def local():
    """One DataFlowKernel with 2 workers for the module."""
    ex = ce.parsl(workers=2, status=False)
    ex.backend.hold()
    seen: dict[psutil.Process, str] = {}
    try:
        with Watch(ex.backend) as watch:
            yield ex.backend, watch
            seen = dict(watch.seen)
    finally:
        ex.backend.release()
        assert_gone(seen)


def test_adl_queries_bit_identical(local, sample_files):
    assert_adl_identical(local[0], sample_files)


def test_lost_worker_raises(local):
    """A task whose worker process dies fails (parsl's WorkerLost); parsl does not re-run it."""
    from parsl.executors.high_throughput.errors import WorkerLost

    backend, _ = local
    with pytest.raises(WorkerLost):
        backend.submit(os._exit, 3).result(timeout=60)
    assert backend.submit(abs, -2).result(timeout=60) == 2  # the pool replaced its worker


def check_pool_loss(ex, files, reference, tmp_path) -> str:
    """SIGKILL the process_worker_pool mid-run: output identical, the lost chunks retried,
    every process (the dead pool's leftovers too) gone after stop()."""
    backend = ex.backend
    log = str(tmp_path / "attempts.log")
    open(log, "w").close()
    killed: dict[str, object] = {}

    def kill_pool() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            p = ex.report.processing
            if p is not None and sum(r.status == "ok" for r in p.rows) >= 2:
                running = pools(backend)
                if running:
                    children = running[0].children(recursive=True)
                    running[0].kill()
                    killed.update(pool=running[0], children=children, at=time.time())
                    return
            time.sleep(0.05)

    with ex, Watch(backend) as watch:
        killer = threading.Thread(target=kill_pool, daemon=True)
        killer.start()
        t0 = time.time()
        out = run(ex, files, Failing(log, bad_starts=set(), sleep=0.3), chunksize=100)
        killer.join()
        assert killed, "the run ended before the pool could be killed"
        wall, after = time.time() - t0, time.time() - killed["at"]
        now = pools(backend)
        assert now and killed["pool"] not in now  # a new block runs
        orphans = [p for p in killed["children"] if alive(p)]
    assert same(out, reference)
    rows = ex.report.rows()
    s = ex.report.summary()
    assert all(r.status == "ok" for r in rows) and s["processed"] == s["chunks"] == 30
    assert s["attempts"] > s["chunks"]
    assert sum(r.events for r in rows) == 3000
    assert len(attempts(log)) == 30  # every chunk started (a task killed while queued never did)
    retried = [(r.index, r.attempts) for r in rows if r.attempts > 1]
    assert_gone({**watch.seen, killed["pool"]: "killed pool", **dict.fromkeys(killed["children"], "its children")})
    return (f"run {wall:.1f} s, {after:.1f} s after the kill, {s['attempts']} attempts for {s['chunks']} chunks, "
            f"retried {retried}; {len(orphans)} of the dead pool's {len(killed['children'])} children "
            "ran until stop()")


def test_worker_pool_loss(sample_files, reference, tmp_path):
    """workers=N: the strategy starts a new block at once; the lost tasks come back as
    ManagerLost after the heartbeat threshold (10 s) and the driver retries them."""
    info = check_pool_loss(ce.parsl(workers=2, status=False), sample_files, reference, tmp_path)
    print("parsl workers=2 pool loss:", info)


def test_worker_pool_loss_without_strategy(sample_files, reference, tmp_path):
    """A user Config with strategy='none': parsl starts no new block, the backend does."""
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    user = Config(
        executors=[HighThroughputExecutor(address="127.0.0.1", max_workers_per_node=2, heartbeat_period=2,
                                          heartbeat_threshold=10, provider=LocalProvider())],
        strategy="none",
        strategy_period=0.5,
        run_dir=str(tmp_path / "runinfo"),
    )
    info = check_pool_loss(ce.parsl(config=user, status=False), sample_files, reference, tmp_path)
    print("parsl config strategy='none' pool loss:", info)


# -- config=: a user's Config ---------------------------------------------------------------------


def test_user_config(sample_files, reference, tmp_path):
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    user = Config(
        executors=[HighThroughputExecutor(label="mine", address="127.0.0.1", max_workers_per_node=2,
                                          provider=LocalProvider(init_blocks=1, max_blocks=1))],
        strategy_period=0.5,
        run_dir=str(tmp_path / "runinfo"),
        retries=1,
    )
    with pytest.warns(UserWarning, match="retries=1 is ignored"):
        ex = ce.parsl(config=user, status=False)
    assert ex.backend.workers == 2
    with Watch(ex.backend) as watch:
        out = run(ex, sample_files)  # two DataFlowKernels from two copies: preprocessing, processing
    assert same(out, reference)
    assert ex.report.summary()["attempts"] == 12
    assert len(list((tmp_path / "runinfo").iterdir())) == 2  # one run dir per start
    assert user.executors[0].interchange_proc is None  # the user's object was never started
    assert_gone(watch.seen)
