"""The driver itself, on the iterative backend: option checks that are nobody's backend, the report's
JSON, the merge tree. What every backend does is in test_backend_contract.py."""

from __future__ import annotations

import json
import random

import hist
import numpy as np
import pytest
from analysis import run

import casa_executors as ce
from casa_executors.merge import TreeMerger


def test_bad_options_fail_at_construction():
    """What is not one backend's: backend names, iterative's own limits (per-backend checks:
    test_backend_contract.py)."""
    with pytest.raises(ce.ExecutorOptionError, match="workers must be 1, got 2"):
        ce.iterative(workers=2)
    with pytest.raises(ce.ExecutorOptionError, match="unknown option 'master'"):
        ce.iterative(master="local[2]")
    with pytest.raises(ce.ExecutorOptionError, match="unknown backend 'condor'"):
        ce.create("condor")


def test_report_to_json(sample_files, tmp_path):
    ex = ce.iterative(status=False)
    run(ex, sample_files)
    path = tmp_path / "report.json"
    ex.report.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["summary"]["processed"] == 12 and len(data["chunks"]) == 12
    assert {"filename", "entrystart", "entrystop", "attempts", "worker", "host", "wall_s", "events",
            "bytes_read"} <= set(data["chunks"][0])
    assert "12/12 chunks" in str(ex.report)


def test_tree_merge_is_order_independent_and_bounded():
    n, fanin = 500, 4
    rng = random.Random(7)
    outputs = [{"h": hist.Hist.new.Reg(10, 0, 1, name="x").Weight().fill(x=rng.random(), weight=rng.random())}
               for _ in range(n)]
    results = []
    for seed in (1, 2, 3):
        merger = TreeMerger(n, fanin)
        # submitted in index order like the driver, at most `window` in flight, completing in random order
        window, pending, nxt, pick = 8, [], 0, random.Random(seed)
        while nxt < n or pending:
            while nxt < n and len(pending) < window:
                pending.append(nxt)
                nxt += 1
            i = pending.pop(pick.randrange(len(pending)))
            merger.add(i, {"h": outputs[i]["h"].copy()})
        assert merger.done
        depth = len(merger.sizes)
        assert merger.held_peak <= (window + 1) * (fanin - 1) * depth
        results.append(merger.result["h"])
    assert all(np.array_equal(r.values(), results[0].values()) for r in results)
    assert all(np.array_equal(r.variances(), results[0].variances()) for r in results)
