"""What only the parsl backend does: its options, and a user's Config (its own executor label and
run dir, strategy='none' with a lost pool).

What every backend does (a local HighThroughputExecutor, workers=N) is in test_backend_contract.py.
Parsl's LocalProvider detaches its worker pools (their parent is init), so the tests follow them
by PID (``ParslKit.processes``): the interchange, each block's shell and everything under it,
seen while the run goes on, must all be gone afterwards.
"""

from __future__ import annotations

import sys

import pytest
from analysis import Watch, assert_gone, check_worker_loss, require_engine, run, same
from test_backend_contract import ParslKit

import casa_executors as ce
from casa_executors.errors import ExecutorOptionError


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("parsl")


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


def test_fresh_copy_of_a_config_has_new_locks_and_changes_nothing_global():
    """Every start runs a copy of the user's Config (parsl executors start once): its locks are new and
    unlocked, a lock two objects share stays shared, functions are the same objects, and the copy is made
    without touching process-wide state (locks still cannot be pickled or deep-copied elsewhere)."""
    import copy
    import pickle
    import threading

    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    from casa_executors.backends.parsl import fresh_copy

    def handler(executor, status):
        return None

    htex = HighThroughputExecutor(label="mine", provider=LocalProvider(), block_error_handler=handler)
    user = Config(executors=[htex], run_dir="/nonexistent")
    user.shared_locks = [threading.Lock()] * 2  # one lock, twice
    user.shared_locks[0].acquire()
    copied = fresh_copy(user)
    ex = copied.executors[0]
    assert ex is not htex and ex.provider is not htex.provider and ex.block_error_handler is handler
    ex.set_bad_state_and_fail_all(RuntimeError("planted"))  # an Event parsl made in __init__: new in the copy
    assert ex.bad_state_is_set and not htex.bad_state_is_set
    first, second = copied.shared_locks
    assert first is second and first is not user.shared_locks[0] and first.acquire(blocking=False)
    assert repr(copied.executors[0].provider) == repr(htex.provider)
    with pytest.raises(TypeError):
        pickle.dumps(threading.Lock())
    with pytest.raises(TypeError):
        copy.deepcopy(threading.Lock())


# -- config=: a user's Config ---------------------------------------------------------------------


def test_worker_pool_loss_without_strategy(sample_files, reference, tmp_path, monkeypatch):
    """A user Config with strategy='none': parsl starts no new block, the backend does. The
    lost tasks come back as ManagerLost after the heartbeat threshold (10 s); the driver retries them.
    One block runs until the kill (parsl's init_blocks=1, none added by the backend), then one replacement."""
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
    ex, kit = ce.parsl(config=user, status=False), ParslKit()
    blocks_at_kill: list[list[str]] = []

    def blocks() -> list[str]:
        (htex,) = [e for e in ex.backend.dfk.executors.values() if isinstance(e, HighThroughputExecutor)]
        return sorted(htex.blocks_to_job_id)

    def victims(busy):
        chosen = kit.victims(ex.backend, busy)
        if chosen:
            blocks_at_kill.append(blocks())
        return chosen

    with ex, Watch(lambda: kit.processes(ex.backend)) as watch:
        info = check_worker_loss(ex, sample_files, reference, tmp_path, monkeypatch, victims, kit.lost_prefix)
        kit.after_loss(ex.backend, info)
        # one block until the kill (a look that chose a pool whose kill failed looked again), one replacement
        assert all(b == ["0"] for b in blocks_at_kill) and blocks() == ["0", "1"], (blocks_at_kill, blocks())
    # every process, the dead pool's leftovers too, gone after stop()
    assert_gone({**watch.seen, **dict.fromkeys(info["killed"], "killed pool"),
                 **dict.fromkeys(info["below_killed"], "below the killed pool")})
    print("parsl config strategy='none' pool loss:", info)


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
    with Watch(lambda: ParslKit().processes(ex.backend)) as watch:
        out = run(ex, sample_files)  # one DataFlowKernel for the Runner call: processing takes preprocessing's over
    assert same(out, reference)
    assert ex.report.summary()["attempts"] == 12
    assert len(list((tmp_path / "runinfo").iterdir())) == 1  # one run dir per start, one start per Runner call
    assert ex.backend.starts == 1
    assert user.executors[0].interchange_proc is None  # the user's object was never started
    assert_gone(watch.seen)


def test_worker_pools_hold_a_task_ahead(tmp_path):
    """A pool fetches one task per worker ahead (prefetch_capacity), so a worker that finishes does not wait
    for the round trip through the interchange; for our local HTEX and for blocks on a provider."""
    from parsl.providers import LocalProvider

    from casa_executors.backends.parsl_provider import PREFETCH_PER_WORKER, from_provider

    assert PREFETCH_PER_WORKER >= 1
    local = ce.parsl(workers=3, status=False).backend._local_config(str(tmp_path))
    assert local.executors[0].prefetch_capacity == 3 * PREFETCH_PER_WORKER
    blocks = from_provider(None, LocalProvider(), 2, None, "127.0.0.1")
    assert blocks.executors[0].prefetch_capacity == PREFETCH_PER_WORKER
