"""Checkpoint and resume on the six backends: SIGKILL of the submitting process, failed chunks run
again, corrupt and truncated checkpoint files, another run refused, coffea's own checkpointer.

Real engines, real files; the killed process and everything it started are stopped by PID.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from analysis import Failing, attempts, require_engine, run, same
from checkpoint_job import CHUNKSIZE, FANIN, MARKER, call, executor
from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors as ce
from casa_executors import procs, signing
from casa_executors.merge import MergeTree

HERE = Path(__file__).resolve().parent
N_CHUNKS = 30


@pytest.fixture(autouse=True)
def own_key_dir(tmp_path_factory, monkeypatch) -> Path:
    """Checkpoint keys in a cache folder of the test's (the user's own cache stays as it was); the jobs
    these tests start inherit it, so a resume in this process finds the key a killed job made."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "casa_executors" / "keys"


@pytest.fixture(scope="module")
def reference100(sample_files, metadata):
    return run(ce.iterative(status=False), sample_files, chunksize=CHUNKSIZE, metadata_cache=dict(metadata))


@pytest.fixture(scope="module")
def metadata(sample_files) -> dict:
    """coffea's metadata cache for the sample files: runs below skip preprocessing."""
    cache: dict = {}
    run(ce.iterative(status=False), sample_files, chunksize=CHUNKSIZE, metadata_cache=cache)
    return cache


@pytest.fixture(scope="module")
def distinct_files(tmp_path_factory) -> list[Path]:
    """Three files of the real sample, each written anew: three file UUIDs (coffea's checkpointer keys on them)."""
    from conftest import SAMPLE_PARQUET

    from casa_benchmarks.adl.sample import write_root

    d = tmp_path_factory.mktemp("distinct")
    return [Path(write_root(str(SAMPLE_PARQUET), str(d / f"{n}.root"))) for n in "abc"]


def stored(ck: Path) -> list[str]:
    return sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file())


def top_down(tree: MergeTree, keys: set[str]) -> list[tuple[int, int]]:
    """The nodes a resume restores: the highest stored node over each chunk."""
    out, stack = [], [(tree.top, 0)]
    while stack:
        level, index = stack.pop()
        if f"nodes/{level}/{index}" in keys:
            out.append((level, index))
        elif level > 0:
            stack += [(level - 1, c) for c in tree.children(level, index)]
    return out


def merges_needed(tree: MergeTree, restored: list[tuple[int, int]]) -> int:
    """Groups of two or more children not already inside a restored node."""
    covered = {(lv, j) for lv, j in restored}

    def inside(level: int, index: int) -> bool:
        return any(lv >= level and set(tree.span(level, index)) <= set(tree.span(lv, j)) for lv, j in covered)

    return sum(1 for level in range(1, tree.top + 1) for j in range(tree.sizes[level])
               if len(tree.children(level, j)) >= 2 and not inside(level, j))


def merged_enough(keys: list[str]) -> bool:
    """Three merged nodes of the first level, or one of the second."""
    return sum(k.startswith("nodes/1/") for k in keys) >= 3 or any(k.startswith("nodes/2/") for k in keys)


def kill_job(proc: subprocess.Popen, token: str, below: list) -> None:
    """SIGKILL the job, then every process it started (found by our marker, or seen below it)."""
    procs.kill([proc])
    left = {p.pid: p for p in [*below, *procs.with_environ(MARKER, token)]}
    procs.kill(list(left.values()))


# the resume itself is the driver's (tests/test_state.py), and every engine writes checkpoints and merged
# nodes (test_failed_chunks_and_corrupt_files_are_computed_again, test_worker_merge): a real SIGKILL of the
# submitting process runs with no engine, with worker processes of its own (futures) and with a scheduler
# and workers in processes apart (dask)
SIGKILLED_ENGINES = ["iterative", "futures", "dask"]


@pytest.mark.parametrize("name", SIGKILLED_ENGINES)
def test_sigkill_of_the_submitting_process_then_the_same_call_resumes(
        name, sample_files, metadata, reference100, tmp_path, no_leftover_processes):
    require_engine(name)
    ck, log = tmp_path / "ck", str(tmp_path / "attempts.log")
    files = [str(f) for f in sample_files]
    (tmp_path / "metadata.pkl").write_bytes(pickle.dumps(metadata))
    token = uuid.uuid4().hex
    env = {**os.environ, MARKER: token, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    job = subprocess.Popen([sys.executable, str(HERE / "checkpoint_job.py"), name, str(ck), log,
                            str(tmp_path / "metadata.pkl"), *files],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    below: list = []
    try:
        # a bound on a wait, not a timing the test relies on: a Spark job on the loaded 2-core machine once took
        # more than 180 s to write its first merged nodes (the same test alone then passed in 176 s)
        deadline = time.time() + 600
        # kill once some merged nodes exist, with chunks still to go
        while not merged_enough(stored(ck) if ck.exists() else []):
            assert job.poll() is None, f"the job ended before it was killed: {job.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "the job made no merged node in time"
            below = procs.descendants(job.pid) or below
            time.sleep(0.05)
        below = procs.descendants(job.pid) or below
    finally:
        kill_job(job, token, below)
        job.stderr.close()
    before = stored(ck)
    assert "manifest.json" in before
    executed_before = attempts(log)
    assert 0 < len(executed_before) < N_CHUNKS, "killed too late (or too early) to test a resume"

    tree = MergeTree(N_CHUNKS, FANIN)
    restored_nodes = top_down(tree, set(before))
    ex, out = call(name, str(ck), log, files, dict(metadata))
    assert same(out, reference100)
    s = ex.report.summary()
    restored = [r for r in ex.report.rows() if r.status == "restored"]
    computed = [r for r in ex.report.rows() if r.status == "ok"]
    assert s["restored"] == len(restored) == sum(len(tree.span(*n)) for n in restored_nodes) > 0
    assert s["computed"] == len(computed) == N_CHUNKS - s["restored"] > 0
    assert s["events"] == 3000 and s["failed"] == 0 and s["checkpoint"]["corrupt"] == []
    # finished work was not run again; unfinished work ran in this call (a chunk running at the kill twice)
    executed = attempts(log)
    key = lambda r: f"{os.path.basename(r.filename)}:{r.entrystart}"  # noqa: E731
    assert all(executed[key(r)] == 1 for r in restored)
    assert all(executed[key(r)] - executed_before.get(key(r), 0) == r.attempts == 1 for r in computed)
    # no more merges than those the kill lost
    m = s["merge"]
    assert m["merge_tasks"] + m["merged_here"] + m["folded"] == merges_needed(tree, restored_nodes)
    # the kill's debris is gone; the root and the manifest stay
    assert stored(ck) == ["manifest.json", f"nodes/{tree.top}/0"]
    assert json.loads((ck / "manifest.json").read_bytes()[48:])["complete"] is True


def start_dask(port: int) -> list[subprocess.Popen]:
    """A scheduler and two workers, as a facility runs them (processes of their own)."""
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
           "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    dask = str(Path(sys.executable).with_name("dask"))
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", "127.0.0.1:0"], **quiet)
    workers = [subprocess.Popen([dask, "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-nanny",
                                 "--host", "127.0.0.1"], **quiet) for _ in range(2)]
    return [scheduler, *workers]


def test_whole_engine_killed_then_the_same_call_resumes(sample_files, metadata, reference100, tmp_path,
                                                        no_leftover_processes):
    """The Dask scheduler and all its workers die mid-run (a facility outage): the call fails;
    the same call on a new cluster computes only what was not finished."""
    require_engine("dask")
    from distributed import Client

    from casa_executors.standins.ports import free_port

    ck, log = tmp_path / "ck", str(tmp_path / "attempts.log")
    files = [str(f) for f in sample_files]
    port = free_port()
    engine = start_dask(port)
    try:
        client = Client(f"tcp://127.0.0.1:{port}", timeout=10, set_as_default=False)
        try:
            client.wait_for_workers(2, timeout=60)

            def outage() -> None:
                while not merged_enough(stored(ck) if ck.exists() else []):
                    time.sleep(0.05)
                procs.kill(engine)

            killer = threading.Thread(target=outage, daemon=True)
            killer.start()
            with pytest.raises(Exception) as err:  # the engine's own error for the chunk that could not run
                call("dask", str(ck), log, files, dict(metadata), client=client)
            assert err.value.phase == "processing" and err.value.attempts >= 1  # a chunk failed for good
            assert "casa_executors: processing of" in "\n".join(err.value.__notes__)
            killer.join(timeout=60)
        finally:
            client.close(timeout=5)
        executed_before = attempts(log)
        assert 0 < len(executed_before) < N_CHUNKS
        engine = start_dask(port)
        with Client(f"tcp://127.0.0.1:{port}", timeout=10, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            ex, out = call("dask", str(ck), log, files, dict(metadata), client=client)
    finally:
        procs.terminate(engine)
    assert same(out, reference100)
    s = ex.report.summary()
    assert s["restored"] > 0 and s["computed"] == N_CHUNKS - s["restored"] and s["failed"] == 0
    restored = [r for r in ex.report.rows() if r.status == "restored"]
    assert all(attempts(log)[f"{os.path.basename(r.filename)}:{r.entrystart}"] == 1 for r in restored)


@pytest.mark.parametrize("name", ce.BACKENDS)
def test_failed_chunks_and_corrupt_files_are_computed_again(name, sample_files, metadata, reference, tmp_path,
                                                            no_leftover_processes):
    require_engine(name)
    ck, log = tmp_path / "ck", str(tmp_path / "attempts.log")
    proc = Failing(log, bad_starts={250}, fail_times=1)  # chunks 1, 5, 9 fail the first time only
    backend = executor(name).backend
    with backend_held(backend):
        ex = ce.Driver(backend=backend, status=False, retries=0, recoverable=True, merge_fanin=2,
                       checkpoint=str(ck))
        with pytest.warns(UserWarning, match="3 of 12 processing items failed"):
            partial_out = run(ex, sample_files, proc, metadata_cache=dict(metadata))
        assert partial_out["events"].value == 2250
        # complete nodes only: a node with a failed chunk below is not a checkpoint
        assert stored(ck) == ["manifest.json", "nodes/0/0", "nodes/0/4", "nodes/0/8",
                              "nodes/1/1", "nodes/1/3", "nodes/1/5"]
        node = ck / "nodes/1/1"  # chunks 2 and 3: one byte flipped
        data = bytearray(node.read_bytes())
        data[-10] ^= 0xFF
        node.write_bytes(bytes(data))
        leaf = ck / "nodes/0/8"  # chunk 8: cut short
        leaf.write_bytes(leaf.read_bytes()[:-7])

        ex = ce.Driver(backend=backend, status=False, retries=0, recoverable=True, merge_fanin=2,
                       checkpoint=str(ck))
        out = run(ex, sample_files, proc, metadata_cache=dict(metadata))
    assert same(out, reference)
    s = ex.report.summary()
    assert sorted(s["checkpoint"]["corrupt"]) == ["nodes/0/8", "nodes/1/1"]
    status = {r.index: r.status for r in ex.report.rows()}
    assert sorted(i for i, st in status.items() if st == "ok") == [1, 2, 3, 5, 8, 9]
    assert sorted(i for i, st in status.items() if st == "restored") == [0, 4, 6, 7, 10, 11]
    assert s["computed"] == 6 and s["restored"] == 6 and s["failed"] == 0
    counts = attempts(log)
    assert [counts[f"{f}.root:250"] for f in "abc"] == [2, 2, 2]  # failed once, then run again here
    assert counts["a.root:500"] == counts["a.root:750"] == counts["c.root:0"] == 2  # corrupt: run again
    assert counts["a.root:0"] == counts["b.root:0"] == 1  # restored
    assert stored(ck) == ["manifest.json", "nodes/4/0"]


# what reads a stored file (merge_stored, StorePlacement.fetch) and how the key reaches the workers (inside
# the pickled Store) are the same on every engine, and the six-engine tests above already resume from keys
# that travelled to the workers; Spark and Parsl passed this one here (70 s and 28 s on the loaded 2-core
# machine), so the suite runs it on the others
PLANTED_ENGINES = ("iterative", "futures", "dask", "workqueue")


class Creates:
    """A pickle that creates ``path`` when it is loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def forged(marker: Path, bare: bool = False) -> bytes:
    """A checkpoint file as someone who can write there but has no key may make it: a pickle that creates
    ``marker`` when loaded, bare or behind our header with a made-up tag."""
    from casa_executors.store import HEADER, MAGIC

    blob = pickle.dumps(Creates(str(marker)))
    return blob if bare else HEADER.pack(MAGIC, len(blob), os.urandom(32)) + blob


@pytest.mark.parametrize("name", PLANTED_ENGINES)
def test_pickles_planted_in_a_checkpoint_are_refused_and_recomputed(name, sample_files, metadata, reference,
                                                                    tmp_path, no_leftover_processes):
    """Nodes restored on a resume are read by merge tasks on the engine, the root by the driver: a planted
    pickle is refused unread in both, taken for a corrupt node (deleted, its chunks computed again)."""
    require_engine(name)
    ck, log, marker = tmp_path / "ck", str(tmp_path / "attempts.log"), tmp_path / "created-by-a-pickle"
    proc = Failing(log, bad_starts={250}, fail_times=1)  # chunks 1, 5, 9 fail the first time only
    backend = executor(name).backend

    def call():
        ex = ce.Driver(backend=backend, status=False, retries=0, recoverable=True, merge_fanin=2,
                       checkpoint=str(ck))
        return ex, run(ex, sample_files, proc, metadata_cache=dict(metadata))

    with backend_held(backend):
        with pytest.warns(UserWarning, match="3 of 12 processing items failed"):
            call()
        assert stored(ck) == ["manifest.json", "nodes/0/0", "nodes/0/4", "nodes/0/8",
                              "nodes/1/1", "nodes/1/3", "nodes/1/5"]
        (ck / "nodes/1/1").write_bytes(forged(marker))  # chunks 2 and 3
        (ck / "nodes/0/8").write_bytes(forged(marker, bare=True))  # chunk 8
        (ck / "nodes/1/3").write_bytes((ck / "nodes/1/5").read_bytes())  # genuine, but chunks 10-11's
        ex, out = call()
        assert not marker.exists(), "a planted pickle was unpickled"
        assert same(out, reference)
        s = ex.report.summary()
        assert sorted(s["checkpoint"]["corrupt"]) == ["nodes/0/8", "nodes/1/1", "nodes/1/3"]
        status = {r.index: r.status for r in ex.report.rows()}
        assert sorted(i for i, st in status.items() if st == "ok") == [1, 2, 3, 5, 6, 7, 8, 9]
        assert sorted(i for i, st in status.items() if st == "restored") == [0, 4, 10, 11]
        counts = attempts(log)
        assert [counts[k] for k in ("a.root:500", "a.root:750", "b.root:500", "b.root:750", "c.root:0")] == [2] * 5
        assert counts["a.root:0"] == counts["c.root:500"] == 1  # restored
        # a finished run: its root, read by the driver itself, replaced
        assert stored(ck) == ["manifest.json", "nodes/4/0"]
        (ck / "nodes/4/0").write_bytes(forged(marker))
        ex, out = call()
        assert not marker.exists(), "a planted pickle was unpickled"
        assert same(out, reference)
        s = ex.report.summary()
        assert s["checkpoint"]["corrupt"] == ["nodes/4/0"] and s["computed"] == 12 and s["restored"] == 0


def test_a_checkpoint_its_key_does_not_vouch_for_is_refused_unless_restarted(sample_files, tmp_path,
                                                                           own_key_dir):
    """The key lives in the user's cache (0600 in a 0700 folder), never in the checkpoint. Without it, or
    with a manifest it does not vouch for, the checkpoint is refused, naming what is wrong; nothing in it
    is read (a pickle planted there is never loaded). checkpoint_restart=True starts over."""
    from casa_executors.errors import UntrustedData

    ck, marker = tmp_path / "ck", tmp_path / "created-by-a-pickle"
    first = run(ce.iterative(status=False, checkpoint=str(ck)), sample_files[:2])
    (key_file,) = own_key_dir.iterdir()
    key = key_file.read_bytes()
    assert len(key) == 32 and (key_file.stat().st_mode & 0o777, own_key_dir.stat().st_mode & 0o777) == (0o600, 0o700)
    assert not any(key in f.read_bytes() for f in ck.rglob("*") if f.is_file())
    root = ck / stored(ck)[1]
    genuine_root = root.read_bytes()
    root.write_bytes(forged(marker))
    key_file.unlink()  # the cache was cleaned, or the checkpoint was written from another account
    with pytest.raises(UntrustedData, match=rf"checkpoint {ck}: there is no key for it at {key_file} .*"
                                            r"checkpoint_restart=True"):
        run(ce.iterative(status=False, checkpoint=str(ck)), sample_files[:2])
    signing.write_key(key_file, key)
    root.write_bytes(genuine_root)
    ex = ce.iterative(status=False, checkpoint=f"file://{ck}/")  # the same location, named otherwise
    assert same(run(ex, sample_files[:2]), first) and ex.report.summary()["restored"] == 8
    manifest = ck / "manifest.json"
    data = bytearray(manifest.read_bytes())
    data[60] ^= 0x01  # a changed byte of the manifest's JSON
    manifest.write_bytes(bytes(data))
    with pytest.raises(UntrustedData, match=rf"checkpoint {ck}: {ck}/manifest.json: its authentication tag does "
                                            "not match"):
        run(ce.iterative(status=False, checkpoint=str(ck)), sample_files[:2])
    root.write_bytes(forged(marker))
    ex = ce.iterative(status=False, checkpoint=str(ck), checkpoint_restart=True)
    assert same(run(ex, sample_files[:2]), first)
    s = ex.report.summary()
    assert s["checkpoint"]["restarted"] is True and s["computed"] == 8 and s["restored"] == 0
    assert not marker.exists(), "a planted pickle was unpickled"
    assert key_file.read_bytes() != key  # a new checkpoint, a new key


class backend_held:
    """One engine for several executor calls (``with ex:`` for a bare backend)."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def __enter__(self):
        self.backend.hold()
        return self.backend

    def __exit__(self, *exc) -> None:
        self.backend.release()


def test_another_run_in_the_same_place_is_refused_unless_restarted(sample_files, tmp_path):
    ck = str(tmp_path / "ck")
    first = run(ce.iterative(status=False, checkpoint=ck), sample_files[:2])
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_bytes()[48:])
    assert manifest["items"]["count"] == 8 and manifest["processor"]["name"] == "analysis.Analysis"
    assert set(manifest["versions"]) == {"coffea", "awkward", "uproot", "casa_executors"}
    # another fileset, another processor, another processor setting, another tree shape
    cases = [
        (lambda: run(ce.iterative(status=False, checkpoint=ck), sample_files), "the work items differ"),
        (lambda: run(ce.iterative(status=False, checkpoint=ck), sample_files[:2], Failing(str(tmp_path / "l"))),
         r"the processor differs \(analysis.Analysis then, analysis.Failing now\)"),
        (lambda: run(ce.iterative(status=False, checkpoint=ck, merge_fanin=3), sample_files[:2]),
         "merge_fanin 8 then, 3 now"),
    ]
    for call_, message in cases:
        with pytest.raises(ce.CheckpointMismatch, match=message) as err:
            call_()
        assert "checkpoint_restart=True" in str(err.value) and isinstance(err.value, ValueError)
    # the same call again is fine (all restored); a restart computes anew
    ex = ce.iterative(status=False, checkpoint=ck)
    assert same(run(ex, sample_files[:2]), first) and ex.report.summary()["restored"] == 8
    ex = ce.iterative(status=False, checkpoint=ck, checkpoint_restart=True)
    out = run(ex, sample_files, Failing(str(tmp_path / "l"), bad_starts=set()))
    assert out["events"].value == 3000 and ex.report.summary()["checkpoint"]["restarted"] is True
    with pytest.raises(ce.CheckpointMismatch, match=r"processor differs \(analysis.Failing: its code or settings"):
        run(ce.iterative(status=False, checkpoint=ck), sample_files, Failing(str(tmp_path / "other-log")))
    # a folder that holds other files is not taken for a checkpoint
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(ce.CheckpointMismatch, match="not a casa_executors checkpoint"):
        run(ce.iterative(status=False, checkpoint=str(other)), sample_files[:1])
    assert (other / "thesis.tex").read_text() == "keep me"
    with pytest.raises(ce.ExecutorOptionError, match="checkpoint_restart must be True or False"):
        ce.iterative(checkpoint=ck, checkpoint_restart="yes")


@pytest.mark.parametrize("name", ["iterative", "futures"])
def test_with_coffea_checkpointer(name, distinct_files, tmp_path, no_leftover_processes):
    """coffea's per-chunk checkpointer inside, ours around it: both work, neither changes the result."""
    reference = run(ce.iterative(status=False), distinct_files)
    log = str(tmp_path / "attempts.log")
    proc = Failing(log, bad_starts=set())
    checkpointer = processor.SimpleCheckpointer(str(tmp_path / "coffea"))

    backend = executor(name).backend

    def runner_call(**opts):
        ex = ce.Driver(backend=backend, status=False, **opts)
        runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=250, metadata_cache={},
                                  checkpointer=checkpointer)
        return ex, runner({"SingleMu": [str(f) for f in distinct_files]}, proc, treename="Events")

    with backend_held(backend):
        ex, out = runner_call()  # coffea's checkpointer alone: it saves every chunk
        assert same(out, reference) and len(list((tmp_path / "coffea").rglob("*.coffea"))) == 12
        assert sum(attempts(log).values()) == 12
        ck = f"file://{tmp_path / 'ck'}"  # a URL this time (a shared disk as users name it)
        ex, out = runner_call(checkpoint=ck)  # ours is empty: chunks run, coffea's checkpointer answers them
        assert same(out, reference) and ex.report.summary()["computed"] == 12
        assert sum(attempts(log).values()) == 12  # the processor did not run again
        ex, out = runner_call(checkpoint=ck)  # ours holds the run: nothing is even submitted
        assert same(out, reference) and ex.report.summary()["restored"] == 12
        assert ex.report.summary()["attempts"] == 0
        assert stored(tmp_path / "ck") == ["manifest.json", "nodes/2/0"]
