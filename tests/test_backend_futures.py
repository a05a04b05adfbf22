"""What only the futures backend does: a loky pool of our own, kept between Runner calls while held,
whose workers do not re-run the user's ``__main__``. What every backend does is in test_backend_contract.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import psutil
import pytest
from analysis import assert_gone, run, same

import casa_executors as ce
from casa_executors.backends.base import REPO


def test_held_executor_keeps_workers_between_runs(sample_files, no_leftover_processes):
    ex = ce.futures(workers=2, status=False)
    with ex:
        run(ex, sample_files[:1])
        pids = set(ex.backend.pids())
        run(ex, sample_files[:1])
        assert pids and set(ex.backend.pids()) == pids
        # fresh interpreters (fork + exec), not forks of this one: none inherits the driver's threads
        for pid in pids:
            worker = psutil.Process(pid)
            assert worker.ppid() == os.getpid() and "loky.backend.popen_loky_posix" in worker.cmdline()
    assert ex.backend.pids() == []


# an analysis script without the `if __name__ == "__main__":` guard, its processor defined in __main__
UNGUARDED = """
import json, os, sys

with open(sys.argv[1], "a") as runs:  # every run of this file, by PID
    runs.write(f"{os.getpid()}\\n")

from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors as ce


class WhereAmI(processor.ProcessorABC):
    def process(self, events):
        return {"events": len(events), "pids": {os.getpid()}}

    def postprocess(self, accumulator):
        return accumulator


runner = processor.Runner(executor=ce.futures(workers=2, status=False), schema=NanoAODSchema, chunksize=250)
out = runner({"SingleMu": sys.argv[2:]}, WhereAmI(), treename="Events")
print(json.dumps({"events": out["events"], "pids": sorted(out["pids"])}))
"""


@pytest.mark.parametrize("how", ["path", "module"])
def test_unguarded_script_runs_once(how, sample_files, tmp_path):
    """A user's script without the ``__main__`` guard runs once, not again in every worker, whether
    run by path (``python analysis.py``) or as a module (``python -m analysis``)."""
    (tmp_path / "unguarded_analysis.py").write_text(textwrap.dedent(UNGUARDED))
    runs = tmp_path / "runs"
    target = [str(tmp_path / "unguarded_analysis.py")] if how == "path" else ["-m", "unguarded_analysis"]
    pythonpath = [str(tmp_path), REPO, *filter(None, [os.environ.get("PYTHONPATH")])]
    proc = subprocess.Popen([sys.executable, *target, str(runs), *map(str, sample_files)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert runs.read_text().split() == [str(proc.pid)]  # the script ran once: in its own process
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["events"] == 3000
    assert out["pids"] and proc.pid not in out["pids"]  # the chunks ran in the workers
    assert_gone([psutil.Process(p) for p in out["pids"] if psutil.pid_exists(p)])  # stopped with the call


def test_short_chunks_share_tasks_that_shrink_towards_the_end(sample_files):
    """Guided batching (Backend.batch_size): several chunks a task while much work is left, a chunk a task at
    the end (no core waits on a long last task); the output and the per-chunk report are unchanged."""
    from casa_executors.backends.futures import FuturesBackend

    sizes: list[int] = []

    class Recorded(FuturesBackend):  # the real pool; only the batch sizes are written down
        def submit_many(self, fn, args, priority=0):
            if fn.__name__ == "run_batch":
                sizes.extend(len(batch.tasks) for batch in args)
            return super().submit_many(fn, args, priority)

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
