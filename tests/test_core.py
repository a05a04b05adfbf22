"""The shared driver on the two local backends, through coffea's Runner, on real files."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import hist
import numpy as np
import pytest
import uproot
from analysis import Failing, attempts, run, same
from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors as ce
from casa_executors.merge import TreeMerger

LOCAL = {
    "iterative": lambda **kw: ce.iterative(status=False, **kw),
    "futures": lambda **kw: ce.futures(workers=2, status=False, **kw),
}




@pytest.fixture(scope="module")
def reference(sample_files):
    return run(processor.IterativeExecutor(status=False), sample_files)


@pytest.fixture(scope="module")
def bad_files(sample_root, tmp_path_factory):
    """A corrupt file (junk inside every basket) and a missing one."""
    d = tmp_path_factory.mktemp("bad")
    corrupt = d / "corrupt.root"
    data = bytearray(sample_root.read_bytes())
    tree = uproot.open(sample_root)["Events"]
    for branch in tree.branches:
        for i in range(branch.num_baskets):
            seek = int(branch.member("fBasketSeek")[i])
            data[seek + 120 : seek + 160] = b"\xde\xad\xbe\xef" * 10
    corrupt.write_bytes(bytes(data))
    return corrupt, d / "missing.root"


@pytest.mark.parametrize("name", LOCAL)
def test_identical_to_coffea_iterative(name, sample_files, reference):
    ex = LOCAL[name]()
    out = run(ex, sample_files)
    assert same(out, reference)
    # column accumulators keep chunk order, like coffea's own executor
    assert np.array_equal(out["met_column"].value, reference["met_column"].value)


@pytest.mark.parametrize("name", LOCAL)
def test_report_reachable_after_runner_copies(name, sample_files):
    ex = LOCAL[name]()
    run(ex, sample_files)
    s = ex.report.summary()
    assert s["chunks"] == 12 and s["processed"] == 12 and s["failed"] == 0
    assert s["events"] == 3000 and s["attempts"] == 12 and s["bytes_read"] > 0
    rows = ex.report.rows()
    assert sorted((r.filename, r.entrystart) for r in rows) == sorted(
        (str(f), s) for f in sample_files for s in (0, 250, 500, 750)
    )
    for r in rows:
        assert r.status == "ok" and r.attempts == 1 and r.events == 250
        assert r.worker and r.host and r.wall_s > 0 and r.bytes_read > 0
    if name == "futures":
        assert len({r.worker for r in rows}) >= 1 and all(str(os.getpid()) not in r.worker for r in rows)
    assert ex.report.preprocessing is not None and len(ex.report.preprocessing.rows) == 3


@pytest.mark.parametrize("name", LOCAL)
@pytest.mark.parametrize("retries", [0, 2])
def test_failing_chunk_attempted_exactly_retries_plus_one(name, retries, sample_files, tmp_path):
    log = str(tmp_path / "attempts.log")
    ex = LOCAL[name](retries=retries)
    with pytest.raises(ce.ChunkError) as err:
        run(ex, sample_files[:1], Failing(log, bad_starts={500}))
    counts = attempts(log)
    assert counts["a.root:500"] == retries + 1
    assert "a.root" in str(err.value) and "ZeroDivisionError: planted failure" in str(err.value)
    assert isinstance(err.value.__cause__, Exception)
    row = next(r for r in ex.report.rows() if r.entrystart == 500)
    assert row.attempts == retries + 1 and row.error_type == "Exception"  # coffea wraps it
    # every chunk is either in the output or in the failures, exactly once
    s = ex.report.summary()
    assert s["processed"] + s["failed"] == s["chunks"] == 4


@pytest.mark.parametrize("name", LOCAL)
def test_flaky_chunks_are_retried_and_output_identical(name, sample_files, reference, tmp_path):
    log = str(tmp_path / "attempts.log")
    ex = LOCAL[name](retries=1)
    out = run(ex, sample_files, Failing(log, fail_times=1))
    assert same(out, reference)
    assert all(n == 2 for n in attempts(log).values()) and len(attempts(log)) == 12
    s = ex.report.summary()
    assert s["attempts"] == 24 and s["retries"] == 12 and s["processed"] == 12


@pytest.mark.parametrize("name", LOCAL)
def test_recoverable_partial_output_and_failed_items_rerun(name, sample_files, reference, tmp_path):
    log = str(tmp_path / "attempts.log")
    ex = LOCAL[name](retries=0, recoverable=True)
    with pytest.warns(UserWarning, match="3 of 12 processing items failed"):
        partial_out = run(ex, sample_files, Failing(log, bad_starts={250}, fail_times=1))
    # a random set of good chunks would not do: it must be exactly the 10 others
    rows = ex.report.rows()
    assert sorted(r.index for r in rows) == list(range(12))
    failed = ex.report.failed_items()
    assert sorted((os.path.basename(i.filename), i.entrystart) for i in failed) == [
        ("a.root", 250), ("b.root", 250), ("c.root", 250)]
    assert partial_out["events"].value == 3000 - 250 * len(failed)
    # rerun only what failed (the planted failure fires once per chunk), then merge
    rest = processor.Runner(executor=ex, schema=NanoAODSchema)(failed, Failing(log, bad_starts={250}, fail_times=1))
    assert ex.report.summary()["processed"] == len(failed)
    merged = processor.accumulate([partial_out, rest])
    assert merged["events"].value == 3000
    assert np.array_equal(merged["met"].values(flow=True), reference["met"].values(flow=True))


@pytest.mark.parametrize("name", LOCAL)
def test_corrupt_and_missing_files_give_partial_output_with_skipbadfiles(name, sample_files, bad_files, tmp_path):
    corrupt, missing = bad_files
    good = run(ce.iterative(status=False), sample_files[:1])
    for kw, runner_kw in (
        ({"recoverable": True}, {"skipbadfiles": True}),
        ({}, {"skipbadfiles": (OSError, ValueError)}),
    ):
        ex = LOCAL[name](retries=1, **kw)
        with pytest.warns(UserWarning):
            out = run(ex, [sample_files[0], corrupt, missing], **runner_kw)
        assert same(out, good)
        failures = ex.report.failures()
        names = {os.path.basename(r.filename): r for r in failures}
        assert set(names) == {"corrupt.root", "missing.root"}
        assert names["missing.root"].error_type == "FileNotFoundError"
        assert "checksum" in names["corrupt.root"].error
        assert ex.report.failed_files() == {"SingleMu": [str(missing)]}
        s = ex.report.summary()
        assert s["processed"] == 4 and s["failed"] == 4 and s["files_failed"] == 1


@pytest.mark.parametrize("name", LOCAL)
def test_bad_files_without_skip_raise_error_naming_file_and_cause(name, sample_files, bad_files):
    corrupt, missing = bad_files
    with pytest.raises(ce.ChunkError, match=r"preprocessing of .*missing\.root.*FileNotFoundError"):
        run(LOCAL[name](retries=0), [sample_files[0], missing])
    ex = LOCAL[name](retries=0)
    pattern = r"processing of .*corrupt\.root entries \d+-\d+ .*ValueError: .*checksum"
    with pytest.raises(ce.ChunkError, match=pattern) as err:
        run(ex, [corrupt])
    assert err.value.partial_output is None or isinstance(err.value.partial_output, dict)
    s = ex.report.summary()
    assert s["processed"] + s["failed"] == s["chunks"] and s["failed"] >= 1


def test_bad_options_fail_at_construction():
    with pytest.raises(ce.ExecutorOptionError, match="workers must be a whole number >= 1, got 0"):
        ce.futures(workers=0)
    with pytest.raises(ce.ExecutorOptionError, match="retries must be a whole number >= 0, got -1"):
        ce.iterative(retries=-1)
    with pytest.raises(ce.ExecutorOptionError, match="unknown option 'wrokers' \\(did you mean 'workers'\\?\\)"):
        ce.futures(wrokers=2)
    with pytest.raises(ce.ExecutorOptionError, match="workers must be 1, got 2"):
        ce.iterative(workers=2)
    with pytest.raises(ce.ExecutorOptionError, match="unknown option 'master'"):
        ce.iterative(master="local[2]")
    with pytest.raises(ce.ExecutorOptionError, match="unknown backend 'condor'"):
        ce.create("condor")
    with pytest.raises(ce.ExecutorOptionError, match="merge_fanin"):
        ce.iterative(merge_fanin=1)
    with pytest.raises(ce.ExecutorOptionError, match="token= is only used with cache="):
        ce.iterative(token="abc")


def test_executor_survives_runner_copy_and_is_a_coffea_executor():
    from coffea.processor.executor import ExecutorBase

    ex = ce.futures(workers=2, retries=1, status=False)
    assert isinstance(ex, ExecutorBase)
    copy = ex.copy(desc="Preprocessing", unit="file", compression=None)
    assert copy.report is ex.report and copy.backend is ex.backend and copy.retries == 1


@pytest.mark.parametrize("name", LOCAL)
def test_status_false_is_silent_and_status_true_shows_rate(name, sample_files, capfd):
    run(LOCAL[name](), sample_files[:1])
    captured = capfd.readouterr()
    assert "Processing" not in captured.err + captured.out and "ev/s" not in captured.err + captured.out
    ex = ce.iterative(status=True)
    run(ex, sample_files[:1])
    err = capfd.readouterr().err
    assert "Processing" in err and "ev/s" in err and "4/4" in err


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


def test_futures_worker_killed_mid_run(sample_files, reference, tmp_path, no_leftover_processes):
    log = str(tmp_path / "attempts.log")
    ex = ce.futures(workers=2, status=False, retries=2)
    killed = []

    def kill_one():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            if os.path.exists(log) and sum(1 for _ in open(log)) >= 3 and ex.backend.pids():
                pid = ex.backend.pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=kill_one)
    t.start()
    out = run(ex, sample_files, Failing(log, bad_starts=set(), sleep=0.3))
    t.join()
    assert killed, "no worker was killed"
    assert same(out, reference)
    s = ex.report.summary()
    assert s["processed"] == 12 and s["failed"] == 0 and s["attempts"] > 12
    assert sorted(r.index for r in ex.report.rows() if r.status == "ok") == list(range(12))
    assert any(r.attempts > 1 for r in ex.report.rows())


def test_held_executor_keeps_workers_between_runs(sample_files, no_leftover_processes):
    ex = ce.futures(workers=2, status=False)
    with ex:
        run(ex, sample_files[:1])
        pids = set(ex.backend.pids())
        run(ex, sample_files[:1])
        assert pids and set(ex.backend.pids()) == pids
    assert ex.backend.pids() == []

