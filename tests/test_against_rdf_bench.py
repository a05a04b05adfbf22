"""Smoke test of casa_benchmarks.against_rdf: ours and RDataFrame timed in turn, outputs checked against RDataFrame's."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Branch Photon_:RuntimeWarning")


@pytest.mark.timeout(300)
def test_against_rdf_runs_every_contender_and_checks_outputs(tmp_path, no_leftover_processes):
    pytest.importorskip("ROOT", reason="PyPI package 'root' is not installed")
    from casa_benchmarks import against_rdf

    out = tmp_path / "against_rdf.json"
    result = against_rdf.main(["--events", "20000", "--files", "2", "--chunksizes", "5000,10000", "--queries", "1,8",
                               "--repeat", "1", "--data-dir", str(tmp_path / "data"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["chunksize"], r["query"]) for r in result["rows"]] == [(5000, 1), (5000, 8), (10000, 1), (10000, 8)]
    for row in result["rows"]:
        assert set(row["wall_s"]) == {"iterative", "futures", "rdf-st", "rdf-mt"}
        assert all(w > 0 for w in row["wall_s"].values())
        assert row["identical"], row  # our histograms are RDataFrame's, bin for bin
        assert row["iterative_over_rdf_st"] == pytest.approx(row["wall_s"]["rdf-st"] / row["wall_s"]["iterative"])
        # RDataFrame at its best: optimised, its event loop timed apart from building and compiling the query
        assert row["rdf_cling_args"] == "-O2"
        assert all(0 < row["wall_s"][k] <= row["rdf_total_s"][k] for k in ("rdf-st", "rdf-mt"))
