"""The one guarded boundary to coffea's and uproot's internals (casa_executors.internals).

The eight ADL queries give the same bits with the optimisations that rest on those internals on and off
(``internals=`` and ``CASA_EXECUTORS_INTERNALS``), and off is coffea's own executor's output; an
internal made to look unexpected (as a new release could) is warned about once and the plain path gives
the same bits; the patches are in place only while a task of ours runs with the switch on.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from importlib.metadata import version

import pytest
from coffea import processor
from coffea.nanoevents import BaseSchema, NanoAODSchema
from coffea.nanoevents.mapping.uproot import UprootSourceMapping
from coffea.processor.executor import Runner, WorkItem
from uproot.behaviors.TBranch import TBranch
from uproot.models.TBasket import Model_TBasket

import casa_executors
from casa_benchmarks.adl.generate import generate
from casa_benchmarks.adl.queries import HISTOGRAMS, QUERIES
from casa_executors import internals, nanoforms
from casa_executors.errors import ExecutorOptionError
from casa_executors.task import ChunkTask, TaskBatch, run_batch

pytestmark = pytest.mark.filterwarnings("ignore:Branch Photon_:RuntimeWarning")
CHUNK = 700  # the files are written in baskets of 1000 events: most chunk edges cut one
PATCHED = ["UprootSourceMapping._extract_base_form", "NanoEventsFactory._from_mapping", "HasBranches.typenames", "TBranch.entries_to_ranges_or_baskets",
           "Model_TBasket.read"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """Two files of generated ADL events (86 branches), distinct UUIDs, baskets of 1000 events."""
    return generate(tmp_path_factory.mktemp("adl"), 6000, files=2, seed=7, batch=1000).files


def _run(executor, files, query: int, schema=NanoAODSchema, proc=None) -> dict:
    # a metadata cache of its own: every run reads each file's TTree in its metadata step, on or off
    runner = processor.Runner(executor=executor, schema=schema, chunksize=CHUNK, metadata_cache={})
    return runner({"adl": files}, proc or QUERIES[query](), treename="Events")


def _bytes(executor) -> int:
    return sum(r.bytes_read for r in executor.report.rows())


def _assert_same_bits(got: dict, want: dict, query: int) -> None:
    assert got["events"] == want["events"] == 6000
    for name in HISTOGRAMS[query]:
        a, b = got[name], want[name]
        assert a.axes == b.axes and a.storage_type == b.storage_type, name
        assert a.view(flow=True).tobytes() == b.view(flow=True).tobytes(), f"query {query}: {name} differs"


@pytest.fixture(scope="module")
def off(dataset) -> dict[int, tuple[dict, int]]:
    """Each query's output and bytes read with the optimisations off."""
    out = {}
    for query in range(1, 9):
        ex = casa_executors.iterative(status=False, internals=False)
        out[query] = (_run(ex, dataset, query), _bytes(ex))
    return out


def test_adl_queries_give_the_same_bits_with_internals_on_and_off(dataset, off):
    for query in range(1, 9):
        on = casa_executors.iterative(status=False)
        _assert_same_bits(_run(on, dataset, query), off[query][0], query)
        # not vacuous: on, a basket a chunk edge cuts is read once, not by both chunks (the TTree's reads are
        # kept for the run either way: source.SmallReads)
        assert _bytes(on) < off[query][1], (query, _bytes(on), off[query][1])
        # off is coffea's own path: coffea's executor gives the same bits
        _assert_same_bits(_run(processor.IterativeExecutor(), dataset, query), off[query][0], query)


class Observed(processor.ProcessorABC):
    """What a chunk sees: whether its task may use the internals, and which patches are in place."""

    def process(self, events):
        return {"n": len(events), "seen": {(internals.active(), tuple(internals.installed()))}}

    def postprocess(self, accumulator):
        return accumulator


def test_the_switch_reaches_the_chunk_and_the_patches_are_in_place_only_meanwhile(dataset, monkeypatch):
    def seen(**options) -> set:
        return _run(casa_executors.iterative(status=False, **options), dataset, 0, BaseSchema, Observed())["seen"]

    assert seen() == {(True, tuple(PATCHED))}
    assert internals.installed() == []
    assert seen(internals=False) == {(False, ())}
    monkeypatch.setenv(internals.ENV, "0")
    assert seen() == {(False, ())}
    for value in ("false", "off", "No"):
        monkeypatch.setenv(internals.ENV, value)
        assert not internals.env_allows()
    monkeypatch.setenv(internals.ENV, "1")
    assert seen() == {(True, tuple(PATCHED))}


def test_the_switch_crosses_to_worker_processes(dataset, no_leftover_processes):
    """With the task batch: a futures worker (another process) obeys the executor's option."""
    for option, want in ((False, {(False, ())}), (True, {(True, tuple(PATCHED))})):
        ex = casa_executors.futures(workers=1, status=False, internals=option)
        try:
            assert _run(ex, dataset, 0, BaseSchema, Observed())["seen"] == want, option
        finally:
            ex.close()


def test_a_worker_reads_the_environment_too(dataset, monkeypatch):
    """The batch says on (the driver's option and environment); the worker's environment says off."""
    item = WorkItem("adl", dataset[0], "Events", 0, 10, "uuid", None)

    def observe(_item):
        return (internals.active(), tuple(internals.installed()))

    batch = TaskBatch(observe, [ChunkTask(0, item, 1)])
    assert batch.internals is True and run_batch(batch)[0].output == (True, tuple(PATCHED))
    monkeypatch.setenv(internals.ENV, "0")
    assert run_batch(batch)[0].output == (False, ())
    assert TaskBatch(observe, [ChunkTask(0, item, 1)]).internals is False  # the driver's environment


def test_the_patches_go_when_a_task_fails_and_other_threads_get_the_originals():
    before = [UprootSourceMapping.__dict__["_extract_base_form"], TBranch.__dict__["entries_to_ranges_or_baskets"],
              "read" in Model_TBasket.__dict__]
    inside = threading.Event()
    leave = threading.Event()
    other: list = []

    def task():
        with internals.allowed():
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=task)
    t.start()
    try:
        assert inside.wait(30)
        # this thread runs no task of ours: it goes through the wrapper to coffea's own function
        other.append(internals.active())
        with pytest.raises(ZeroDivisionError), internals.allowed():
            assert internals.active() and internals.installed() == PATCHED
            1 / 0  # noqa: B018
        assert internals.installed() == PATCHED, "still in place: the other thread's task runs"
    finally:
        leave.set()
        t.join(30)
    assert other == [False] and internals.installed() == []
    assert [UprootSourceMapping.__dict__["_extract_base_form"], TBranch.__dict__["entries_to_ranges_or_baskets"],
            "read" in Model_TBasket.__dict__] == before


def test_an_unexpected_internal_is_warned_about_once_and_the_output_is_the_same(dataset, off, monkeypatch):
    """coffea's form function and uproot's basket ranges made to look as a new release might (another
    signature); the other patch stays in place."""
    monkeypatch.setattr(internals, "_warned", set())
    monkeypatch.setattr(nanoforms, "_forms", type(nanoforms._forms)())
    coffeas = UprootSourceMapping.__dict__["_extract_base_form"].__func__
    uproots = TBranch.entries_to_ranges_or_baskets

    def _extract_base_form(cls, tree, iteritems_options={}, extra=None):  # noqa: B006
        return coffeas(cls, tree, iteritems_options)

    def entries_to_ranges_or_baskets(self, start, stop):
        return uproots(self, start, stop)

    monkeypatch.setattr(UprootSourceMapping, "_extract_base_form", classmethod(_extract_base_form))
    monkeypatch.setattr(TBranch, "entries_to_ranges_or_baskets", entries_to_ranges_or_baskets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for query in (1, 6, 1):
            on = casa_executors.iterative(status=False)
            _assert_same_bits(_run(on, dataset, query), off[query][0], query)
            seen = _run(casa_executors.iterative(status=False), dataset, 0, BaseSchema, Observed())["seen"]
            assert seen == {(True, ("NanoEventsFactory._from_mapping", "HasBranches.typenames", "Model_TBasket.read"))}
    ours = [str(w.message) for w in caught if issubclass(w.category, internals.InternalsWarning)]
    assert len(ours) == 2, ours
    form, ranges = sorted(ours)
    assert "coffea " + version("coffea") in form and "UprootSourceMapping._extract_base_form" in form
    assert "parameters (cls, tree, iteritems_options, extra)" in form and "CASA_EXECUTORS_INTERNALS=0" in form
    assert "uproot " + version("uproot") in ranges and "TBranch.entries_to_ranges_or_baskets" in ranges
    assert not nanoforms._forms, "coffea's function was wrapped all the same"


def test_an_unexpected_retry_loop_is_left_to_coffea(dataset, off, monkeypatch):
    """Runner's automatic_retries with another signature: the driver does not take it off (coffea's loop
    runs in each attempt), warns once, and the output is the same."""
    monkeypatch.setattr(internals, "_warned", set())
    coffeas = Runner.automatic_retries

    def automatic_retries(attempts, skipbadfiles, func, *args, **kwargs):
        return coffeas(attempts, skipbadfiles, func, *args, **kwargs)

    monkeypatch.setattr(Runner, "automatic_retries", staticmethod(automatic_retries))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _assert_same_bits(_run(casa_executors.iterative(status=False), dataset, 2), off[2][0], 2)
    ours = [str(w.message) for w in caught if issubclass(w.category, internals.InternalsWarning)]
    assert len(ours) == 1 and "Runner.automatic_retries" in ours[0] and "(attempts, skipbadfiles" in ours[0], ours
    loop = functools.partial(automatic_retries, 1, True, len)
    assert internals.unwrap_runner_retries(loop) == (loop, False, False)


def test_runner_retries_are_unwrapped():
    partial = functools.partial(Runner.automatic_retries, 2, (OSError,), len)
    assert internals.unwrap_runner_retries(partial) == (len, (OSError,), False)
    assert internals.unwrap_runner_retries(len) == (len, False, False)
    if "use_result_type" in inspect.signature(Runner.automatic_retries).parameters:
        typed = functools.partial(Runner.automatic_retries, 0, True, len, use_result_type=True)
        assert internals.unwrap_runner_retries(typed) == (len, True, True)


def test_the_runner_probe(monkeypatch):
    """The probe agrees with coffea's code; a Runner that breaks the probe is warned about."""
    assert internals.runner_raises_returned() is ("partial_output" in inspect.getsource(Runner))
    monkeypatch.setattr(internals, "_warned", set())

    def broken(self, *args, **kwargs):
        raise TypeError("a Runner of another shape")

    monkeypatch.setattr(Runner, "__call__", broken)
    with pytest.warns(internals.InternalsWarning, match="TypeError: a Runner of another shape"):
        assert internals.runner_raises_returned.__wrapped__() is False


def test_the_option_is_checked():
    with pytest.raises(ExecutorOptionError, match="internals must be True or False, got 'no'"):
        casa_executors.iterative(internals="no")


def test_the_exception_chain_is_coffeas():
    from coffea.util import _exception_chain

    try:
        try:
            raise KeyError("inner")
        except KeyError:
            raise ValueError("outer") from OSError("cause")
    except ValueError as exc:
        assert internals.exception_chain(exc) == _exception_chain(exc)
        assert [type(e) for e in internals.exception_chain(exc)] == [ValueError, OSError]
    assert internals.exception_chain(None) == []
