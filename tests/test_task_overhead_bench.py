"""Smoke test of casa_benchmarks.task_overhead: iterative and futures on ~100 tiny chunks, once each."""

from __future__ import annotations

import json
import logging

import pytest

from casa_benchmarks import task_overhead

log = logging.getLogger(__name__)


@pytest.mark.timeout(120)
def test_task_overhead_runs_and_matches_coffea(tmp_path):
    out = tmp_path / "task_overhead.json"
    result = task_overhead.main(["--chunks", "100", "--repeat", "1", "--backends", "iterative,futures",
                                 "--data-dir", str(tmp_path / "data"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # what was written is what was returned
    assert result["chunks"] == 100 and not result["skipped"]
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"iterative", "futures"}
    for name, row in rows.items():
        assert row["chunks"] == 100
        ours, theirs = row["contenders"]["ours"], row["contenders"]["coffea"]
        # every chunk ran once, in ours and in coffea's, with the same output
        assert (ours["chunks"], ours["events"]) == (100, 100 * result["chunksize"]), name
        assert (theirs["chunks"], theirs["events"]) == (ours["chunks"], ours["events"]), name
        assert ours["complete"] and row["same_as_coffea"], name
        assert ours["attempts"] == 100 and 0 < ours["task_ms_per_chunk"] < ours["ms_per"] * 2, name
        assert row["over_coffea"] == pytest.approx(ours["wall_s"] / theirs["wall_s"])
        for cell in row["contenders"].values():
            assert cell["wall_s"] > 0 and cell["per_s"] > 0
            assert cell["ms_per"] == pytest.approx(1000 / cell["per_s"])
    assert "bare" not in rows["iterative"]["contenders"]  # no engine under iterative
    bare = rows["futures"]["contenders"]["bare"]
    assert bare["tasks"] == 100 and rows["futures"]["window"] >= rows["futures"]["workers"]
    # futures puts several short chunks in a task (guided batching), so the engine's share of one chunk is not
    # a ratio of the two rates
    assert rows["futures"]["chunks_per_task"] > 1 and "bare_over_ours" not in rows["futures"]
    log.info("\n%s", task_overhead.table(result["rows"]))


def test_chunks_for_is_checked():
    assert task_overhead.parse_chunks_for("spark=200,workqueue=50") == {"spark": 200, "workqueue": 50}
    assert task_overhead.parse_chunks_for("") == {}
    with pytest.raises(SystemExit):
        task_overhead.parse_chunks_for("sprak=200")
