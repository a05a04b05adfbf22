"""Adaptive chunking (``target_task_s=``): tasks coalesced and split to a target duration, the output
bit-identical to the fixed-chunk run, one report row per range that ran, exact attempts, failed ranges
to rerun, checkpoints that resume.

Real files and engines: the 1000-event sample (three copies, chunks of 50 so that coalescing happens)
and generated files long enough to be split.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections import Counter
from pathlib import Path

import cloudpickle
import pytest
from analysis import Analysis, require_engine, run, same, same_hists
from coffea import processor
from coffea.nanoevents import NanoAODSchema
from coffea.processor.executor import WorkItem

import casa_executors as ce
from casa_executors.adaptive import Grains

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes do not import tests/

SMALL = 50  # entries per chunk on the 1000-event files: 20 items a file, far below a task's fixed cost
LONG = 8_000  # entries per chunk on the generated files: 8 grains of 1,000 each
BIG_TARGET = 60.0  # seconds: coalesce as far as the tree and the files allow
TINY_TARGET = 1e-5  # seconds: split every item down to its grains


class FailsOn(Analysis):
    """Logs every range it runs (``file:start-stop``) and fails on a range holding entry ``entry`` of
    file ``name`` the first ``times`` times such a range runs."""

    def __init__(self, log: str, name: str, entry: int, times: int = 10**9) -> None:
        self.log, self.name, self.entry, self.times = log, name, entry, times

    def process(self, events):
        md = events.metadata
        here = (os.path.basename(md["filename"]), md["entrystart"], md["entrystop"])
        with open(self.log, "a") as f:
            f.write("{}:{}-{}\n".format(*here))
        if here[0] == self.name and here[1] <= self.entry < here[2]:
            runs = sum(n for (f, a, b), n in ranges(self.log).items() if f == self.name and a <= self.entry < b)
            if runs <= self.times:
                raise ZeroDivisionError(f"planted failure at {self.name}:{self.entry}")
        return super().process(events)


def ranges(log: str) -> Counter:
    """How often each (file, start, stop) ran."""
    out: Counter = Counter()
    with open(log) as f:
        for line in f:
            name, span = line.strip().rsplit(":", 1)
            start, stop = span.split("-")
            out[(name, int(start), int(stop))] += 1
    return out


def check_rows(ex: ce.Driver, files: list, entries: int) -> list:
    """Rows are ranges of one file each that tile every file exactly once; the summary agrees."""
    rows = ex.report.rows()
    by_file: dict[str, list] = {}
    for r in rows:
        by_file.setdefault(r.filename, []).append(r)
        assert r.entrystart < r.entrystop and (r.status != "ok" or r.events == r.entrystop - r.entrystart)
    assert sorted(by_file) == sorted(map(str, files))
    for mine in by_file.values():
        edges = [(r.entrystart, r.entrystop) for r in mine]
        assert edges[0][0] == 0 and edges[-1][1] == entries
        assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))
    s = ex.report.summary()
    assert [r.index for r in rows] == list(range(len(rows))) and s["chunks"] == len(rows)
    assert s["processed"] + s["failed"] == len(rows) and s["attempts"] == sum(r.attempts for r in rows)
    return rows


# -- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.5, "2", True, math.nan, math.inf, [2.0]])
def test_bad_target_task_s_is_refused_when_the_executor_is_built(value):
    for build in (ce.iterative, lambda **o: ce.futures(workers=2, **o), lambda **o: ce.dask(workers=2, **o)):
        with pytest.raises(ce.ExecutorOptionError, match=r"target_task_s must be a positive number of seconds"):
            build(target_task_s=value)


def test_every_factory_takes_it_and_runner_copies_keep_it():
    for name in ce.BACKENDS:
        ex = ce.create(name, target_task_s=2)  # nothing starts before a call
        assert ex.target_task_s == 2 and ex.copy(desc="Processing").target_task_s == 2


def test_grains_align_items_with_the_tree_and_processed_names_the_users_items():
    wi = lambda f, a, b: WorkItem("d", f, "Events", a, b, b"u" + f.encode())  # noqa: E731
    items = [wi("x", 0, 8_000), wi("x", 8_000, 10_500), wi("x", 10_500, 11_000), wi("y", 0, 16_000)]
    g = Grains.split(items, 8)
    # 8 grains of 1,000 entries or more, else none: an item cut at an aligned place is one level-1 node
    assert [g.owner.count(j) for j in range(4)] == [8, 1, 1, 8]
    assert [(leaf.entrystart, leaf.entrystop) for leaf in g.leaves[:10]] == [
        (i * 1000, (i + 1) * 1000) for i in range(8)] + [(8_000, 10_500), (10_500, 11_000)]
    assert g.segment == [0] * 10 + [1] * 8  # x's entries run on; y starts another stretch
    done = [True] * 18
    assert g.processed(done) == set(items)
    done[11] = False  # one grain of y failed: its other ranges are what the output holds
    assert g.processed(done) == {*items[:3], wi("y", 0, 2_000), wi("y", 4_000, 16_000)}


# -- the ADL queries: identical output, fewer tasks ----------------------------------------------------


@pytest.fixture(scope="module")
def fixed_adl(sample_files) -> tuple[dict, dict]:
    """Every ADL query with fixed chunks of 50 (futures, 2 workers: bit-identical to iterative, tested
    elsewhere), and coffea's metadata cache."""
    from casa_benchmarks.adl.queries import QUERIES

    cache: dict = {}
    with ce.futures(workers=2, status=False) as ex:
        outs = {q: run(ex, sample_files, cls(), chunksize=SMALL, metadata_cache=cache) for q, cls in QUERIES.items()}
    return outs, cache


@pytest.mark.parametrize("name, queries, fanin", [
    ("iterative", "all", None), ("futures", (1, 6, 8), None), ("dask", (1, 8), None), ("iterative", (1, 8), 8)])
def test_adl_queries_identical_to_fixed_chunks_with_fewer_tasks(name, queries, fanin, sample_files, fixed_adl,
                                                                 no_leftover_processes):
    """Fixed chunks of 50 against target_task_s (merge tree: binary by default, and fan-in 8)."""
    from casa_benchmarks.adl.queries import QUERIES

    require_engine(name)
    want, cache = fixed_adl
    options = ({} if name == "iterative" else {"workers": 2}) | ({"merge_fanin": fanin} if fanin else {})
    with ce.create(name, status=False, target_task_s=BIG_TARGET, **options) as ex:
        assert ex.merge_fanin == (fanin or 2)
        for q in QUERIES if queries == "all" else queries:
            got = run(ex, sample_files, QUERIES[q](), chunksize=SMALL, metadata_cache=dict(cache))
            assert same_hists(got, want[q]), f"query {q} differs"
            rows = check_rows(ex, sample_files, 1000)
            assert len(rows) < 60, f"query {q}: no range was coalesced"  # 60 items of 50 entries
            assert any(r.entrystop - r.entrystart >= 8 * SMALL for r in rows)  # eight items or more in one task
            assert all(r.status == "ok" and r.attempts == 1 for r in rows)
            assert ex.report.summary()["events"] == 3000


@pytest.fixture(scope="module")
def long_files(tmp_path_factory) -> list[str]:
    from casa_benchmarks.adl.generate import generate

    return generate(tmp_path_factory.mktemp("long"), 32_000, files=2, seed=3, batch=16_000).files


def test_long_items_are_split_into_grains_with_the_same_output_and_processed_set(long_files):
    runner = lambda ex: processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=LONG)  # noqa: E731
    fileset = {"SingleMu": long_files}
    want = runner(ce.iterative(status=False)).run(fileset, Analysis(), treename="Events")
    ex = ce.iterative(status=False, target_task_s=TINY_TARGET)
    got = runner(ex).run(fileset, Analysis(), treename="Events")
    assert same(got["out"], want["out"])  # column accumulators too: the events keep their order
    items = want["processed"]
    assert len(items) == 4 and got["processed"] == items  # the user's items, not the grains
    rows = check_rows(ex, long_files, 16_000)
    # before anything was measured a task is an item; then every item runs grain by grain (2 a item: the
    # default tree is binary with target_task_s)
    assert [r.entrystop - r.entrystart for r in rows] == [LONG] + [LONG // 2] * 6


# -- failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["futures"])  # the narrowing itself: test_state.py (grains, attempts per leaf)
def test_a_failing_range_is_narrowed_down_attempted_exactly_and_listed(name, sample_files, fixed_adl, tmp_path,
                                                                       no_leftover_processes):
    """Entry 420 of b fails every time: the coalesced range holding it fails, its leaves run again
    alone, the chunk b:400-450 is attempted exactly retries + 1 times and is all that is missing, as in
    the fixed-chunk run."""
    require_engine(name)
    _, cache = fixed_adl
    log_fixed, log = str(tmp_path / "fixed.log"), str(tmp_path / "adaptive.log")
    options = {} if name == "iterative" else {"workers": 2}
    bad = WorkItem("SingleMu", str(sample_files[1]), "Events", 400, 450, b"")
    with pytest.warns(UserWarning, match="1 of 60 processing items failed"):
        want = run(ce.iterative(status=False, retries=2, recoverable=True), sample_files,
                   FailsOn(log_fixed, "b.root", 420), chunksize=SMALL, metadata_cache=dict(cache))
    ex = ce.create(name, status=False, retries=2, recoverable=True, target_task_s=BIG_TARGET, **options)
    with pytest.warns(UserWarning, match=r"1 of \d+ processing items failed"):
        got = run(ex, sample_files, FailsOn(log, "b.root", 420), chunksize=SMALL, metadata_cache=dict(cache))
    assert same(got, want)  # the partial output: everything but b:400-450
    failed = ex.report.failed_items()
    assert len(failed) == 1 and (failed[0].filename, failed[0].entrystart, failed[0].entrystop) == (
        bad.filename, bad.entrystart, bad.entrystop)
    [row] = ex.report.failures()
    assert (row.entrystart, row.entrystop, row.attempts) == (400, 450, 3) and row.error_type == "Exception"
    runs = ranges(log)
    holding = {k: n for k, n in runs.items() if k[0] == "b.root" and k[1] <= 420 < k[2]}
    assert sum(holding.values()) == 3  # retries + 1, whichever ranges held it
    rows = check_rows(ex, sample_files, 1000)
    for r in rows:  # a row's attempts are the runs of ranges that held it
        held = sum(n for (f, a, b), n in runs.items()
                   if f == os.path.basename(r.filename) and a <= r.entrystart and r.entrystop <= b)
        assert r.attempts == held, r


def test_no_retries_fail_the_whole_range_that_ran(sample_files, fixed_adl, tmp_path):
    _, cache = fixed_adl
    ex = ce.iterative(status=False, retries=0, recoverable=True, target_task_s=BIG_TARGET)
    with pytest.warns(UserWarning, match=r"1 of \d+ processing items failed"):
        out = run(ex, sample_files, FailsOn(str(tmp_path / "log"), "b.root", 420), chunksize=SMALL,
                  metadata_cache=dict(cache))
    [item] = ex.report.failed_items()
    assert (Path(item.filename).name, item.entrystart, item.entrystop) == ("b.root", 200, 600)
    assert out["events"].value == 3000 - 400
    assert ex.report.summary()["attempts"] == len(ex.report.rows()) < 60  # one a range


# -- checkpoints --------------------------------------------------------------------------------------


def test_checkpoint_resume_restores_coalesced_nodes_and_counts_nothing_twice(sample_files, fixed_adl, tmp_path):
    """A first call leaves a coalesced range of c failed (once); the same call resumes: the stored nodes,
    ones written by coalesced tasks included, are restored, only the failed range runs again, the output
    is the fixed run's."""
    _, cache = fixed_adl
    ck, log = tmp_path / "ck", str(tmp_path / "log")
    proc = FailsOn(log, "c.root", 100, times=1)
    reference = run(ce.iterative(status=False), sample_files, Analysis(), chunksize=SMALL,
                    metadata_cache=dict(cache))

    def call():
        ex = ce.iterative(status=False, retries=0, recoverable=True, target_task_s=BIG_TARGET, checkpoint=str(ck))
        return ex, run(ex, sample_files, proc, chunksize=SMALL, metadata_cache=dict(cache))

    with pytest.warns(UserWarning, match=r"1 of \d+ processing items failed"):
        ex, partial_out = call()
    [bad] = ex.report.failed_items()
    lost = bad.entrystop - bad.entrystart
    assert Path(bad.filename).name == "c.root" and bad.entrystart <= 100 < bad.entrystop and lost > SMALL
    assert partial_out["events"].value == 3000 - lost
    first = ranges(log)

    ex, out = call()
    assert same(out, reference)
    again = sorted(ranges(log) - first)  # each run once, tiling the failed range: nothing else again
    assert [(f, a) for f, a, _ in again] == [("c.root", bad.entrystart)] + [("c.root", b) for _, _, b in again[:-1]]
    assert again[-1][2] == bad.entrystop and all(n == 1 for n in (ranges(log) - first).values())
    rows = check_rows(ex, sample_files, 1000)
    restored = {(Path(r.filename).name, r.entrystart, r.entrystop) for r in rows if r.status == "restored"}
    coalesced = {k for k in first if k[2] - k[1] > SMALL}  # tasks of the first call that covered several chunks
    assert restored & coalesced, (restored, coalesced)  # their nodes, as the tasks wrote them, are restored
    s = ex.report.summary()
    assert s["events"] == 3000 and s["computed"] == len(again) and s["failed"] == 0
    assert s["restored"] == s["checkpoint"]["restored"] == len(restored)
    assert sum(r.events for r in rows if r.status == "restored") == 3000 - lost
