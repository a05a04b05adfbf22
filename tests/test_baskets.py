"""A basket two chunks share is read and decompressed once (casa_executors.baskets).

The files here are written in baskets of 300 entries and read in chunks of 250, so every chunk edge
but the file's end cuts a basket. With kept baskets each basket is read once per worker thread; with
none kept (a limit of 0 bytes: uproot's own reading) the cut ones are read twice. The output is the
same bits as coffea's own executor's either way.
"""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import uproot
from coffea import processor
from coffea.nanoevents import BaseSchema

import casa_executors
from casa_executors import baskets, internals

ENTRIES, BASKET, CHUNK = 1000, 300, 250


class Sums(processor.ProcessorABC):
    def process(self, events):
        start = events.metadata["entrystart"]
        return {"n": len(events), "x": float(ak.sum(events.x)), "y": int(ak.sum(events.y)),
                "rows": {start: ak.to_list(events.y[:5]) + ak.to_list(events.y[-5:])}}

    def postprocess(self, accumulator):
        return accumulator


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("baskets")
    out = []
    for k in range(2):
        path = d / f"cut{k}.root"
        with uproot.recreate(path) as f:
            f.mktree("Events", {"x": "float64", "y": "var * int32"})
            for start in range(0, ENTRIES, BASKET):  # one basket per branch per extend
                ids = np.arange(start, min(start + BASKET, ENTRIES))
                y = ak.unflatten(np.repeat(ids + k, ids % 4).astype(np.int32), ids % 4)
                f["Events"].extend({"x": ids * 0.5 + k, "y": y})
        out.append(str(path))
    return out


def _run(executor, files):
    runner = processor.Runner(executor=executor, schema=BaseSchema, chunksize=CHUNK, metadata_cache={})
    return runner({"cut": files}, Sums(), treename="Events")


def _cut_basket_bytes(files) -> int:
    """The compressed bytes of the baskets of x and y that a chunk edge cuts: [0, 300), [300, 600), [600, 900)."""
    total = 0
    for path in files:
        with uproot.open(path) as f:
            for name in ("x", "y"):
                branch = f["Events"][name]
                assert list(branch.entry_offsets) == [0, 300, 600, 900, 1000]
                total += sum(branch.basket_compressed_bytes(i) for i in range(3))
    return total


def test_each_basket_is_read_once_and_the_output_is_coffeas(files, monkeypatch, no_leftover_processes):
    reference = _run(processor.IterativeExecutor(), files)
    kept = {}
    for name, ex in (("iterative", casa_executors.iterative(status=False)),
                     ("futures", casa_executors.futures(workers=1, status=False))):  # one worker: every chunk
        out = _run(ex, files)
        assert out == reference and out["n"] == 2 * ENTRIES, name
        kept[name] = [r.bytes_read for r in sorted(ex.report.rows(), key=lambda r: (r.filename, r.entrystart))]
    switched_off = casa_executors.iterative(status=False, internals=False)  # uproot's own reading
    assert _run(switched_off, files) == reference
    monkeypatch.setattr(baskets, "BASKET_BYTES_PER_THREAD", 0)  # none kept (in this process)
    ex = casa_executors.iterative(status=False)
    assert _run(ex, files) == reference
    none_kept = sum(r.bytes_read for r in ex.report.rows())
    # off, no TTree object is kept, yet a chunk does not read its file's TTree again: those reads are small,
    # and the thread's source keeps them for the run (source.SmallReads), whatever the internals
    assert sum(r.bytes_read for r in switched_off.report.rows()) == none_kept
    # every chunk edge (250, 500, 750) cuts one basket of each branch read: read twice with none kept
    assert none_kept - sum(kept["iterative"]) == _cut_basket_bytes(files), (none_kept, kept)
    # a worker's chunks after a file's first read what this thread's did (the first also reads the TTree there)
    later = [i for i in range(len(kept["iterative"])) if i % 4]
    assert [kept["futures"][i] for i in later] == [kept["iterative"][i] for i in later], kept


def test_chunks_out_of_order_read_each_basket_once(files):
    """However a thread's chunks of a file come, a basket is kept until its entries are all had."""
    from casa_executors.source import ChunkIO, metering, open_files

    io = ChunkIO()
    ranges = [(750, 1000), (0, 250), (500, 750), (250, 500)]
    parts = {}
    for start, stop in ranges:  # a chunk each, as a worker thread runs them (internals.allowed: as run_batch)
        with internals.allowed(), metering(io), uproot.open(files[0]) as f:
            parts[start] = f["Events"]["y"].array(entry_start=start, entry_stop=stop)
    kept_after = len(open_files().baskets)
    with uproot.open(files[0]) as f:
        branch = f["Events"]["y"]
        whole = branch.array()
        once = sum(branch.basket_compressed_bytes(i) for i in range(branch.num_baskets))
    open_files().close()
    assert ak.to_list(ak.concatenate([parts[s] for s in sorted(parts)])) == ak.to_list(whole)
    assert kept_after == 0, "a basket all of whose entries were had is still kept"
    header = ChunkIO()
    with internals.allowed(), metering(header), uproot.open(files[0]) as f:
        f["Events"]["y"]  # the file's header and its TTree: what the first open above read before its baskets
    # the later opens of the run got them from the thread (source.SmallReads)
    assert io.bytes_read == once + header.bytes_read, (io.bytes_read, once, header.bytes_read)


def test_kept_baskets_are_let_go_by_entries_and_by_bytes():
    class Fake:
        byte_offsets = None

        def __init__(self, n: int) -> None:
            self.n = n

        def member(self, name: str) -> int:
            assert name == "fObjlen"
            return self.n

    store = baskets.Baskets(limit=100)
    store.keep(("a",), Fake(40), entries_left=10)
    assert store.take(("a",), 4) is not None
    store.chunk_ended()
    assert len(store) == 1
    assert store.take(("a",), 6) is not None
    assert store.take(("a",), 0) is not None, "let go before the chunk that had its last entries ended"
    store.chunk_ended()
    assert len(store) == 0 and store.nbytes == 0 and store.take(("a",), 1) is None
    store.keep(("b",), Fake(60), 5)
    store.keep(("c",), Fake(60), 5)  # over the limit: the oldest goes
    assert store.take(("b",), 1) is None and store.take(("c",), 1) is not None and store.nbytes == 60
    store.keep(("d",), Fake(101), 5)  # larger than the limit: never kept
    assert store.take(("d",), 1) is None
    store.clear()
    assert len(store) == 0 and store.nbytes == 0
