"""Test processors (pickled by value, so worker processes need not import this module)."""

from __future__ import annotations

import os
import time

import awkward as ak
import cloudpickle
import hist
import numpy as np
import psutil
import pytest
from coffea import processor
from coffea.nanoevents import NanoAODSchema

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
        if self.sleep:
            time.sleep(self.sleep)
        with open(self.log) as f:
            seen = sum(1 for line in f if line.strip() == key)
        if (self.bad_starts is None or start in self.bad_starts) and seen <= self.fail_times:
            raise ZeroDivisionError(f"planted failure in {key}")
        return super().process(events)


class Busy(Failing):
    """Never fails; a file named after its PID sits in ``busy`` while a chunk runs."""

    def __init__(self, log: str, busy: str) -> None:
        super().__init__(log, bad_starts=set(), sleep=0.3)
        self.busy = busy

    def process(self, events):
        mark = os.path.join(self.busy, str(os.getpid()))
        open(mark, "w").close()
        try:
            return super().process(events)
        finally:
            os.unlink(mark)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
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


def assert_adl_identical(backend, files, chunksize: int = 500, **driver_opts) -> None:
    """All eight ADL queries on ``backend`` are bit-identical to iterative, with one attempt per chunk."""
    import casa_executors
    from benchmarks.adl.queries import QUERIES

    cache: dict = {}  # preprocessing is tested elsewhere; one run fills it for the eight
    for q, cls in QUERIES.items():
        key = (q, tuple(map(str, files)), chunksize)  # iterative's answer, computed once per session
        if key not in _ITERATIVE_ADL:
            _ITERATIVE_ADL[key] = run(casa_executors.iterative(status=False), files, cls(), chunksize=chunksize)
        want = _ITERATIVE_ADL[key]
        ex = casa_executors.Driver(backend=backend, status=False, **driver_opts)
        got = run(ex, files, cls(), chunksize=chunksize, metadata_cache=cache)
        assert same_hists(got, want), f"query {q} differs"
        assert ex.report.summary()["attempts"] == ex.report.summary()["chunks"]


def record_lost_attempts(monkeypatch) -> list[str]:
    """What the driver is told about each failed attempt, as ``Type: message``."""
    from casa_executors.report import Report

    lost: list[str] = []
    record = Report.attempt

    def attempt(phase, result):
        if not result.ok:
            lost.append(f"{result.error.type_name}: {result.error.message}")
        record(phase, result)

    monkeypatch.setattr(Report, "attempt", staticmethod(attempt))
    return lost
