"""Full garbage collections leave alone the heap a process had before a run (casa_executors.heap).

A full pass of CPython's collector over a coffea process's imports took 50-100 ms here, once every
20-40 chunks of a light query. While a run or a task lasts, the objects alive when it began are set
aside (gc.freeze) and given back after: these tests check that chunks run with the heap set aside on
the caller's thread and on workers, that it is given back after (garbage among it is collected then),
that overlapping runs share one freeze, and that a process which froze objects itself is left alone;
and that the young generation's threshold is raised while a run lasts, unless its owner chose one.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
from analysis import require_engine, run
from coffea import processor

import casa_executors
from casa_executors.heap import YOUNG, old_heap_frozen


class FrozenWhileRunning(processor.ProcessorABC):
    """How many chunks ran with objects set aside from the collector."""

    def process(self, events):
        return {"frozen": processor.value_accumulator(int, int(gc.get_freeze_count() > 0)),
                "young": processor.value_accumulator(int, int(gc.get_threshold()[0] >= YOUNG)),
                "chunks": processor.value_accumulator(int, 1)}

    def postprocess(self, accumulator):
        return accumulator


@pytest.mark.parametrize("backend", ["iterative", "futures"])
def test_chunks_run_with_the_old_heap_set_aside(backend, sample_files, no_leftover_processes):
    require_engine(backend)
    assert gc.get_freeze_count() == 0
    ex = casa_executors.create(backend, status=False, **({} if backend == "iterative" else {"workers": 2}))
    out = run(ex, sample_files, FrozenWhileRunning(), chunksize=250)
    assert out["chunks"].value == 12
    assert out["frozen"].value == 12 and out["young"].value == 12
    assert gc.get_freeze_count() == 0, "the caller's heap is given back after the run"
    assert gc.get_threshold()[0] < YOUNG


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_garbage_set_aside_is_collected_after():
    cycle = Cycle()
    alive = weakref.ref(cycle)
    with old_heap_frozen():
        assert gc.get_freeze_count() > 0
        del cycle
        gc.collect()
        assert alive() is not None, "set aside: not collected while the run lasts"
    gc.collect()
    assert alive() is None
    assert gc.get_freeze_count() == 0


def test_overlapping_runs_share_one_freeze():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def second():
        first_in.wait()
        with old_heap_frozen():
            second_in.set()
            first_out.wait()
            seen["after the first ended"] = gc.get_freeze_count()

    t = threading.Thread(target=second)
    t.start()
    with old_heap_frozen():
        frozen = gc.get_freeze_count()
        first_in.set()
        second_in.wait()
    first_out.set()
    t.join()
    assert frozen > 0
    # (a few of the objects set aside are freed meanwhile: their reference count fell to 0)
    assert seen["after the first ended"] > frozen // 2, "the first to end does not give the heap back"
    assert gc.get_freeze_count() == 0, "the last to end does"


def _tracked(objects: list) -> list[bool]:
    """Which of ``objects`` the collector tracks in generations 0-2, i.e. which are not frozen."""
    ids = {id(o) for o in gc.get_objects()}
    return [id(o) in ids for o in objects]


def test_a_process_that_froze_objects_itself_is_left_alone():
    # Judged by objects of the test's own, not by gc.get_freeze_count(): other threads of this process (engines
    # of earlier tests stopping) may free frozen objects meanwhile, which lowers the count.
    theirs = [[] for _ in range(50)]
    gc.freeze()
    try:
        after = [[] for _ in range(50)]
        assert _tracked(theirs) == [False] * 50 and _tracked(after) == [True] * 50
        with old_heap_frozen():
            assert _tracked(after) == [True] * 50, "ours must not freeze on top of the owner's freeze"
        assert _tracked(theirs) == [False] * 50, "ours must not unfreeze what the owner froze"
    finally:
        gc.unfreeze()


def test_collector_turned_off_is_left_alone():
    gc.disable()
    try:
        with old_heap_frozen():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_the_young_generation_is_collected_less_often_while_a_run_lasts():
    before = gc.get_threshold()
    assert before[0] < YOUNG
    with old_heap_frozen():
        assert gc.get_threshold() == (YOUNG, *before[1:])
        with old_heap_frozen():  # overlapping: still ours
            assert gc.get_threshold()[0] == YOUNG
        assert gc.get_threshold()[0] == YOUNG
    assert gc.get_threshold() == before


def test_a_threshold_set_during_a_run_or_above_ours_is_left_alone():
    before = gc.get_threshold()
    try:
        with old_heap_frozen():
            gc.set_threshold(123, *before[1:])  # the owner's choice, made while the run lasts
        assert gc.get_threshold()[0] == 123
        gc.set_threshold(YOUNG * 2, *before[1:])
        with old_heap_frozen():
            assert gc.get_threshold()[0] == YOUNG * 2
        assert gc.get_threshold()[0] == YOUNG * 2
    finally:
        gc.set_threshold(*before)
