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


class _Range:
    """A work item as the worker sees it (what run_chunk reads of coffea's WorkItem)."""

    def __init__(self, start: int) -> None:
        self.entrystart, self.entrystop = start, start + 10


def _weights(item: _Range) -> dict:
    if item.entrystart == 30:
        raise ZeroDivisionError("planted")
    return {"w": hist.Hist.new.Reg(4, 0, 4).Weight().fill([item.entrystart % 4], weight=[0.1 * item.entrystart])}


def test_a_task_folds_the_nodes_it_runs_whole_bit_for_bit(tmp_path):
    """task.Fold: the worker's own merge of a whole node is the tree's left fold (same bits); a failed leaf
    leaves its siblings returned alone; a store that cannot be written fails the node's leaves."""
    from casa_executors.merge import fold
    from casa_executors.store import NodeMissing, Store, decode
    from casa_executors.task import ChunkTask, Fold, TaskBatch, run_batch

    tasks = [ChunkTask(i, _Range(10 * i), 1) for i in range(6)]  # leaves 0-5; chunk 3 fails
    (tmp_path / "store").mkdir()  # the driver makes a run's store; a worker finding none takes the run as over
    store = Store(str(tmp_path / "store"))
    batch = TaskBatch(_weights, tasks, compression=1, store=store, folds=[Fold(0, 0, 2), Fold(1, 2, 2)])
    results = run_batch(batch)
    assert [(r.index, r.ok, r.node, r.merged) for r in results] == [
        (0, True, 0, False), (1, True, None, True),  # node (1, 0), in the first result
        (2, True, None, False), (3, False, None, False),  # chunk 3 failed: chunk 2 comes alone
        (4, True, None, False), (5, True, None, False)]  # no fold asked: one by one
    node = decode(store.get("nodes/1/0"))
    expected = fold([_weights(_Range(0)), _weights(_Range(10))])
    assert (node["w"].view() == expected["w"].view()).all()
    for i in (2, 4, 5):  # the leaves not folded are stored as such; the folded ones never were
        assert (decode(store.get(f"nodes/0/{i}"))["w"].view() == _weights(_Range(10 * i))["w"].view()).all()
    for i in (0, 1):
        with pytest.raises(NodeMissing):
            store.get(f"nodes/0/{i}")

    (tmp_path / "file").write_text("")  # a store below a file cannot be written to
    bad = TaskBatch(_weights, tasks[:2], store=Store(str(tmp_path / "file" / "store")), folds=[Fold(0, 0, 2)])
    assert all(not r.ok and r.node is None for r in run_batch(bad))
