"""What only the futures backend does: a pool of our own fork server's processes, kept between
Runner calls while held. What every backend does is in test_backend_contract.py."""

from __future__ import annotations

from analysis import run, same

import casa_executors as ce


def test_held_executor_keeps_workers_between_runs(sample_files, no_leftover_processes):
    ex = ce.futures(workers=2, status=False)
    with ex:
        run(ex, sample_files[:1])
        pids = set(ex.backend.pids())
        run(ex, sample_files[:1])
        assert pids and set(ex.backend.pids()) == pids
    assert ex.backend.pids() == []


def test_short_chunks_share_tasks_that_shrink_towards_the_end(sample_files):
    """Guided batching (Backend.batch_size): several chunks a task while much work is left, a chunk a task at
    the end (no core waits on a long last task); the output and the per-chunk report are unchanged."""
    from casa_executors.backends.futures import FuturesBackend

    sizes: list[int] = []

    class Recorded(FuturesBackend):  # the real pool; only the batch sizes are written down
        def submit_many(self, fn, args):
            if fn.__name__ == "run_batch":
                sizes.extend(len(batch.tasks) for batch in args)
            return super().submit_many(fn, args)

    backend = Recorded(workers=2)
    ex = ce.Driver(backend=backend, status=False)
    # 150 chunks, 3 files for preprocessing: more than the tasks in flight (2 per worker) hold at 32 chunks each
    out = run(ex, sample_files, chunksize=20)
    assert same(out, run(ce.iterative(status=False), sample_files, chunksize=20))
    processing = sizes[2:]  # preprocessing: 3 files, one task per worker
    assert sizes[:2] == [2, 1]
    first = min(-(-150 // (backend.tasks_per_worker * 2)), backend.max_chunks_per_task)
    assert sum(processing) == 150 and processing[0] == first > 1, sizes
    assert processing[-1] == 1 and processing == sorted(processing, reverse=True), sizes
    s = ex.report.summary()
    assert s["processed"] == s["attempts"] == s["chunks"] == 150 and len(ex.report.processing.rows) == 150
