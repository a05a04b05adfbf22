"""``python -m casa_benchmarks.adl run``: rows, identity checks, JSON, plots, data sources."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from casa_benchmarks.adl import cli, runner
from casa_benchmarks.adl.dataset import default_dataset, serve

pytestmark = pytest.mark.filterwarnings("ignore:Branch Photon_:RuntimeWarning")


def test_parse_queries():
    assert cli.parse_queries("1-8") == list(range(1, 9))
    assert cli.parse_queries("6,1-2,2") == [1, 2, 6]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_queries("0-3")


def _row(backend: str, counts: list[int], wall: float = 1.0) -> runner.Row:
    return runner.Row(backend, 1, events=100, wall_s=wall, counts={"q1": np.array(counts)})


def test_compare_flags_any_difference(capsys):
    rows = [_row("futures", [0, 5, 1], 0.5), _row("iterative", [0, 5, 1]), _row("dask", [0, 5, 2]),
            _row("rdf-st", [1, 5, 1])]  # differs only in the underflow bin
    runner.compare(rows)
    assert [r.identical_to_iterative for r in rows] == [True, True, False, False]
    assert rows[1].baseline and rows[0].speedup_vs_iterative == pytest.approx(2.0)
    cli.print_table(rows)
    assert capsys.readouterr().out.count("DIFF") == 2


def test_run_writes_json_and_plots(sample_root, tmp_path):
    out, plots = tmp_path / "out.json", tmp_path / "plots"
    code = cli.main(["run", "--backends", "iterative", "--queries", "1,6,8", "--data", str(sample_root),
                     "--chunksize", "300", "--peers", "coffea-iterative", "--json", str(out), "--plots", str(plots)])
    assert code == 0
    doc = json.loads(out.read_text())
    runs = doc["runs"]
    assert {(r["backend"], r["query"]) for r in runs} == {
        (b, q) for b in ("iterative", "coffea-iterative") for q in (1, 6, 8)}
    for r in runs:
        assert r["error"] is None and r["events"] == 1000 and r["identical_to_iterative"] is True
        assert r["wall_s"] > 0 and r["events_per_s"] > 0 and r["cpu_s"] is not None
        for h in r["histograms"].values():
            assert len(h["edges"]) == 101 and len(h["counts"]) == 100
    ours = {r["query"]: r for r in runs if r["backend"] == "iterative"}
    assert ours[1]["bytes_read"] > 0
    assert sum(ours[1]["histograms"]["q1"]["counts"]) + ours[1]["histograms"]["q1"]["overflow"] == 1000
    # a timeline for our backend (coffea's executors have no report to draw one from)
    assert sorted(p.name for p in plots.iterdir()) == ["q1.png", "q6.png", "q8.png", "throughput.png",
                                                       "timeline_iterative.png"]
    assert (plots / "timeline_iterative.png").stat().st_size > 5000


def test_default_dataset_is_generated_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CASA_ADL_DATA", str(tmp_path))
    files = default_dataset(3000, 2, 5, log=False)
    assert len(files) == 2 and all("/store/adl/" in f for f in files)
    stamp = [tmp_path.joinpath(f).stat().st_mtime_ns for f in files]
    assert default_dataset(3000, 2, 5, log=False) == files
    assert [tmp_path.joinpath(f).stat().st_mtime_ns for f in files] == stamp


def test_cache_auto_reads_through_xcache(sample_root, tmp_path):
    servers = pytest.importorskip("casa_executors.standins.xrootd")
    if not servers.xrootd_available():
        pytest.skip("xrootd is not installed")
    export = Path(tempfile.mkdtemp(prefix="adl-export-"))  # xrootd (user xrootd) must reach it
    try:
        store = export / "store" / "adl"
        store.mkdir(parents=True)
        shutil.copy(sample_root, store / "sample.root")
        for p in (export, export / "store", store, store / "sample.root"):
            p.chmod(0o755)
        cfg = runner.Settings([1], workers=1, chunksize=400)
        with serve([str(store / "sample.root")], "auto") as served:
            assert served.mode == "xcache", served.notes
            assert any(n.startswith("XCache filled before timing") for n in served.notes), served.notes
            assert served.cache.startswith("root://127.0.0.1:")
            assert served.files[0].startswith("root://") and served.peer_files[0].startswith(served.cache)
            rows = runner.run_backend("iterative", served.files, cfg, served.cache, {})
    finally:
        shutil.rmtree(export, ignore_errors=True)
    direct = runner.run_backend("iterative", [str(sample_root)], cfg, None, {})
    assert rows[0].error is None and rows[0].events == 1000 and rows[0].bytes_read > 0
    assert np.array_equal(rows[0].counts["q1"], direct[0].counts["q1"])
