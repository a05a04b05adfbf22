"""Smoke test of casa_benchmarks.spark_overhead: bare PySpark and ours, one fresh process each, a few jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analysis import require_engine

from casa_benchmarks import spark_overhead


@pytest.mark.timeout(600)
def test_spark_overhead_splits_start_up_and_jobs(tmp_path, monkeypatch, no_leftover_processes):
    require_engine("spark")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the contenders' processes make their event logs here
    out = tmp_path / "spark_overhead.json"
    result = spark_overhead.main(["--rounds", "1", "--jobs", "3", "--warmup", "1", "--event-log",
                                  "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {name: r[0] for name, r in result["rows"].items()}
    assert set(rows) == {"bare", "ours"}
    assert rows["ours"]["casa_executors"] == str(Path(spark_overhead.__file__).parents[1] / "casa_executors" /
                                                 "__init__.py")  # this checkout's backend was measured
    for name, row in rows.items():
        # the steps PySpark took are inside the start, the start inside the start-up
        assert 0 < row["jvm_s"] and 0 < row["context_s"] and row["jvm_s"] + row["context_s"] < row["start_s"], name
        assert row["startup_s"] == pytest.approx(row["start_s"] + row["first_job_s"]), name
        assert row["job1_ms"] > 0 and row["wave2_ms"] > 0, name
        assert row["cpu_ms_per_pair"]["jvm"] > 0, name  # the JVM was found and did the scheduling
        # Spark's event log had the three timed one-partition jobs, split into their steps
        split = row["event_log"]
        assert set(split) >= {"submit_ms", "schedule_ms", "task_ms", "fetch_ms"}, name
        assert split["task_ms"] >= split["executor_run_ms"] >= 0, name
    assert "-XX:TieredStopAtLevel=1" not in json.dumps(rows["bare"]["conf"])  # bare stays bare
    assert result["summary"]["bare"]["job1_over_bare"] == 1.0
    assert not list(scratch.glob("casa-spark-events-*"))  # read, then removed
