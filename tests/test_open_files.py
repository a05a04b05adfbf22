"""A worker keeps a run's files open between chunks (casa_executors.source.OpenFiles).

coffea opens a chunk's file and reads its TTree's metadata for every chunk; the worker
keeps the source and the TTree, so the next chunk of the same file reads baskets at once.
These tests check that it does, that each chunk is still metered, that copies of a file
(same UUID) are never read through one another, and that a file rewritten between runs is
read anew.
"""

from __future__ import annotations

import shutil

import awkward as ak
import pytest
from analysis import Analysis, require_engine, run, same
from coffea import processor

import casa_executors
from casa_executors.source import open_files


class TreeIds(processor.ProcessorABC):
    """Which TTree objects the worker thread holds for which file, chunk after chunk."""

    def process(self, events):
        held = {(path, id(tree)) for (path, _), tree in open_files().objects.items()
                if type(tree).__name__.startswith("Model_TTree")}
        mine = {i for path, i in held if path == events.metadata["filename"]}
        return {"trees": processor.dict_accumulator({events.metadata["filename"]: processor.set_accumulator(mine)}),
                "n": processor.value_accumulator(int, len(ak.to_numpy(events.run)))}  # a branch read

    def postprocess(self, accumulator):
        return accumulator


@pytest.mark.parametrize("backend", ["iterative", "futures"])
def test_one_tree_per_file_and_every_chunk_metered(backend, sample_files, no_leftover_processes):
    require_engine(backend)
    ex = casa_executors.create(backend, status=False, **({} if backend == "iterative" else {"workers": 1}))
    out = run(ex, sample_files, TreeIds(), chunksize=100)  # 10 chunks per file
    assert out["n"].value == 3000
    # the copies share a UUID, yet each file has its own TTree, read once for its 10 chunks
    assert {f: len(ids) for f, ids in out["trees"].items()} == {str(f): 1 for f in sample_files}
    assert len(set().union(*out["trees"].values())) == 3
    rows = sorted(ex.report.rows(), key=lambda r: (r.filename, r.entrystart))
    assert len(rows) == 30 and all(r.status == "ok" for r in rows), rows
    # a file's first chunk reads the branch's one basket, metered to it; the next 9 have it (baskets.Baskets),
    # and the header, keys and TTree the metadata step read (source.SmallReads): they read nothing
    assert [r.bytes_read > 0 for r in rows] == [r.entrystart == 0 for r in rows], [r.bytes_read for r in rows]
    assert not open_files().sources, "the caller's thread keeps no file open after a run"


def test_file_rewritten_between_runs_is_read_anew(tmp_path, sample_files):
    """Sources are kept within a run only, TTrees by UUID: the same path, another file, in the next run."""
    from conftest import SAMPLE_PARQUET

    from casa_benchmarks.adl.sample import write_root

    path = tmp_path / "x.root"
    shutil.copy(sample_files[0], path)
    ex = casa_executors.futures(status=False, workers=1)
    with ex:  # the same worker process for all runs
        first = run(ex, [path, sample_files[1]], Counting(), chunksize=100)
        assert first["n"].value == 2000 and first["held"] == {str(path), str(sample_files[1])}
        part = tmp_path / "part.parquet"
        ak.to_parquet(ak.from_parquet(SAMPLE_PARQUET)[:400], part)
        write_root(str(part), str(path))  # another file (another UUID) at the same path
        second = run(ex, [path], Counting(), chunksize=100)
        # the first run's files were closed when the worker got the second run's first chunk
        assert second["n"].value == 400 and second["held"] == {str(path)}


class Counting(processor.ProcessorABC):
    """Events, and the files the worker thread holds open while it processes them."""

    def process(self, events):
        held = {url for url, _ in open_files().sources}
        return {"n": processor.value_accumulator(int, len(events)), "held": processor.set_accumulator(held)}

    def postprocess(self, accumulator):
        return accumulator


def test_a_runs_later_opens_of_a_file_make_no_small_reads(sample_files):
    """coffea opens a chunk's file for every chunk, and uproot reads the file's header and keys (and the
    TTree, unless an object is kept) every time: a single read of up to SMALL_READ bytes is kept by the
    thread for the rest of the run (over a network each is a round trip, often behind a basket read on
    the same connection). The next run, or a source that failed, reads them again."""
    import uproot

    from casa_executors.source import SMALL_READ, ChunkIO, metering

    def read(path):
        io = ChunkIO()
        with metering(io), uproot.open(path) as f:
            assert f["Events"].num_entries == 1000
        return io.bytes_read

    open_files("run-1")
    try:
        first = read(sample_files[0])
        assert 0 < first and all(len(v) <= SMALL_READ for v in open_files().small_reads._data.values())
        assert read(sample_files[0]) == 0 and read(sample_files[0]) == 0
        assert read(sample_files[1]) == first  # another file: its own reads
        open_files().small_reads.forget(str(sample_files[0]))
        assert read(sample_files[0]) == first
        open_files("run-2")  # a file may be replaced between runs
        assert read(sample_files[0]) == first
    finally:
        open_files().close()


def test_outputs_unchanged(sample_files, reference):
    """The same bits as before, chunk sizes that cross the file's baskets."""
    out = run(casa_executors.iterative(status=False), sample_files, Analysis(), chunksize=137)
    assert same(out, reference)


@pytest.mark.parametrize("backend", ["iterative", "futures"])
def test_trees_read_once_per_worker_across_calls(backend, sample_files, no_leftover_processes):
    """Runner preprocesses, then processes at once: the worker thread's chunks of a file whose metadata
    it read do not read its TTree again; nor do the chunks of a later call on the same worker (its files
    are opened anew, their TTrees kept). A worker that never read the tree reads it."""
    require_engine(backend)
    ex = casa_executors.create(backend, status=False, **({} if backend == "iterative" else {"workers": 1}))
    cache: dict = {}
    open_files().objects.clear()  # iterative's worker thread is this one: nothing kept from other tests
    with ex:  # the same worker process for both calls
        run(ex, sample_files, TreeIds(), chunksize=500, metadata_cache=cache)
        after_preprocessing = [r.bytes_read for r in ex.report.rows()]
        out = run(ex, sample_files, TreeIds(), chunksize=500, metadata_cache=cache)
        assert ex.report.preprocessing is None or not ex.report.preprocessing.rows  # all cached: none ran
        again = [r.bytes_read for r in ex.report.rows()]
    open_files().objects.clear()
    with ex:  # a fresh worker process (futures); iterative: this thread, its objects dropped
        run(ex, sample_files, TreeIds(), chunksize=500, metadata_cache=cache)
        cold = [r.bytes_read for r in ex.report.rows()]
    assert out["n"].value == 3000
    assert {f: len(ids) for f, ids in out["trees"].items()} == {str(f): 1 for f in sample_files}
    # each file's first chunk read its TTree (and the file's header) only where nothing had read it before
    first = slice(0, None, 2)  # 500 events a chunk: two a file
    assert all(a < b for a, b in zip(after_preprocessing[first], cold[first])), (after_preprocessing, cold)
    assert all(a < b for a, b in zip(again[first], cold[first])), (again, cold)
    assert after_preprocessing[1::2] == again[1::2] == cold[1::2]  # second chunks: the tree was kept in all
    assert not open_files().sources, "the caller's thread keeps no file open after a run"


def test_arrays_are_kept_for_the_running_chunk_only_unless_the_user_sets_a_cache():
    """uproot's 100 MB per-file array cache becomes one per running chunk in the options we give coffea
    (not in a user's): a chunk's second read of a branch is free, nothing outlives the chunk."""
    from casa_executors.source import ChunkArrays, ChunkIO, ThreadObjectCache, _with_object_cache, metering

    ours = _with_object_cache({"timeout": 30})
    assert isinstance(ours["array_cache"], ChunkArrays) and ours["timeout"] == 30
    cache = ours["array_cache"]
    cache["outside"] = 1
    assert "outside" not in cache, "kept outside a chunk"
    with metering(ChunkIO()):
        cache["inside"] = ak.Array([1, 2, 3])
        assert cache["inside"].tolist() == [1, 2, 3]
    assert "inside" not in cache and len(cache) == 0, "outlived its chunk"
    assert isinstance(ours["object_cache"], ThreadObjectCache)
    assert _with_object_cache({"array_cache": "5 MB"})["array_cache"] == "5 MB"
    assert _with_object_cache({"object_cache": {}}) is None  # a user's object cache: options left alone
