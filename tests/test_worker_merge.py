"""Outputs merged where they are computed: in a store the workers share (merge tasks on the engine),
in Dask's worker memory, or on an XRootD origin; the report, retries, failed_items() and partial
results as before; a Dask worker lost after merges loses no chunk and counts none twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import cloudpickle
import pytest
from analysis import Analysis, Failing, attempts, require_engine, run, same
from xrootd_fixtures import require_xrootd

import casa_executors as ce
from casa_executors.outputs import DriverPlacement, EnginePlacement, StorePlacement, choose
from casa_executors.standins.xrootd import XRootDOrigin

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module

# 12 chunks, fan-in 2: groups of 6, 3, 2 (one of a single child: not merged) and 1 -> 6 + 3 + 1 + 1 merges
MERGES_12_BY_2 = 11
# the same with the 6 nodes of level 1 merged by the tasks themselves (four chunks a task): 3 + 1 + 1
MERGES_12_BY_2_FOLDED = 5
WHERE = {"iterative": ("driver", "driver"), "dask": ("engine", "workers")}


def executor(name: str, **options):
    opts = {"status": False, **options}
    if name != "iterative":
        opts.setdefault("workers", 2)
    return ce.create(name, **opts)


@pytest.mark.parametrize("name", ce.BACKENDS)
def test_merged_on_workers_same_bits_and_the_report_as_before(name, sample_files, reference, tmp_path, monkeypatch,
                                                               no_leftover_processes):
    require_engine(name)
    backend = executor(name).backend
    backend.hold()
    try:
        # a chunk a task: every node of the tree is a merge; four a task (a file's chunks: two whole
        # nodes of level 1), the task merges them itself (task.Fold), the tree merges the rest
        for per_task, merge_tasks in ((1, MERGES_12_BY_2), (4, MERGES_12_BY_2_FOLDED)):
            ex = ce.Driver(backend=backend, status=False, merge_fanin=2, chunks_per_task=per_task)
            out = run(ex, sample_files)
            assert same(out, reference)
            s = ex.report.summary()
            m = s["merge"]
            outputs, merges = WHERE.get(name, ("store", "workers"))
            assert (m["outputs"], m["merges"]) == (outputs, merges), m
            assert s["attempts"] == s["chunks"] == s["computed"] == 12 and s["restored"] == 0
            assert s["events"] == 3000
            assert m["folded"] == (0 if per_task == 1 else 6), m
            if merges == "workers":  # the last merges (small outputs: all once every chunk is in) here
                assert m["merge_tasks"] + m["merged_here"] == merge_tasks, (per_task, m)
                assert m["merged_here"] >= 1, (per_task, m)  # how many depends on when chunks end (RunState._tail)
                assert m["bytes_to_driver"] > 0
                # merge="workers": every merge on the engine, the last ones too; the driver reads the root only
                ex = ce.Driver(backend=backend, status=False, merge_fanin=2, chunks_per_task=per_task,
                               merge="workers")
                assert same(run(ex, sample_files), reference)
                m = ex.report.summary()["merge"]
                assert m["merge_tasks"] == merge_tasks and m["merged_here"] == 0, (per_task, m)
                assert 0 < m["bytes_to_driver"] < m["output_bytes"] / 2
                if outputs == "engine":  # chunk outputs above tail_bytes in all: the last merges stay there too
                    monkeypatch.setattr(EnginePlacement, "tail_bytes", 0)
                    ex = ce.Driver(backend=backend, status=False, merge_fanin=2, chunks_per_task=per_task)
                    assert same(run(ex, sample_files), reference)
                    m = ex.report.summary()["merge"]
                    assert m["merge_tasks"] == merge_tasks and m["merged_here"] == 0, (per_task, m)
                    assert 0 < m["bytes_to_driver"] < m["output_bytes"] / 2  # the root only, not 12 outputs
                    monkeypatch.undo()
            else:
                assert m["merge_tasks"] == 0 and m["merged_here"] == merge_tasks, (per_task, m)
            if outputs == "store":
                assert not os.path.exists(m["store"]), "the run's temporary store was not removed"

        # failures: retries, failed_items(), partial output, as with merges in the driver; with four chunks
        # a task, a failed chunk leaves its node to the tree (its sibling returned alone)
        for per_task in (1, 4):
            log = str(tmp_path / f"attempts-{per_task}.log")
            ex = ce.Driver(backend=backend, status=False, merge_fanin=2, retries=1, recoverable=True,
                           chunks_per_task=per_task)
            with pytest.warns(UserWarning, match="3 of 12 processing items failed"):
                partial_out = run(ex, sample_files, Failing(log, bad_starts={250}))
            assert partial_out["events"].value == 2250
            assert sorted((os.path.basename(i.filename), i.entrystart) for i in ex.report.failed_items()) == [
                ("a.root", 250), ("b.root", 250), ("c.root", 250)]
            assert all(n == (2 if k.endswith(":250") else 1) for k, n in attempts(log).items())
            s = ex.report.summary()
            assert (s["computed"], s["failed"], s["attempts"]) == (9, 3, 15)
    finally:
        backend.release()


class Unaddable(Analysis):
    """Outputs that cannot be added together: a number for the first file's chunks, text for the others."""

    def process(self, events):
        return {"x": 1 if events.metadata["filename"].endswith("a.root") else "text"}


@pytest.mark.parametrize("name", ["iterative", "futures"])
@pytest.mark.parametrize("per_task", [1, 12])
def test_outputs_that_cannot_be_added_stop_the_run_as_a_merge_failure(name, per_task, sample_files):
    """Whether a merge task or the chunks' own task (task.Fold) adds them: MergeFailed, not retried."""
    from casa_executors.merge import MergeFailed

    ex = executor(name, merge_fanin=8, chunks_per_task=per_task, retries=2)
    with pytest.raises((MergeFailed, TypeError), match=r"unsupported operand|cannot add"):
        run(ex, sample_files, Unaddable())
    assert ex.report.summary()["attempts"] <= 12  # no chunk ran twice (not retried)


class KillOnce(Failing):
    """SIGKILLs the worker that runs chunk ``at`` (once: a marker file remembers)."""

    def __init__(self, log: str, marker: str, at: str) -> None:
        super().__init__(log, bad_starts=set(), sleep=0.05)
        self.marker, self.at = marker, at

    def process(self, events):
        key = f"{os.path.basename(events.metadata['filename'])}:{events.metadata['entrystart']}"
        if key == self.at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(events)


def test_dask_worker_lost_after_merges_loses_no_chunk_and_counts_none_twice(sample_files, tmp_path,
                                                                            no_leftover_processes):
    require_engine("dask")
    want = run(ce.iterative(status=False, merge_fanin=2), sample_files, chunksize=100)
    log = str(tmp_path / "attempts.log")
    # attempts = executions; every merge a task (merge="workers"), so outputs stay wanted on the workers to the end
    ex = ce.dask(workers=2, status=False, merge_fanin=2, retries=1, chunks_per_task=1, merge="workers")
    # 30 chunks; chunk 27 kills its worker, which holds outputs and merged partial outputs by then
    out = run(ex, sample_files, KillOnce(log, str(tmp_path / "marker"), "c.root:700"), chunksize=100)
    assert same(out, want)
    s = ex.report.summary()
    m = s["merge"]
    assert m["outputs"] == "engine" and m["merge_tasks"] + m["merged_here"] + m["folded"] >= 29
    assert s["events"] == 3000 and s["computed"] == 30 and s["failed"] == 0
    # the chunk that killed its worker (and any queued on that worker) ran twice; nothing else
    lost = {(os.path.basename(r.filename), r.entrystart): r.attempts for r in ex.report.rows() if r.attempts > 1}
    assert lost.get(("c.root", 700)) == 2 and set(lost.values()) == {2}
    assert s["attempts"] == 30 + len(lost)  # the lost outputs Dask recomputed from lineage are not attempts
    assert sum(attempts(log).values()) > s["attempts"], "no output was recomputed: the worker held none"


@pytest.fixture(scope="module")
def origin(sample_files):
    """A real XRootD origin serving the sample under /store and a writable /scratch."""
    require_xrootd()
    d = Path(tempfile.mkdtemp(prefix="casa-merge-origin-"))
    d.chmod(0o755)
    (d / "store").mkdir(mode=0o755)
    for f in sample_files:
        shutil.copy(f, d / "store" / f.name)
        (d / "store" / f.name).chmod(0o644)
    with XRootDOrigin(d, writable=("/scratch",)) as server:
        yield server
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("name", ["iterative", "futures"])
def test_store_and_checkpoint_on_the_xrootd_origin(name, origin, sample_files, reference, tmp_path,
                                                   no_leftover_processes):
    scratch = origin.export_dir / "scratch"
    urls = [origin.url(f"/store/{f.name}") for f in sample_files]
    want = {**reference, "files": {u: 1000 for u in urls}}
    cache: dict = {}
    backend = executor(name).backend
    backend.hold()
    try:
        # outputs through root://: merged on the workers, the run's folder removed after
        ex = ce.Driver(backend=backend, status=False, merge_fanin=2, store=origin.url(f"/scratch/{name}-store"))
        assert same(run(ex, urls, metadata_cache=cache), want)
        m = ex.report.summary()["merge"]
        assert m["outputs"] == "store" and m["store"].startswith("root://")
        assert list((scratch / f"{name}-store").iterdir()) == []

        # a checkpoint on root://: failed chunks run again, the others are restored
        log = str(tmp_path / "attempts.log")
        proc = Failing(log, bad_starts={250}, fail_times=1)
        ck = origin.url(f"/scratch/{name}-ck")
        ex = ce.Driver(backend=backend, status=False, retries=0, recoverable=True, checkpoint=ck)
        with pytest.warns(UserWarning, match="3 of 12"):
            run(ex, urls, proc, metadata_cache=cache)
        assert sorted(p.name for p in (scratch / f"{name}-ck" / "nodes" / "0").iterdir()) == sorted(
            str(i) for i in (0, 2, 3, 4, 6, 7, 8, 10, 11))
        ex = ce.Driver(backend=backend, status=False, retries=0, recoverable=True, checkpoint=ck)
        assert same(run(ex, urls, proc, metadata_cache=cache), want)
        s = ex.report.summary()
        assert (s["computed"], s["restored"]) == (3, 9) and s["checkpoint"]["url"] == ck
        assert sorted(str(p.relative_to(scratch)) for p in (scratch / f"{name}-ck").rglob("*") if p.is_file()) == [
            f"{name}-ck/manifest.json", f"{name}-ck/nodes/2/0"]
    finally:
        backend.release()


def test_where_outputs_go_per_engine_and_option():
    """The choice each backend gets (the backends are built, not started)."""
    def placement(ex, **kw):
        chosen = choose(ex.backend, kw.pop("phase", "processing"), 1, kw.pop("merge", "auto"),
                        kw.pop("store", None), None)
        chosen.close(False)  # removes the temporary folder a local engine's store gets
        return chosen

    assert type(placement(ce.iterative())) is DriverPlacement
    assert type(placement(ce.iterative(), phase="preprocessing")) is DriverPlacement
    local = placement(ce.futures(workers=2))
    assert isinstance(local, StorePlacement) and not os.path.exists(local.store.url)
    assert isinstance(placement(ce.dask(workers=1)), EnginePlacement)
    assert isinstance(placement(ce.spark(master="local[2]")), StorePlacement)
    assert isinstance(placement(ce.workqueue(workers=1)), StorePlacement)
    assert isinstance(placement(ce.parsl(workers=2)), StorePlacement)
    assert type(placement(ce.futures(workers=2), merge="driver")) is DriverPlacement
    # workers that may be elsewhere: merged here, with a warning naming the option; or a shared store
    remote = ce.spark(master="spark://127.0.0.1:7077")
    with pytest.warns(UserWarning, match=r"give store='root://host//path'"):
        assert type(placement(remote)) is DriverPlacement
    with pytest.raises(ce.ExecutorOptionError, match="cannot merge on the workers"):
        placement(remote, merge="workers")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(placement(remote, store="memory://casa-shared"), StorePlacement)  # any URL: no warning
    with pytest.warns(UserWarning, match="is a path on this machine"):
        placement(remote, store="/tmp/not-shared")
    with pytest.raises(ce.ExecutorOptionError, match="merge must be one of"):
        ce.iterative(merge="sideways")
    with pytest.raises(ce.ExecutorOptionError, match="store must be a folder or an fsspec URL"):
        ce.iterative(store=3)
    with pytest.raises(ce.ExecutorOptionError, match="store= or checkpoint=, not both"):
        ce.futures(store="/tmp/a", checkpoint="/tmp/b")
