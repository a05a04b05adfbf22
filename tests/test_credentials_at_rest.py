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
from facility import SecretWatch, new_temp_entries

import casa_executors as ce


def watched_run(ex, served):
    """One file (four chunks) through the token-checking XCache, watched."""
    before = set(os.listdir(tempfile.gettempdir()))
    with SecretWatch(served.token.encode(), lambda: new_temp_entries(before)) as seen:
        out = run(ex, served.urls[:1])
    assert ex.report.summary()["served_by"] == {f"xcache:{served.cache}": 4}  # the token did reach the workers
    assert out["events"].value == 1000
    return out, seen


def test_spark_leaves_no_readable_token(served):
    require_engine("spark")
    _, seen = watched_run(ce.spark(master="local[2]", status=False, **served.driver_options()), served)
    assert not seen.exposed(), seen.seen


def test_workqueue_sandboxes_keep_the_token_private(served):
    require_engine("workqueue")
    _, seen = watched_run(ce.workqueue(workers=1, status=False, **served.driver_options()), served)
    assert seen.seen, "the task inputs (with the token) were never seen: the watch looked in the wrong place"
    assert not seen.exposed(), seen.seen
