"""Smoke test of casa_benchmarks.engine_per_call on dask(workers=2): one call each way, counted, written."""

from __future__ import annotations

import json

import pytest
from analysis import require_engine

from casa_benchmarks import engine_per_call


@pytest.mark.timeout(300)
def test_engine_per_call_counts_starts_each_way(tmp_path, no_leftover_processes):
    require_engine("dask")
    out = tmp_path / "engine_per_call.json"
    result = engine_per_call.main(["--engines", "dask", "--repeat", "1", "--json", str(out)])
    assert result == 0
    written = json.loads(out.read_text())
    rows = {r["setting"]: r for r in written["rows"]}
    assert set(rows) == set(engine_per_call.SETTINGS)
    before, after = rows["engine per call (idle_timeout=0)"], rows["one engine per Runner call"]
    assert before["engine_starts"] == before["local_cluster_starts"] == 2
    assert after["engine_starts"] == after["local_cluster_starts"] == 1
    assert before["events"] == after["events"] == 3000 and before["muons"] == after["muons"]
    assert before["stopped_after"] and after["stopped_after"]
