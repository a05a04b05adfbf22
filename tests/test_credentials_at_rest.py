"""The bearer token for XCache reads travels with each task; where it lands on disk, no other local user
may read it. Local engines here (Spark, Work Queue with local workers); Dask, Parsl and Work Queue whose
workers are Slurm jobs are checked the same way in tests/test_slurm_*.py.

A watcher scans every new entry of the temporary directory (sandboxes, staging and spill directories
come and go with their tasks) for the token's bytes while the run goes on.
"""

from __future__ import annotations

import os
import tempfile

from analysis import require_engine, run
from facility import SecretWatch, new_temp_entries, same_physics

import casa_executors as ce


def watched_run(ex, served):
    before = set(os.listdir(tempfile.gettempdir()))
    with SecretWatch(served.token.encode(), lambda: new_temp_entries(before)) as seen:
        out = run(ex, served.urls)
    assert ex.report.summary()["served_by"] == {f"xcache:{served.cache}": 12}  # the token did reach the workers
    return out, seen


def test_spark_leaves_no_readable_token(served, reference):
    require_engine("spark")
    out, seen = watched_run(ce.spark(master="local[2]", status=False, **served.driver_options()), served)
    assert same_physics(out, reference)
    assert not seen.exposed(), seen.seen


def test_workqueue_sandboxes_keep_the_token_private(served, reference):
    require_engine("workqueue")
    out, seen = watched_run(ce.workqueue(workers=1, status=False, **served.driver_options()), served)
    assert same_physics(out, reference)
    assert seen.seen, "the task inputs (with the token) were never seen: the watch looked in the wrong place"
    assert not seen.exposed(), seen.seen
