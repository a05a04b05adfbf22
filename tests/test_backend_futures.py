"""What only the futures backend does: a pool of our own fork server's processes, kept between
Runner calls while held. What every backend does is in test_backend_contract.py."""

from __future__ import annotations

from analysis import run

import casa_executors as ce


def test_held_executor_keeps_workers_between_runs(sample_files, no_leftover_processes):
    ex = ce.futures(workers=2, status=False)
    with ex:
        run(ex, sample_files[:1])
        pids = set(ex.backend.pids())
        run(ex, sample_files[:1])
        assert pids and set(ex.backend.pids()) == pids
    assert ex.backend.pids() == []
