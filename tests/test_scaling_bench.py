"""Smoke test of casa_benchmarks.scaling: the ceiling, iterative and futures (against coffea's FuturesExecutor)
on a small generated dataset, once each, with the engine's round trip and the bound it sets."""

from __future__ import annotations

import json

import pytest

from casa_benchmarks import scaling


@pytest.mark.timeout(300)
def test_scaling_runs_and_bounds_each_engine_by_its_round_trip(tmp_path):
    out = tmp_path / "scaling.json"
    result = scaling.main(["--events", "40000", "--files", "2", "--chunksize", "5000", "--queries", "1",
                           "--repeat", "1", "--min-time", "0", "--backends", "ceiling,futures",
                           "--data-dir", str(tmp_path / "data"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # what was written is what was returned
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"iterative", "ceiling", "futures"} and not result["skipped"]
    for name, row in rows.items():
        cell = row["queries"][1]
        assert cell["events"] == 40000 and cell["identical_to_iterative"], name
        assert 0 < cell["efficiency"] and 0 < cell["latency_bound"] <= 1, name
    assert rows["iterative"]["round_trip_s"] == 0 and rows["iterative"]["queries"][1]["latency_bound"] == 1
    futures = rows["futures"]
    # waves of no-op tasks on the process pool, before and after the queries: milliseconds at most, and the
    # bound follows from the faster
    assert len(futures["round_trips_s"]) == 2 and futures["round_trip_s"] == min(futures["round_trips_s"])
    assert 0 < futures["round_trip_s"] < 0.5
    cell = futures["queries"][1]
    share = cell["iterative_wall_s"] / futures["workers"]
    assert cell["latency_bound"] == pytest.approx(share / (share + 2 * futures["round_trip_s"]))
    assert cell["identical_to_coffea"] and cell["over_coffea"] > 0
