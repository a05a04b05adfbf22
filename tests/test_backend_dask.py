"""What only the dask backend does: its options, a TLS LocalCluster, and a TLS scheduler + 2 workers
started here (coffea-casa's layout: certificates from a secrets directory, a foreign CA refused).

What every backend does (our own LocalCluster) is in test_backend_contract.py. Every process
started here is stopped by PID, also on failure; worker loss is a SIGKILL to a worker process
in the middle of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
from analysis import (
    alive,
    check_priority_order,
    check_worker_loss,
    HeldOnce,
    gate_closed,
    require_engine,
    run,
    same,
    started_in_order,
    stop_procs,
)
from test_backend_contract import DaskKit

import casa_executors as ce
from casa_executors.errors import BackendUnavailable, ExecutorOptionError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def engine():
    require_engine("dask")


def worker_procs(backend) -> set[psutil.Process]:
    out = set()
    for pid in backend.worker_pids().values():
        with contextlib.suppress(psutil.Error):
            out.add(psutil.Process(pid))
    return out


# -- options -------------------------------------------------------------------------


def test_options_are_checked(tmp_path):
    from casa_executors.backends.dask import DaskBackend, make_secrets_dir

    with pytest.raises(ExecutorOptionError, match="client= or address="):
        ce.dask(client=object(), address="tcp://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match="workers="):
        ce.dask(address="tcp://127.0.0.1:1", workers=2)
    with pytest.raises(ExecutorOptionError, match="secrets_dir"):
        ce.dask(address="tls://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match=r"must be a distributed\.Client"):
        ce.dask(client="tcp://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match="workers must be a whole number"):
        ce.dask(workers=0)
    with pytest.raises(ExecutorOptionError, match="did you mean 'secrets_dir'"):
        ce.dask(secret_dir=str(tmp_path))
    secrets = make_secrets_dir(tmp_path / "s")
    assert sorted(p.name for p in secrets.iterdir()) == ["ca.pem", "hostcert.pem", "usercert.pem"]
    assert (secrets / "usercert.pem").stat().st_mode & 0o077 == 0
    with pytest.raises(ExecutorOptionError, match="tls:// address"):
        ce.dask(address="tcp://127.0.0.1:1", secrets_dir=str(secrets))
    with pytest.raises(ExecutorOptionError, match="not both"):
        ce.dask(address="tls://127.0.0.1:1", secrets_dir=str(secrets), security=object())
    (secrets / "hostcert.pem").unlink()
    with pytest.raises(ExecutorOptionError, match=r"has no hostcert\.pem"):
        ce.dask(address="tls://127.0.0.1:1", secrets_dir=str(secrets))
    with pytest.raises(ExecutorOptionError, match="is not a directory"):
        ce.dask(address="tls://127.0.0.1:1", secrets_dir=str(tmp_path / "nowhere"))
    # a bare host:port with certificates means TLS
    assert DaskBackend(address="127.0.0.1:1", secrets_dir=str(make_secrets_dir(tmp_path / "t")))._address == (
        "tls://127.0.0.1:1"
    )


def test_unavailable_names_the_missing_package(monkeypatch):
    from casa_executors.backends.dask import DaskBackend

    assert DaskBackend.unavailable() is None
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert "distributed" in DaskBackend.unavailable()


# -- a LocalCluster with TLS ------------------------------------------------------------------


def test_local_cluster_with_tls_owned_and_stopped(sample_files, reference, tmp_path, no_leftover_processes):
    from casa_executors.backends.dask import make_secrets_dir

    ex = ce.dask(workers=2, status=False, secrets_dir=str(make_secrets_dir(tmp_path / "s")))
    out = run(ex, sample_files)
    assert same(out, reference)
    assert ex.report.summary()["processed"] == 12
    assert ex.report.processing.workers == 2 and ex.backend._cluster is None  # stopped after the call
    assert {r.worker.split("://")[0] for r in ex.report.rows()} == {"tls"}


def test_local_cluster_in_this_process(sample_files, reference, no_leftover_processes):
    """``processes=False``: the workers are threads of this process, talking over inproc:// (a scheduler
    given host= refuses to start then: "Cluster failed to start")."""
    ex = ce.dask(workers=2, processes=False, status=False)
    out = run(ex, sample_files)
    assert same(out, reference)
    assert ex.report.summary()["processed"] == 12
    assert {r.worker.split("://")[0] for r in ex.report.rows()} == {"inproc"}
    assert ex.backend._cluster is None  # stopped after the call


def _tasks_known(dask_scheduler) -> list[str]:
    return [str(key) for key in dask_scheduler.tasks]


def test_a_priority_task_starts_before_the_queued_ones(tmp_path):
    """``priority=1`` (retries, merges, speculative copies) reaches the scheduler: with A holding the one
    worker and B-F queued, P (submitted last) starts before them. Dask hands a worker up to
    ceil(worker-saturation 1.1 x threads) = 2 tasks at once, so B, already on the worker, may go first."""
    from casa_executors.backends.dask import DaskBackend

    log, gate = tmp_path / "started", tmp_path / "gate"
    gate.touch()
    backend = DaskBackend(workers=1, processes=False)
    assert backend.honours_priority
    backend.start()
    try:
        with gate_closed(str(gate)):
            queued = backend.submit_many(started_in_order, [(str(log), str(gate), n) for n in "ABCDEF"])
            first = backend.submit(started_in_order, (str(log), str(gate), "P"), priority=1)
            # the gate opens once the scheduler has P (this question and the submission travel apart)
            while str(first.key) not in backend._client.run_on_scheduler(_tasks_known):
                pass
        assert [f.result(timeout=30) for f in [*queued, first]] == [*"ABCDEF", "P"]
    finally:
        backend.stop()
    check_priority_order(log.read_text().split(), held_by_worker=1)


# -- a TLS scheduler and two workers as separate processes ---------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    from casa_executors.backends.dask import make_secrets_dir

    tmp = tmp_path_factory.mktemp("dask-tls")
    secrets = make_secrets_dir(tmp / "secrets")
    env = dict(os.environ, PYTHONPATH=str(REPO), DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    tls = ["--tls-ca-file", str(secrets / "ca.pem")]
    started: list[subprocess.Popen] = []
    seen: set[psutil.Process] = set()

    def start(args: list[str], name: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=tmp)
        log.close()
        started.append(p)
        return p

    try:
        sched_file = tmp / "scheduler.json"
        start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol", "tls",
               *tls, "--tls-cert", str(secrets / "hostcert.pem"), "--tls-key", str(secrets / "hostcert.pem"),
               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)], "scheduler")
        deadline = time.time() + 60
        address = None
        while address is None and time.time() < deadline:
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                assert started[0].poll() is None, (tmp / "scheduler.log").read_text()
                time.sleep(0.1)
        assert address and address.startswith("tls://127.0.0.1:")
        for i in range(2):
            start(["distributed.cli.dask_worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                   "--dashboard-address", "127.0.0.1:0", *tls, "--tls-cert", str(secrets / "usercert.pem"),
                   "--tls-key", str(secrets / "usercert.pem"), "--name", f"w{i}", "--memory-limit", "0",
                   "--local-directory", str(tmp / f"w{i}")], f"worker{i}")
        ex = ce.dask(address=address, secrets_dir=str(secrets), status=False)
        ex.backend.hold()
        try:
            ex.backend._client.wait_for_workers(2, timeout=60)
            seen.update(worker_procs(ex.backend))
            yield {"address": address, "secrets": secrets, "backend": ex.backend, "tmp": tmp, "seen": seen}
        finally:
            seen.update(worker_procs(ex.backend))
            ex.backend.release()
    finally:
        # nannies first (they stop their workers), then the scheduler; then any worker left, all by PID
        left = stop_procs(psutil.Process(p.pid) for p in started[1:] if p.poll() is None)
        left += stop_procs(psutil.Process(p.pid) for p in started[:1] if p.poll() is None)
        left += stop_procs(seen)
        for p in started:
            p.wait(5)
        assert not left, f"processes left behind: {left}"


def test_tls_cluster_matches_iterative(tls_cluster, sample_files, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no allowed-failures warning: the scheduler has 0
        ex = ce.dask(address=tls_cluster["address"], secrets_dir=str(tls_cluster["secrets"]), status=False)
        out = run(ex, sample_files)
    assert same(out, reference)
    assert ex.report.processing.workers == 2
    assert ex.report.summary()["attempts"] == 12
    assert {r.worker.split("://")[0] for r in ex.report.rows()} == {"tls"}


def test_a_speculative_copy_finishes_the_run_its_straggler_blocks(tls_cluster, sample_files, reference, tmp_path):
    """``Driver(speculate=True)``: the first attempt at one chunk waits on a gate that opens only after the
    Runner call returned, so the call ends only if the rules' copy of it (sent with priority 1, run by
    the other worker) won. The output is iterative's and every chunk is counted once."""
    gate, claim = tmp_path / "gate", tmp_path / "claim"
    gate.touch()
    processor = HeldOnce(str(gate), str(claim), sample_files[0].name)
    # 30 tasks of a chunk: the rules know a chunk's length once 20 are back
    ex = ce.Driver(backend=tls_cluster["backend"], status=False, speculate=True, chunks_per_task=1)
    with gate_closed(str(gate)):
        out = run(ex, sample_files, processor, chunksize=100)
        assert claim.exists()  # the first attempt is still held at the gate
    assert same(out, reference)
    s = ex.report.summary()
    assert s["processed"] == s["chunks"] == 30 and len(ex.report.processing.rows) == 30


def test_existing_client_is_used_not_closed(tls_cluster, sample_files, reference):
    from distributed import Client

    from casa_executors.backends.dask.security import client_security

    client = Client(tls_cluster["address"], security=client_security(tls_cluster["secrets"]),
                    set_as_default=False)
    try:
        ex = ce.dask(client=client, status=False)
        assert ex.backend.workers == 2 and ex.backend.max_inflight() == 4
        assert same(run(ex, sample_files), reference)
        assert client.status == "running"
    finally:
        client.close()


def test_scheduler_that_retries_is_reported(sample_files, reference):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        ex = ce.dask(client=client, status=False)
        with pytest.warns(UserWarning, match="allowed-failures"):
            out = run(ex, sample_files)
    assert same(out, reference)


def test_tls_refuses_plain_tcp_and_other_ca(tls_cluster, tmp_path):
    import dask
    from distributed import Client

    from casa_executors.backends.dask import make_secrets_dir

    plain = tls_cluster["address"].replace("tls://", "tcp://")
    other = make_secrets_dir(tmp_path / "other-ca")
    with dask.config.set({"distributed.comm.timeouts.connect": "5s"}):
        with pytest.raises(OSError):
            Client(plain, set_as_default=False, timeout=5)
        with pytest.raises(BackendUnavailable, match="cannot connect"):
            ce.dask(address=plain, status=False).backend.start()
        with pytest.raises(BackendUnavailable, match=r"cannot connect.*TLS certificate"):
            ce.dask(address=tls_cluster["address"], secrets_dir=str(other), status=False).backend.start()
    assert tls_cluster["backend"].workers == 2  # nothing else joined


def test_tls_worker_loss(tls_cluster, sample_files, reference, tmp_path, monkeypatch):
    backend, kit = tls_cluster["backend"], DaskKit()
    ex = ce.Driver(backend=backend, status=False)
    tls_cluster["seen"].update(worker_procs(backend))
    info = check_worker_loss(ex, sample_files, reference, tmp_path, monkeypatch,
                             lambda busy: kit.victims(backend, busy), kit.lost_prefix)
    tls_cluster["seen"].update([*info["killed"], *worker_procs(backend)])
    assert not any(alive(p) for p in info["killed"])
    print("TLS cluster worker loss:", info)
    backend._client.wait_for_workers(2, timeout=30)  # the nanny restarted it


# -- chunk metadata pushed as events (pushed.py) ------------------------------------------


def _task_prefixes(stream: list[dict]) -> list[str]:
    return [(d["key"] if isinstance(d["key"], str) else d["key"][0]).split("-", 1)[0] for d in stream]


def test_chunk_metadata_arrives_as_events_for_two_executors_on_one_client(tls_cluster, sample_files, reference):
    """One task per chunk (no strip_outputs task), and two executors sharing a client share its event handler."""
    from concurrent.futures import ThreadPoolExecutor

    from distributed import get_task_stream

    client = tls_cluster["backend"]._client
    executors = [ce.dask(client=client, status=False, chunks_per_task=1) for _ in range(2)]  # a task a chunk
    for ex in executors:
        ex.backend.hold()
    try:
        pushed = executors[0].backend._pushed
        assert pushed is executors[1].backend._pushed is tls_cluster["backend"]._pushed
        before = pushed.fallbacks
        with get_task_stream(client=client) as ts, ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda ex: run(ex, sample_files), executors))
        assert all(same(out, reference) for out in outs)
        prefixes = _task_prefixes(ts.data)
        assert "strip_outputs" not in prefixes
        assert prefixes.count("run_batch") == 2 * 12 + 2 * 3  # two runs: 12 chunks and 3 files' metadata each
        assert pushed.fallbacks == before
        assert all(ex.report.summary()["attempts"] == 12 for ex in executors)
    finally:
        for ex in executors:
            ex.backend.release()
    assert tls_cluster["backend"]._pushed is pushed and pushed._users == 1  # the fixture's own stays subscribed


def test_a_missing_event_falls_back_to_a_metadata_task(tls_cluster, sample_files):
    import cloudpickle
    from coffea.processor.executor import WorkItem

    from casa_executors.task import ChunkTask, TaskBatch, run_batch

    def run_without_event(batch):  # nested: pickled by value, the workers cannot import this module
        batch.notify = None  # as if the scheduler dropped the event
        return run_batch(batch)

    pushed = tls_cluster["backend"]._pushed
    before = pushed.fallbacks
    item = WorkItem("ds", str(sample_files[0]), "Events", 0, 10, "uuid", None)
    batch = TaskBatch(cloudpickle.dumps(lambda item: item.entrystop - item.entrystart), [ChunkTask(0, item, 1)])
    [(meta, data)] = pushed.submit(run_without_event, [batch])
    [result] = meta.result(timeout=60)
    assert result.ok and result.output is None and result.events == 10
    assert data.result()[0].output == 10  # the output stayed with the task
    assert pushed.fallbacks == before + 1


# -- the workers' allocator ---------------------------------------------------------------


def test_our_workers_keep_glibc_dynamic_mmap_and_foreign_ones_are_named(tls_cluster, caplog):
    """dask's nanny sets MALLOC_TRIM_THRESHOLD_ (glibc then maps and unmaps every large array): our
    LocalCluster's workers go without it (and without the statistical profiler); a cluster whose
    workers have it gets a warning naming it."""
    import dask

    from casa_executors.backends.dask import TRIM_VAR, WORKER_PROFILER, trim_threshold

    ex = ce.dask(workers=1, status=False)
    ex.backend.hold()
    try:
        workers = ex.backend.worker_pids()
        assert ex.backend._client.run(trim_threshold) == {w: None for w in workers}
        # nor do they sample their stacks for the dashboard; this process's dask config is left as it was
        assert ex.backend._client.run(dask.config.get, WORKER_PROFILER) == {w: False for w in workers}
        assert dask.config.get(WORKER_PROFILER) is True
    finally:
        ex.backend.release()
    foreign = ce.dask(address=tls_cluster["address"], secrets_dir=str(tls_cluster["secrets"]), status=False)
    with caplog.at_level("WARNING", logger="casa_executors.backends.dask"):
        foreign.backend.start()
        foreign.backend.stop()
    assert f"2 of the workers run with {TRIM_VAR} set" in caplog.text
