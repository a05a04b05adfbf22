"""The next chunk's baskets are read and decompressed while a chunk computes (casa_executors.prefetch).

The files here are written in baskets of 100 entries and read in chunks of 250: each chunk has
baskets of its own (read ahead while the chunk before runs) and baskets it shares with the chunk
before (left to that chunk, which keeps them: casa_executors.baskets). The output is the same bits
as coffea's own executor's, and every chunk reads the same bytes as without read-ahead.
"""

from __future__ import annotations

import threading

import awkward as ak
import numpy as np
import pytest
import uproot
from coffea import processor
from coffea.nanoevents import BaseSchema
from coffea.processor.executor import WorkItem

import casa_executors
from casa_executors import prefetch
from casa_executors.source import ChunkIO, MeteredSource, open_files

ENTRIES, BASKET, CHUNK = 1000, 100, 250


class Sums(processor.ProcessorABC):
    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at

    def process(self, events):
        start = events.metadata["entrystart"]
        if start == self.fail_at:
            raise ZeroDivisionError(f"chunk at {start}")
        return {"n": len(events), "x": float(ak.sum(events.x)), "y": int(ak.sum(events.y)),
                "rows": {(events.metadata["filename"], start): ak.to_list(events.y[:3]) + ak.to_list(events.y[-3:])}}

    def postprocess(self, accumulator):
        return accumulator


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("prefetch")
    out = []
    for k in range(2):
        path = d / f"ahead{k}.root"
        with uproot.recreate(path, compression=uproot.LZ4(1)) as f:
            f.mktree("Events", {"x": "float64", "y": "var * int32"})
            for start in range(0, ENTRIES, BASKET):  # one basket per branch per extend
                ids = np.arange(start, min(start + BASKET, ENTRIES))
                y = ak.unflatten(np.repeat(ids + k, ids % 5).astype(np.int32), ids % 5)
                f["Events"].extend({"x": np.sin(ids) * 1e3 + k, "y": y})
        out.append(str(path))
    return out


@pytest.fixture(autouse=True)
def small_chunks_read_ahead(monkeypatch):
    """The chunks here are a few kB: read ahead all the same (a local file's small chunks are not, by default)."""
    monkeypatch.setattr(prefetch, "LOCAL_MIN_BYTES", 0)


def _run(executor, files, processor_instance=None):
    runner = processor.Runner(executor=executor, schema=BaseSchema, chunksize=CHUNK, metadata_cache={})
    return runner({"ahead": files}, processor_instance or Sums(), treename="Events")


def _bytes_by_chunk(executor) -> list[tuple[str, int, int]]:
    return sorted((r.filename, r.entrystart, r.bytes_read) for r in executor.report.rows())


def _reading_ahead() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "casa-read-ahead" and t.is_alive()]


@pytest.mark.parametrize("chunks_per_task", [None, 4])  # iterative's one chunk a task (then), and tasks of 4
def test_read_ahead_gives_coffeas_bits_and_reads_each_byte_where_it_would(files, monkeypatch, chunks_per_task):
    reference = _run(processor.IterativeExecutor(), files)
    options = {"status": False} if chunks_per_task is None else {"status": False, "chunks_per_task": chunks_per_task}
    before = prefetch.handed()
    on = casa_executors.iterative(**options)
    assert _run(on, files) == reference
    handed = prefetch.handed() - before
    # chunks after the run's first have their own baskets (not shared with the chunk before) read ahead:
    # 2 branches x (2, 3 or 2 baskets in a file's later chunks, 3 in a file's first): at least 2 x 10
    assert handed >= 20, handed
    assert not _reading_ahead() and open_files().left_ahead is None

    monkeypatch.setenv(prefetch.ENV, "0")
    mid = prefetch.handed()
    off = casa_executors.iterative(**options)
    assert _run(off, files) == reference
    assert prefetch.handed() == mid
    # the bytes read ahead are metered to the chunk they are for: each chunk read what it reads without
    assert _bytes_by_chunk(on) == _bytes_by_chunk(off)


def test_small_local_chunks_are_left_to_uproot(files, monkeypatch):
    monkeypatch.setattr(prefetch, "LOCAL_MIN_BYTES", 2**20)
    before = prefetch.handed()
    ex = casa_executors.iterative(status=False)
    assert _run(ex, files) == _run(processor.IterativeExecutor(), files)
    assert prefetch.handed() == before


def test_switched_off_with_the_internals(files):
    before = prefetch.handed()
    ex = casa_executors.iterative(status=False, internals=False)
    assert _run(ex, files) == _run(processor.IterativeExecutor(), files)
    assert prefetch.handed() == before


@pytest.mark.parametrize("chunks_per_task", [None, 4])
def test_read_ahead_stops_when_a_chunk_fails(files, chunks_per_task):
    options = {"status": False, "retries": 0}
    if chunks_per_task:
        options["chunks_per_task"] = chunks_per_task
    ex = casa_executors.iterative(**options)
    with pytest.raises(Exception, match="chunk at 500"):  # coffea wraps what a processor raises
        _run(ex, files, Sums(fail_at=500))
    assert not _reading_ahead(), "a read-ahead thread outlived the failed run"
    assert open_files().left_ahead is None
    assert _run(casa_executors.iterative(status=False), files) == _run(processor.IterativeExecutor(), files)


def _branches(f) -> list:
    return [f["Events"]["x"], f["Events"]["y"]]


def test_a_chunk_read_ahead_holds_at_most_its_budget(files):
    item = WorkItem("ahead", files[0], "Events", 0, ENTRIES, "", None)
    with uproot.open(files[0], handler=MeteredSource) as f:
        def ahead(skip, budget):
            return prefetch.Ahead(item, ChunkIO(), prefetch.plan(item, _branches(f), skip, budget), budget).start()

        whole = ahead(None, 2**30)
        whole.wait()
        assert whole.error is None and len(whole.baskets) == 2 * ENTRIES // BASKET
        budget = whole.nbytes // 3
        part = ahead(None, budget)
        part.wait()
        assert part.error is None and 0 < len(part.baskets) < len(whole.baskets)
        assert part.nbytes <= budget
        # what was read ahead is what uproot reads: the same baskets, decompressed alike
        for (key, num), basket in part.baskets.items():
            assert bytes(basket.data) == bytes(whole.baskets[(key, num)].data)
        # entries the running chunk reads are left to it
        skip = ahead((0, 250), 2**30)
        skip.wait()
        assert sorted({n for _, n in skip.baskets}) == list(range(3, ENTRIES // BASKET))
        stopped = ahead(None, 2**30)
        stopped.stop()
        assert not stopped.alive
        # the bytes read ahead are metered to the chunk's ChunkIO
        compressed = sum(int(b.member("fBasketBytes")[i]) for b in _branches(f) for i in range(b.num_baskets))
        assert whole.io.bytes_read == compressed, (whole.io.bytes_read, compressed)


def test_read_ahead_through_xrootd_gives_the_same_bits_and_bytes(files, monkeypatch, no_leftover_processes):
    """Over a network: the next chunk's baskets in one vector request while a chunk runs, and a chunk with
    nothing read ahead reads its own in one request up front."""
    from pathlib import Path

    from xrootd_fixtures import export_dir, require_xrootd

    from casa_executors.standins.xrootd import XRootDOrigin

    require_xrootd()
    reference = _run(processor.IterativeExecutor(), files)
    names = {Path(f).name: Path(f) for f in files}
    with export_dir(names) as d, XRootDOrigin(d) as origin:
        urls = [origin.url(f"/store/{n}") for n in names]
        ref = {k: v for k, v in reference.items() if k != "rows"}
        rows = {(Path(f).name, s): v for (f, s), v in reference["rows"].items()}
        results = {}
        for mode in ("1", "0"):
            monkeypatch.setenv(prefetch.ENV, mode)
            before = prefetch.handed()
            ex = casa_executors.iterative(status=False, chunks_per_task=2)
            out = _run(ex, urls)
            assert {k: v for k, v in out.items() if k != "rows"} == ref
            assert {(f.rsplit("/", 1)[1], s): v for (f, s), v in out["rows"].items()} == rows
            results[mode] = (prefetch.handed() - before, _bytes_by_chunk(ex))
        assert results["1"][0] >= 20 and results["0"][0] == 0, results
        assert results["1"][1] == results["0"][1]
    assert not _reading_ahead()


class AheadOf(processor.ProcessorABC):
    """Which chunks (their first entries) the running task has started reading ahead, seen by each chunk."""

    def process(self, events):
        plan = prefetch.current()
        started = sorted({a.item.entrystart for a in plan.started}) if plan is not None else None
        return {(events.metadata["filename"], events.metadata["entrystart"]): started, "y": int(ak.sum(events.y))}

    def postprocess(self, accumulator):
        return accumulator


def test_a_chunk_sharing_its_baskets_with_the_running_one_is_passed_over(tmp_path):
    """Baskets of 500 entries, chunks of 250: the chunk after the running one has no basket of its own (it
    takes the running chunk's, kept for it), so the chunk after that is read ahead from the running chunk's
    start, not from the next chunk's."""
    files = []
    for k in range(2):
        path = tmp_path / f"long{k}.root"
        with uproot.recreate(path, compression=uproot.LZ4(1)) as f:
            f.mktree("Events", {"x": "float64", "y": "var * int32"})
            for start in range(0, ENTRIES, 500):
                ids = np.arange(start, start + 500)
                f["Events"].extend({"x": ids * 1.0, "y": ak.unflatten(np.repeat(ids, ids % 3).astype(np.int32), ids % 3)})
        files.append(str(path))
    ex = casa_executors.iterative(status=False, chunks_per_task=4)  # a task a file
    runner = processor.Runner(executor=ex, schema=BaseSchema, chunksize=CHUNK, metadata_cache={})
    out = runner({"long": files}, AheadOf(), treename="Events")
    assert out["y"] == 2 * sum(i * (i % 3) for i in range(ENTRIES))
    # the second file's task: the branches are known from its first chunk on (the first file's chunks read them)
    assert out[(files[1], 0)] == [500], out  # chunk 250 shares chunk 0's baskets: chunk 500's are read at once
    # past chunk 750, which shares chunk 500's baskets, there is nothing to read (the last file's last task)
    assert out[(files[1], 500)] == [500], out
    # the first file's task ends with a read of the next task's first chunk (iterative's ``then``)
    assert out[(files[0], 500)] == [0, 500], out


def test_over_a_network_two_chunks_are_read_ahead_at_once(files, monkeypatch, no_leftover_processes):
    """A read over a network is mostly waiting: REMOTE_AHEAD chunks are read at once, not one after the other."""
    from pathlib import Path

    from xrootd_fixtures import export_dir, require_xrootd

    from casa_executors.standins.xrootd import XRootDOrigin

    require_xrootd()
    assert prefetch.REMOTE_AHEAD == 2
    names = {Path(f).name: Path(f) for f in files}
    with export_dir(names) as d, XRootDOrigin(d) as origin:
        urls = [origin.url(f"/store/{n}") for n in names]
        ex = casa_executors.iterative(status=False, chunks_per_task=4)  # a task a file
        runner = processor.Runner(executor=ex, schema=BaseSchema, chunksize=CHUNK, metadata_cache={})
        out = runner({"ahead": urls}, AheadOf(), treename="Events")
        local = processor.Runner(executor=processor.IterativeExecutor(), schema=BaseSchema, chunksize=CHUNK)
        assert out["y"] == local({"ahead": files}, AheadOf(), treename="Events")["y"]
    # the second file's task knows the branches from its first chunk on: chunks 250 and 500 are read from its start
    assert out[(urls[1], 0)] == [250, 500], out
    assert out[(urls[1], 250)] == [250, 500, 750], out
    assert not _reading_ahead()
