"""All six backends, all eight ADL queries, through a real origin + XCache: bit-identical to iterative.

This is the CI comparison: the benchmark command in ``--strict`` mode fails
when any backend is missing, errors, or differs from iterative in any bin.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

import casa_executors
from casa_benchmarks.adl import cli

pytestmark = pytest.mark.filterwarnings("ignore:Branch Photon_:RuntimeWarning")


def test_all_backends_agree_on_all_queries_through_xcache(monkeypatch, no_leftover_processes):
    data = Path(tempfile.mkdtemp(prefix="casa-conformance-"))  # the xrootd user must reach it
    monkeypatch.setenv("CASA_ADL_DATA", str(data))
    out = data / "compare.json"
    try:
        code = cli.main(["run", "--strict", "--queries", "1-8", "--events", "30000", "--files", "3",
                         "--workers", "2", "--chunksize", "5000", "--json", str(out)])
        doc = json.loads(out.read_text())
    finally:
        shutil.rmtree(data, ignore_errors=True)
    runs = doc["runs"]
    assert doc["config"]["cache"] == "auto" and not doc["config"]["skipped"]
    assert {r["backend"] for r in runs} == set(casa_executors.BACKENDS)
    for r in runs:
        assert r["error"] is None, (r["backend"], r["query"], r["error"])
        assert r["events"] == 30000 and r["identical_to_iterative"] is True, (r["backend"], r["query"])
    assert code == 0
