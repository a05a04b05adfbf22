"""Test processors (pickled by value, so worker processes need not import this module)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import awkward as ak
import cloudpickle
import hist
import numpy as np
import psutil
import pytest
from coffea import processor
from coffea.nanoevents import NanoAODSchema

from casa_executors import procs

cloudpickle.register_pickle_by_value(__import__(__name__))


class Analysis(processor.ProcessorABC):
    """A bit of everything an analysis returns: counts, weights, columns, sets, numbers."""

    def process(self, events):
        met = hist.Hist.new.Reg(40, 0, 200, name="met").Int64()
        met.fill(met=events.MET.pt)
        jets = events.Jet[events.Jet.pt > 20]
        # dyadic weights: exact in binary, so the merge order cannot change a bit
        weighted = hist.Hist.new.Reg(30, 15, 120, name="pt").Weight()
        weighted.fill(pt=ak.to_numpy(ak.fill_none(ak.firsts(jets.pt), -1.0)), weight=0.25)
        return {
            "met": met,
            "jetpt": weighted,
            "events": processor.value_accumulator(int, len(events)),
            "met_column": processor.column_accumulator(np.asarray(events.MET.pt)),
            "datasets": {events.metadata["dataset"]},
            "files": processor.defaultdict_accumulator(int, {events.metadata["filename"]: len(events)}),
        }

    def postprocess(self, accumulator):
        return accumulator


class Failing(Analysis):
    """Fails on chunks starting at ``bad_starts`` (all of them if None), ``fail_times`` times each.

    Every attempt appends a line to ``log``, from whatever process runs it.
    """

    def __init__(self, log: str, bad_starts: set[int] | None = None, fail_times: int = 10**9,
                 sleep: float = 0.0) -> None:
        self.log, self.bad_starts, self.fail_times, self.sleep = log, bad_starts, fail_times, sleep

    def process(self, events):
        start = events.metadata["entrystart"]
        key = f"{os.path.basename(events.metadata['filename'])}:{start}"
        with open(self.log, "a") as f:
            f.write(key + "\n")
        with self.running():
            if self.sleep:
                time.sleep(self.sleep)
            with open(self.log) as f:
                seen = sum(1 for line in f if line.strip() == key)
            if (self.bad_starts is None or start in self.bad_starts) and seen <= self.fail_times:
                raise ZeroDivisionError(f"planted failure in {key}")
            return super().process(events)

    def running(self) -> contextlib.AbstractContextManager:
        """Around the chunk's work, once its attempt is written down."""
        return contextlib.nullcontext()


class HeldOnce(Analysis):
    """The first attempt at the chunk of file ``name`` starting at ``start`` (the one that creates ``claim``)
    waits until ``gate`` opens (:func:`gate_closed`); any other attempt at it (a speculative copy) runs."""

    def __init__(self, gate: str, claim: str, name: str, start: int = 0) -> None:
        self.gate, self.claim, self.name, self.start = gate, claim, name, start

    def process(self, events):
        meta = events.metadata
        if os.path.basename(meta["filename"]) == self.name and meta["entrystart"] == self.start:
            try:
                os.close(os.open(self.claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # a copy: the first attempt has it
            else:
                with open(self.gate) as g:
                    fcntl.flock(g, fcntl.LOCK_SH)
        return super().process(events)


class Busy(Failing):
    """Never fails; a file named after its PID (holding its Slurm job ID, if any) sits in ``busy`` while a
    chunk runs, and it is removed only
    under a shared lock of the file ``gate``: whoever holds ``gate`` exclusively (:func:`gate_closed`)
    sees in ``busy`` processes that are all inside an attempt, and stay inside it until the gate opens."""

    def __init__(self, log: str, busy: str, gate: str) -> None:
        super().__init__(log, bad_starts=set(), sleep=0.3)
        self.busy, self.gate = busy, gate

    @contextlib.contextmanager
    def running(self):
        # marked only once the attempt is in the log: a worker killed while marked has its attempt counted
        mark = os.path.join(self.busy, str(os.getpid()))
        with open(mark, "w") as f:
            f.write(os.environ.get("SLURM_JOB_ID", ""))  # the batch job it runs in, if any
        try:
            yield
        finally:
            with open(self.gate) as gate:
                fcntl.flock(gate, fcntl.LOCK_SH)  # waits while a killer looks at the marks and kills
                os.unlink(mark)


@contextlib.contextmanager
def gate_closed(gate: str):
    """No ``Busy`` chunk ends (removes its mark) while inside."""
    with open(gate) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def started_in_order(arg: tuple[str, str, str]) -> str:
    """A task ``(log, gate, name)``: writes ``name`` to ``log`` as it starts; the one named "A" then holds its
    worker until ``gate`` opens (:func:`gate_closed`)."""
    log, gate, name = arg
    with open(log, "a") as f:
        f.write(name + "\n")
    if name == "A":
        with open(gate) as g:
            fcntl.flock(g, fcntl.LOCK_SH)
    return name


def check_priority_order(order: list[str], held_by_worker: int = 0) -> None:
    """The start order of tasks A-F (priority 0, in that order; A holds the one worker) and P (priority 1,
    submitted last): P before every task the engine still held back, the others first in, first out.
    ``held_by_worker``: tasks after A the engine had already given the worker (they may go before P)."""
    assert [n for n in order if n != "P"] == list("ABCDEF"), order
    assert order.index("P") <= 1 + held_by_worker, order


def alive(p: int | psutil.Process) -> bool:
    """Running and not a zombie; for a ``psutil.Process``, still that same process (not a reused PID)."""
    if not isinstance(p, psutil.Process):
        return procs.alive(p)
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def attempts(log: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(log) as f:
        for line in f:
            out[line.strip()] = out.get(line.strip(), 0) + 1
    return out


def same(a, b) -> bool:
    """Bit-identical outputs of ``Analysis``."""
    if set(a) != set(b):
        return False
    return (
        np.array_equal(a["met"].values(flow=True), b["met"].values(flow=True))
        and np.array_equal(a["jetpt"].values(flow=True), b["jetpt"].values(flow=True))
        and np.array_equal(a["jetpt"].variances(flow=True), b["jetpt"].variances(flow=True))
        and a["events"].value == b["events"].value
        and np.array_equal(a["met_column"].value, b["met_column"].value)
        and a["datasets"] == b["datasets"]
        and dict(a["files"]) == dict(b["files"])
    )


IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_engine(name: str) -> None:
    """A missing engine skips the test, or fails it under CI."""
    import casa_executors

    reason = casa_executors.unavailable(name)
    if reason:
        (pytest.fail if IN_CI else pytest.skip)(reason)


def run(ex, files, proc=None, chunksize=250, **runner_kw):
    """``Runner`` over ``files`` as one dataset, preprocessing every time."""
    if runner_kw.get("metadata_cache") is None:
        runner_kw["metadata_cache"] = {}
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize, **runner_kw)
    return runner({"SingleMu": [str(f) for f in files]}, proc or Analysis(), treename="Events")


def same_hists(a: dict, b: dict) -> bool:
    """Bit-identical ADL query outputs (Int64 histograms with flow bins, event count)."""
    return set(a) == set(b) and all(
        v == b[k] if k == "events" else (v == b[k] and (v.values(flow=True) == b[k].values(flow=True)).all())
        for k, v in a.items()
    )


_ITERATIVE_ADL: dict = {}


# the query a facility test runs (the eight run on every engine in test_backend_contract and
# test_conformance): muons, electrons and MET, the most collections of the eight
FACILITY_QUERY = (8,)


def assert_adl_identical(backend, files, chunksize: int = 500, queries=None, **driver_opts) -> None:
    """The ADL ``queries`` (default: all eight) on ``backend`` are bit-identical to iterative, with one
    attempt per chunk."""
    import casa_executors
    from casa_benchmarks.adl.queries import QUERIES

    cache: dict = {}  # preprocessing is tested elsewhere; one run fills it for the others
    for q, cls in QUERIES.items():
        if queries is not None and q not in queries:
            continue
        key = (q, tuple(map(str, files)), chunksize)  # iterative's answer, computed once per session
        if key not in _ITERATIVE_ADL:
            _ITERATIVE_ADL[key] = run(casa_executors.iterative(status=False), files, cls(), chunksize=chunksize)
        want = _ITERATIVE_ADL[key]
        ex = casa_executors.Driver(backend=backend, status=False, **driver_opts)
        got = run(ex, files, cls(), chunksize=chunksize, metadata_cache=cache)
        assert same_hists(got, want), f"query {q} differs"
        assert ex.report.summary()["attempts"] == ex.report.summary()["chunks"]


@dataclass
class Losses:
    """What the driver was told was lost during a run."""

    attempts: list[str] = field(default_factory=list)  # failed attempts, as ``Type: message``
    outputs: list[int] = field(default_factory=list)  # chunks whose finished output was lost (run again)


def record_losses(monkeypatch) -> Losses:
    """Record every failed attempt and every lost output the driver reports."""
    from casa_executors.report import Report

    losses = Losses()
    attempt, requeue = Report.attempt, Report.requeue

    def on_attempt(phase, result, leaves=None):
        if not result.ok:
            losses.attempts.append(f"{result.error.type_name}: {result.error.message}")
        attempt(phase, result, leaves)

    def on_requeue(phase, index):
        losses.outputs.append(index)
        requeue(phase, index)

    monkeypatch.setattr(Report, "attempt", staticmethod(on_attempt))
    monkeypatch.setattr(Report, "requeue", staticmethod(on_requeue))
    return losses


# -- processes ---------------------------------------------------------------------------------


def interpreter_singleton(p: psutil.Process) -> bool:
    """CPython's resource tracker: one per interpreter, it exits with it (not ours to stop)."""
    try:
        return any("resource_tracker import main" in part for part in p.cmdline())
    except psutil.Error:
        return True


def descendants() -> set[psutil.Process]:
    """This interpreter's running descendants (CPython's resource tracker aside)."""
    return {p for p in procs.descendants(os.getpid()) if alive(p) and not interpreter_singleton(p)}


def stop_procs(started: Iterable[int | psutil.Process], grace: float = 15) -> list[int]:
    """Stop processes a test started itself (SIGTERM, ``grace`` seconds, SIGKILL); the PIDs still alive after."""
    started = list(started)
    procs.terminate([p for p in started if alive(p)], grace=grace)
    return [p if isinstance(p, int) else p.pid for p in started if alive(p)]


def assert_gone(seen: dict[psutil.Process, str] | Iterable[psutil.Process], timeout: float = 15) -> None:
    """Processes an engine had must all end within ``timeout`` once it is stopped; any left is killed by
    PID and fails the test."""
    roles = seen if isinstance(seen, dict) else dict.fromkeys(seen, "")
    deadline = time.time() + timeout
    while any(alive(p) for p in roles) and time.time() < deadline:
        time.sleep(0.2)
    left = [(p.pid, role or procs.cmdline(p.pid)[:80]) for p, role in roles.items() if alive(p)]
    procs.kill(p for p in roles if alive(p))
    assert not left, f"processes left behind: {left}"


class Watch(threading.Thread):
    """Records ``sample()`` (processes, or process -> role) every 0.2 s until stopped: engines that start
    and replace processes while a run goes on leave none unseen."""

    def __init__(self, sample: Callable[[], dict[psutil.Process, str] | Iterable[psutil.Process]]) -> None:
        super().__init__(daemon=True)
        self.sample, self.seen, self.done = sample, {}, threading.Event()

    def look(self) -> None:
        try:
            found = self.sample()
        except Exception:  # an engine between states; the next look sees it
            return
        for process, role in (found if isinstance(found, dict) else dict.fromkeys(found, "")).items():
            if role or process not in self.seen:  # a process seen in its role keeps it (e.g. exiting after
                self.seen[process] = role  # the engine let it go, when only its ancestry still shows it)

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.look()

    def __enter__(self) -> Watch:
        self.look()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()
        self.look()


# -- a lost worker -------------------------------------------------------------------------------


def check_worker_loss(ex, files, reference, tmp_path: Path, monkeypatch,
                      victims: Callable[[list[int]], list[psutil.Process]], lost_prefix: str = "",
                      timeout: float = 120) -> dict:
    """SIGKILL ``victims(PIDs running a chunk now)`` once 2 chunks are done and more are to go.

    The output must not change, every chunk must end ok exactly once, and the driver must have
    attempted exactly what was lost again: attempts = chunks + lost attempts + lost outputs.
    """
    losses = record_losses(monkeypatch)
    log, busy, gate = str(tmp_path / "attempts.log"), tmp_path / "busy", str(tmp_path / "gate")
    open(log, "w").close()
    open(gate, "w").close()
    busy.mkdir()
    killed: dict[psutil.Process, list[psutil.Process]] = {}  # victim -> its descendants, seen before the kill

    def killer() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = ex.report.processing
            ok = sum(r.status == "ok" for r in p.rows) if p is not None else 0
            if p is not None and ok >= len(p.rows):
                return  # too late
            # with the gate closed, a process marked busy is inside its attempt until it is killed: without
            # it, a Spark worker seen busy could end its chunk and start the next task's (not yet in the
            # log) before the kill, and the lost attempts would be of chunks never seen started
            with gate_closed(gate):
                running = [int(m.name) for m in busy.iterdir() if alive(int(m.name))]
                try:
                    chosen = victims(running) if ok >= 2 and running else []
                except psutil.Error:  # a process ended meanwhile: look again
                    chosen = []
                for v in chosen:
                    with contextlib.suppress(psutil.Error):  # gone meanwhile: look again
                        below = v.children(recursive=True)
                        v.kill()
                        killed[v] = below
            if killed:
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    t0 = time.time()
    thread.start()
    out = run(ex, files, Busy(log, str(busy), gate), chunksize=100)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert same(out, reference)  # nothing lost, nothing counted twice
    rows = ex.report.rows()
    s = ex.report.summary()
    assert sorted(r.index for r in rows) == list(range(30)) and all(r.status == "ok" for r in rows)
    assert s["processed"] == s["chunks"] == 30 and sum(r.events for r in rows) == 3000
    assert losses.attempts or losses.outputs, ("nothing was lost", [v.pid for v in killed],
                                               [(r.index, r.attempts, r.worker) for r in rows])
    assert s["attempts"] == s["chunks"] + len(losses.attempts) + len(losses.outputs), (s["attempts"], losses)
    tries = attempts(log)
    # every chunk started; the killed one again
    assert len(tries) == 30 and max(tries.values()) >= 2, (tries, losses, [v.pid for v in killed])
    if lost_prefix:
        assert losses.attempts and all(m.startswith(lost_prefix) for m in losses.attempts), losses.attempts
    return {"wall_s": round(time.time() - t0, 1), "attempts": s["attempts"], "lost": sorted(set(losses.attempts)),
            "outputs_lost": losses.outputs, "killed": list(killed),
            "below_killed": [c for below in killed.values() for c in below],
            "retried": [(r.index, r.attempts) for r in rows if r.attempts > 1]}
