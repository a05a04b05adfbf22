"""What every backend must do, one test body for all of them (in the manner of CPython's
``test_concurrent_futures``): the same output as coffea's iterative executor, exact attempt
counts, partial results, a report row per chunk, options checked when the executor is built,
a lost worker that loses no chunk, and no process left behind.

A ``Kit`` per backend says how to build its standard executor and what is engine-specific:
which processes it has, how to kill one of its workers, what a lost attempt is called.
One executor per backend is held for the module (engines are expensive to start); tests
of an owned engine build their own. What only one engine does (TLS, Py4J, external
workers, user configs) is in ``test_backend_<engine>.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, ClassVar

import numpy as np
import psutil
import pytest
import uproot
from analysis import (
    Failing,
    Watch,
    alive,
    assert_adl_identical,
    assert_gone,
    attempts,
    check_worker_loss,
    descendants,
    gate_closed,
    require_engine,
    run,
    same,
)
from coffea import processor
from coffea.nanoevents import NanoAODSchema
from coffea.processor.executor import ExecutorBase
from coffea.util import _exception_chain

import casa_executors as ce
from casa_executors import procs
from casa_executors.backends.base import Backend

ENGINES = [name for name in ce.BACKENDS if name != "iterative"]  # those with workers to lose


class Kit:
    """A backend's standard executor and its engine-specific hooks."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {"workers": 2}
    workers: ClassVar[int] = 2
    exclusive: ClassVar[bool] = False  # one engine per process: the held one stops before another starts
    adl_chunksize: ClassVar[int] = 500
    adl_options: ClassVar[dict[str, Any]] = {}
    lost_prefix: ClassVar[str] = ""  # how the driver is told about an attempt on a killed worker
    lost_task: ClassVar[str] = ""  # "module:Name" of what a task that kills its own worker raises

    def lost_task_type(self) -> type[BaseException]:
        module, name = self.lost_task.split(":")
        return getattr(importlib.import_module(module), name)

    def build(self, **opts: Any) -> ce.Driver:
        return ce.create(self.name, status=False, **self.options, **opts)

    def processes(self, backend: Backend) -> dict[psutil.Process, str]:
        """The engine's processes that are not descendants of this interpreter (those are followed anyway);
        called from a watching thread, so it must only read."""
        return {}

    def stopped(self, backend: Backend) -> bool:
        """The backend dropped its engine (after a call it started the engine for)."""
        return True

    def check_seen(self, seen: dict[psutil.Process, str]) -> None:
        """The processes followed during an owned run are the engine's."""
        assert seen, "no engine process was seen"

    def check_rows(self, backend: Backend, rows: list) -> None:
        assert all(str(os.getpid()) not in r.worker for r in rows)  # ran in the engine's workers

    def victims(self, backend: Backend, busy: list[int]) -> list[psutil.Process]:
        """The worker to kill, given the PIDs running a chunk now."""
        raise NotImplementedError

    def after_loss(self, backend: Backend, info: dict) -> None:
        """Engine-specific checks once a run with a killed worker has ended (engine still up)."""

    def recover(self, backend: Backend) -> None:
        """Wait until the engine has replaced a dead worker."""


class IterativeKit(Kit):
    name = "iterative"
    options: ClassVar[dict[str, Any]] = {}
    workers = 1

    def check_seen(self, seen):
        assert not seen  # this thread: no process at all

    def check_rows(self, backend, rows):
        pass


class FuturesKit(Kit):
    name = "futures"
    lost_prefix = "TerminatedWorkerError: "  # loky's BrokenProcessPool for a worker that died
    lost_task = "concurrent.futures.process:BrokenProcessPool"

    def stopped(self, backend):
        return backend._pool is None and not backend.pids()

    def victims(self, backend, busy):
        return [psutil.Process(busy[0])]  # a pool process running a chunk (chunks run in the pool processes)


class DaskKit(Kit):
    name = "dask"
    lost_prefix = "KilledWorker: "
    lost_task = "distributed:KilledWorker"

    def stopped(self, backend):
        return backend._cluster is None and backend._client is None

    def check_rows(self, backend, rows):
        super().check_rows(backend, rows)
        assert {r.worker.split("://")[0] for r in rows} == {"tcp"}

    def victims(self, backend, busy):
        workers = set(backend.worker_pids().values())
        return [psutil.Process(p) for p in busy if p in workers][:1]  # tasks run in the worker process

    def after_loss(self, backend, info):
        backend._client.wait_for_workers(2, timeout=60)  # the nanny starts a new worker, in its own time
        assert len(backend.worker_pids()) == 2
        assert not any(alive(p) for p in info["killed"])

    def recover(self, backend):
        backend._client.wait_for_workers(2, timeout=60)


class ParslKit(Kit):
    """LocalProvider detaches the worker pools (their parent is init): they are followed through the
    DataFlowKernel, and a lost pool's tasks come back as ManagerLost after the heartbeat threshold."""

    name = "parsl"
    lost_prefix = "ManagerLost: "
    lost_task = "parsl.executors.high_throughput.errors:WorkerLost"

    def processes(self, backend):
        dfk = backend.dfk
        out: dict[psutil.Process, str] = {}
        if dfk is None:
            return out
        for ex in list(dfk.executors.values()):
            with contextlib.suppress(psutil.Error, AttributeError):
                out[psutil.Process(ex.interchange_proc.pid)] = "interchange"
            provider = getattr(ex, "provider", None)
            for job in list(getattr(provider, "resources", {}).values()):
                with contextlib.suppress(psutil.Error, KeyError):
                    block = psutil.Process(job["remote_pid"])
                    out[block] = "block"
                    for child in block.children(recursive=True):
                        out[child] = " ".join(child.cmdline()[:2])
        return out

    def pools(self, backend) -> list[psutil.Process]:
        return [p for p, role in self.processes(backend).items() if "process_worker_pool" in role and alive(p)]

    def stopped(self, backend):
        return backend.dfk is None and backend._run_dir is None  # run dir removed too

    def check_seen(self, seen):
        roles = set(seen.values())
        assert "interchange" in roles and any("process_worker_pool" in r for r in roles), roles

    def victims(self, backend, busy):
        # the process_worker_pool one of whose workers is inside a chunk (held there by the gate): its workers,
        # and the chunks on them, are lost; a pool with no chunk on it would lose nothing
        running = set(busy)
        return [p for p in self.pools(backend) if running & {c.pid for c in p.children(recursive=True)}][:1]

    def after_loss(self, backend, info):
        now = self.pools(backend)
        assert now and not set(info["killed"]) & set(now)  # a new block runs
        print(f"parsl: {sum(alive(p) for p in info['below_killed'])} of the dead pool's "
              f"{len(info['below_killed'])} processes run until stop()")


def jvm_pid() -> int | None:
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    return proc.pid if proc is not None else None


class SparkKit(Kit):
    name = "spark"
    options: ClassVar[dict[str, Any]] = {"master": "local[2]"}
    exclusive = True  # one SparkContext per process
    adl_chunksize = 300
    lost_prefix = "WorkerLost: spark lost the task"
    lost_task = "casa_executors.errors:WorkerLost"

    def stopped(self, backend):
        return backend._sc is None and jvm_pid() is None  # the JVM too

    def victims(self, backend, busy):
        pids = set(backend.executor_pids())
        return [psutil.Process(p) for p in busy if p in pids][:1]  # a Python worker in the middle of a chunk


class WorkQueueKit(Kit):
    name = "workqueue"
    adl_chunksize = 300
    adl_options: ClassVar[dict[str, Any]] = {"chunks_per_task": 6}
    lost_prefix = "WorkerLost: workqueue: lost the worker running task"
    lost_task = "casa_executors.errors:WorkerLost"

    def __init__(self) -> None:
        self.resent = 0

    def processes(self, backend):
        workers = backend.worker_pids()
        # the workers lead a session each: their tasks and warm servers are in it
        return dict.fromkeys(procs.in_sessions(workers), "work_queue_worker session")

    def stopped(self, backend):
        return backend._staging is None

    def check_rows(self, backend, rows):
        super().check_rows(backend, rows)
        # every interface (cctools has no address option), behind the run's password (test_backend_workqueue)
        assert listening_on(backend.port, backend.manager_pid) in ({"0.0.0.0"}, {"::"})
        assert backend.password_file.stat().st_mode & 0o777 == 0o600
        assert {r.worker.rsplit(":", 1)[1] for r in rows} <= {str(p) for p in backend.worker_pids()}

    def victims(self, backend, busy):
        self.resent = backend.resent
        workers = backend.worker_pids()
        sessions = {s for s in map(session_of, busy) if s in workers}
        return [psutil.Process(s) for s in sessions][:1]  # the work_queue_worker running a chunk

    def after_loss(self, backend, info):
        assert backend.resent > self.resent  # Work Queue wanted to re-send it; the driver did instead
        killed = {p.pid for p in info["killed"]}
        assert len(backend.worker_pids()) == 2 and not killed & set(backend.worker_pids())
        # its task and its warm server go with it, each on an event (the server's pidfd of its worker, the
        # client's reply FIFO ending, the Python client's parent-death signal), not on a poll: the deadline
        # is a failure bound only (test_wq_warm_server.py shows each step)
        deadline = psutil.time.time() + 30
        while (left := procs.in_sessions(killed)) and psutil.time.time() < deadline:
            psutil.time.sleep(0.1)
        assert not left, [(p.pid, procs.cmdline(p.pid)) for p in left]


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:  # gone meanwhile
        return None


def listening_on(port: int, pid: int | None = None) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


KITS: dict[str, type[Kit]] = {k.name: k for k in (IterativeKit, FuturesKit, DaskKit, ParslKit, SparkKit, WorkQueueKit)}
assert tuple(KITS) == ce.BACKENDS


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ce.BACKENDS)
def kit(request) -> Kit:
    """The backend under test; tests of one backend run together, so one engine is up at a time."""
    require_engine(request.param)
    return KITS[request.param]()


class Held:
    """The module's executor for one backend: started on first use, kept up, stopped at the end, when
    every process it had (followed all along) must be gone."""

    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self._backend: Backend | None = None
        self._before: set[psutil.Process] = set()
        self.watch: Watch | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._before = descendants()
            self._backend = self.kit.build().backend
            self._backend.hold()
            backend = self._backend
            self.watch = Watch(lambda: {**dict.fromkeys(descendants() - self._before, ""),
                                        **self.kit.processes(backend)})
            self.watch.__enter__()
        return self._backend

    def driver(self, **opts: Any) -> ce.Driver:
        """An executor on the held engine."""
        return ce.Driver(backend=self.backend, status=opts.pop("status", False), **opts)

    def stop(self) -> None:
        if self._backend is None:
            return
        backend, self._backend = self._backend, None
        try:
            self.watch.look()
        finally:
            backend.release()
            self.watch.__exit__(None, None, None)
        assert self.kit.stopped(backend)
        assert_gone(self.watch.seen)


@pytest.fixture(scope="module")
def held(kit):
    h = Held(kit)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def reference(sample_files):
    """coffea's own IterativeExecutor on the three files: what every backend must give, bit for bit."""
    return run(processor.IterativeExecutor(status=False), sample_files)


@pytest.fixture(scope="module")
def standard(held, sample_files):
    """One plain run on the held engine, looked at by several tests: (executor, output)."""
    ex = held.driver()
    return ex, run(ex, sample_files)


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


# -- building the executor: nothing starts --------------------------------------------------------


def test_bad_options_fail_at_construction(kit, no_leftover_processes):
    workers = ("iterative runs in this thread: workers must be 1, got 0" if kit.name == "iterative"
               else f"{kit.name}: workers must be a whole number >= 1, got 0")
    with pytest.raises(ce.ExecutorOptionError, match=workers):
        ce.create(kit.name, workers=0)
    with pytest.raises(ce.ExecutorOptionError, match="retries must be a whole number >= 0, got -1"):
        kit.build(retries=-1)
    with pytest.raises(ce.ExecutorOptionError,
                       match=rf"{kit.name}\(\): unknown option 'wrokers' \(did you mean 'workers'\?\)"):
        ce.create(kit.name, wrokers=2)
    with pytest.raises(ce.ExecutorOptionError, match="merge_fanin"):
        kit.build(merge_fanin=1)
    with pytest.raises(ce.ExecutorOptionError, match="token= is only used with cache="):
        kit.build(token="abc")


def test_executor_survives_runner_copy_and_is_a_coffea_executor(kit):
    ex = kit.build(retries=1)
    assert isinstance(ex, ExecutorBase) and ex.backend.name == kit.name
    copy = ex.copy(desc="Preprocessing", unit="file", compression=None)
    assert copy.report is ex.report and copy.backend is ex.backend and copy.retries == 1


# -- an engine the executor owns: up for the call, then gone -------------------------------------


def test_owned_engine_started_and_stopped_per_call(kit, held, sample_files, reference, no_leftover_processes):
    if kit.exclusive:
        held.stop()  # only one of these engines can live in a process
    ex = kit.build()
    before = descendants()
    with Watch(lambda: {**dict.fromkeys(descendants() - before, ""), **kit.processes(ex.backend)}) as watch:
        out = run(ex, sample_files)
    assert same(out, reference)
    s = ex.report.summary()
    assert s["processed"] == s["attempts"] == 12 and ex.report.processing.workers == kit.workers
    assert kit.stopped(ex.backend)  # stopped after the call
    kit.check_seen(watch.seen)
    assert_gone(watch.seen)


# -- the held engine ----------------------------------------------------------------------------


def test_identical_to_coffea_iterative(standard, reference):
    _, out = standard
    assert same(out, reference)
    # column accumulators keep chunk order, like coffea's own executor
    assert np.array_equal(out["met_column"].value, reference["met_column"].value)


def test_report_reachable_after_runner_copies(kit, held, standard, sample_files):
    ex, _ = standard
    s = ex.report.summary()
    assert s["chunks"] == 12 and s["processed"] == 12 and s["failed"] == 0
    assert s["events"] == 3000 and s["attempts"] == 12 and s["bytes_read"] > 0
    assert ex.report.processing.workers == kit.workers
    rows = ex.report.rows()
    assert sorted((r.filename, r.entrystart) for r in rows) == sorted(
        (str(f), s) for f in sample_files for s in (0, 250, 500, 750)
    )
    for r in rows:
        assert r.status == "ok" and r.attempts == 1 and r.events == 250
        assert r.worker and r.host and r.wall_s > 0
    # a file's one basket per branch is metered to the chunk that read it; a worker's later chunks of that file
    # take it from the thread (baskets.Baskets) and read nothing
    for f in sample_files:
        assert sum(r.bytes_read for r in rows if r.filename == str(f)) > 0, rows
    kit.check_rows(held.backend, rows)
    assert ex.report.preprocessing is not None and len(ex.report.preprocessing.rows) == 3
    assert all(r.status == "ok" for r in ex.report.preprocessing.rows)


@pytest.mark.parametrize("kit", ENGINES, indirect=True)
def test_adl_queries_bit_identical(kit, held, sample_files):
    assert_adl_identical(held.backend, sample_files, chunksize=kit.adl_chunksize, **kit.adl_options)


@pytest.mark.parametrize("retries", [0, 2])
def test_failing_chunk_attempted_exactly_retries_plus_one(kit, held, retries, sample_files, tmp_path):
    log = str(tmp_path / "attempts.log")
    ex = held.driver(retries=retries)
    with pytest.raises(Exception) as err:
        run(ex, sample_files[:1], Failing(log, bad_starts={500}))
    counts = attempts(log)
    assert counts["a.root:500"] == retries + 1  # across processes: the driver retries, nobody else
    # the worker's own exception: coffea's Exception, caused by the processor's ZeroDivisionError
    assert type(err.value) is Exception and type(err.value.__cause__) is ZeroDivisionError
    assert err.value.attempts == retries + 1 and err.value.item.entrystart == 500
    text = "\n".join([str(err.value), *err.value.__notes__])  # coffea's message, then ours (PEP 678 notes)
    assert "a.root" in text and "ZeroDivisionError: planted failure" in text
    chain = _exception_chain(err.value)
    assert not any("Py4J" in f"{type(c).__name__}{c}" for c in chain)
    row = next(r for r in ex.report.rows() if r.entrystart == 500)
    assert row.attempts == retries + 1 and row.error_type == "Exception"  # coffea wraps it
    ran = [r for r in ex.report.failures() if r.attempts]
    assert ran and all(r.attempts == retries + 1 and r.error_type != "WorkerLost" for r in ran)
    # every chunk is either in the output or in the failures, exactly once
    s = ex.report.summary()
    assert s["processed"] + s["failed"] == s["chunks"] == 4


def test_flaky_chunks_are_retried_and_output_identical(held, sample_files, reference, tmp_path):
    log = str(tmp_path / "attempts.log")
    ex = held.driver(retries=1)
    out = run(ex, sample_files, Failing(log, fail_times=1))
    assert same(out, reference)
    assert all(n == 2 for n in attempts(log).values()) and len(attempts(log)) == 12
    s = ex.report.summary()
    assert s["attempts"] == 24 and s["retries"] == 12 and s["processed"] == 12


def test_recoverable_partial_output_and_failed_items_rerun(held, sample_files, reference, tmp_path):
    log = str(tmp_path / "attempts.log")
    ex = held.driver(retries=0, recoverable=True)
    with pytest.warns(UserWarning, match="3 of 12 processing items failed"):
        partial_out = run(ex, sample_files, Failing(log, bad_starts={250}, fail_times=1))
    # a random set of good chunks would not do: it must be exactly the 9 others
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


def test_corrupt_and_missing_files_give_partial_output_with_skipbadfiles(held, sample_files, bad_files):
    corrupt, missing = bad_files
    good = run(ce.iterative(status=False), sample_files[:1])
    for kw, runner_kw in (
        ({"recoverable": True}, {"skipbadfiles": True}),
        ({}, {"skipbadfiles": (OSError, ValueError)}),
    ):
        ex = held.driver(retries=1, **kw)
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


def test_bad_files_without_skip_raise_error_naming_file_and_cause(held, sample_files, bad_files):
    corrupt, missing = bad_files
    with pytest.raises(FileNotFoundError, match=r"preprocessing of .*missing\.root.*FileNotFoundError") as err:
        run(held.driver(retries=0), [sample_files[0], missing])
    assert type(err.value) is FileNotFoundError and err.value.filename == str(missing)  # uproot's own
    ex = held.driver(retries=0)
    pattern = r"processing of .*corrupt\.root entries \d+-\d+ .*ValueError: .*checksum"
    with pytest.raises(Exception, match=pattern) as err:
        run(ex, [corrupt])
    assert type(err.value) is Exception and type(err.value.__cause__) is ValueError  # coffea's, caused by uproot's
    assert err.value.partial_output is None or isinstance(err.value.partial_output, dict)
    s = ex.report.summary()
    assert s["processed"] + s["failed"] == s["chunks"] and s["failed"] >= 1


def test_status_false_is_silent_and_status_true_shows_rate(held, sample_files, capfd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width when not a terminal: room for a long backend description
    run(held.driver(), sample_files[:1])
    captured = capfd.readouterr()
    assert "Processing" not in captured.err + captured.out and "ev/s" not in captured.err + captured.out
    run(held.driver(status=True), sample_files[:1])
    err = capfd.readouterr().err
    assert "Processing" in err and "ev/s" in err and "4/4" in err


@pytest.mark.parametrize("kit", ["parsl"], indirect=True)
def test_parsl_gives_a_priority_task_htexs_priority(kit, held, tmp_path):
    """Parsl honours ``priority=1`` as HighThroughputExecutor's resource specification 'priority' (-1; none
    for the others), through an app that takes it. Which task the interchange hands out next is parsl's
    (lowest 'priority' first: its interchange.py); it is not checked here, as nothing tells when the
    interchange has received a task (its command channel and its task socket are read apart)."""
    import subprocess

    backend = held.backend
    gate = tmp_path / "gate"
    gate.touch()
    assert backend.honours_priority
    with gate_closed(str(gate)):  # both workers wait at the gate: the others stay in flight
        waiting = [backend.submit(subprocess.check_call, ["flock", "-s", str(gate), "true"]) for _ in range(2)]
        plain = backend.submit(abs, -1)
        first = backend.submit(abs, -2, priority=1)
        specs = sorted((r["func_name"], r["resource_specification"]) for r in backend.dfk.tasks.values())
        assert specs == [("abs", {}), *[("check_call", {})] * 2, ("prioritised", {"priority": -1})], specs
    assert [f.result(timeout=60) for f in (*waiting, plain, first)] == [0, 0, 1, 2]


# -- losing workers (last: they disturb the engine) -----------------------------------------------


@pytest.mark.parametrize("kit", ENGINES, indirect=True)
def test_task_that_kills_its_worker_fails_and_the_engine_goes_on(kit, held):
    """A task whose worker process dies fails (the driver counts and retries it); the engine does
    not re-run it behind the driver's back, and it runs the next task."""
    backend = held.backend
    with pytest.raises(kit.lost_task_type()):
        backend.submit(os._exit, 3).result(timeout=60)
    kit.recover(backend)
    assert backend.submit(abs, -2).result(timeout=60) == 2


@pytest.mark.parametrize("kit", ENGINES, indirect=True)
def test_lost_worker_loses_no_chunk(kit, held, sample_files, reference, tmp_path, monkeypatch):
    backend = held.backend
    # Spark's one task per core would run the 30 chunks as two tasks: no chunk done before the end to kill after
    ex = held.driver(retries=2, **({"chunks_per_task": 2} if kit.name == "spark" else {}))
    info = check_worker_loss(ex, sample_files, reference, tmp_path, monkeypatch,
                             lambda busy: kit.victims(backend, busy), kit.lost_prefix)
    held.watch.seen.update(dict.fromkeys([*info["killed"], *info["below_killed"]], "killed, or below it"))
    kit.after_loss(backend, info)
    print(f"{kit.name} worker loss:", info)
