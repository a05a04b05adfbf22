"""One checkpointed run, as a process the tests can SIGKILL mid-run.

``python tests/checkpoint_job.py BACKEND CHECKPOINT LOG METADATA FILE...`` runs
the same call as :func:`call` in the test process (same executor options, same
processor), so a resumed call there has the same run key. METADATA is a pickled
coffea metadata cache (preprocessing is not what these tests are about).
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from analysis import Failing, run

CHUNKSIZE = 100  # 30 chunks over the three 1000-event files
FANIN = 4  # levels of 30, 8, 2 and 1 nodes: merged nodes to restore, few merge tasks
SLEEP = 0.25  # s per chunk: a run lasts long enough to be killed in the middle
MARKER = "CASA_CHECKPOINT_TEST"  # in the environment of every process of a job, to find them after the kill


def executor(name: str, **options: Any):
    import casa_executors as ce

    opts = {"status": False, "merge_fanin": FANIN, "retries": 1, **options}
    if name != "iterative" and "client" not in opts:
        opts.setdefault("workers", 2)
    if name == "spark":  # its default (8 chunks a task here) can finish all 30 before 3 merged nodes exist
        opts.setdefault("chunks_per_task", 2)
    return ce.create(name, **opts)


def call(name: str, checkpoint: str, log: str, files: list[str], metadata_cache: dict, **options: Any):
    ex = executor(name, checkpoint=checkpoint, **options)
    with ex:  # one engine for the whole call
        out = run(ex, files, Failing(log, bad_starts=set(), sleep=SLEEP), chunksize=CHUNKSIZE,
                  metadata_cache=metadata_cache)
    return ex, out


def main(argv: list[str]) -> int:
    name, checkpoint, log, metadata, *files = argv
    with open(metadata, "rb") as f:
        call(name, checkpoint, log, files, pickle.load(f))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
