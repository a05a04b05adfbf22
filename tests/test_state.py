"""The driver's rules (casa_executors.state.RunState) driven by scripted events: no engine, no clock.

One rule a test, then properties over random interleavings of completions, failures and losses
(hypothesis): every chunk ends up exactly once in the output or in the failure report, and the
merged output has the bits of the fixed tree's fold.
"""

from __future__ import annotations

import random

import pytest
from coffea.processor.executor import WorkItem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casa_executors.adaptive import Grains
from casa_executors.merge import TreeMerger, node_key
from casa_executors.state import (
    Cancel,
    CheckpointRestored,
    ChunksDone,
    Failed,
    Finish,
    GiveUp,
    LostTooOften,
    MergedHere,
    MergeDone,
    MergeHere,
    MergeTaskFailed,
    Ok,
    OutputsLost,
    Requeue,
    Rules,
    RunState,
    SubmitChunks,
    SubmitMerge,
    TaskFailed,
    Tick,
    WorkersChanged,
)


def of(kind, instructions):
    return [i for i in instructions if isinstance(i, kind)]


def chunks(instructions):
    """The chunks each SubmitChunks asks for, in order."""
    return [[index for _, index in s.nodes] for s in of(SubmitChunks, instructions)]


def merged(children):
    """A merge of real values: the chunks (a tuple, in merge order) and a float sum (left fold)."""
    present = [c.handle for c in children if c.handle is not None]
    out = present[0]
    for h in present[1:]:
        out = (out[0] + h[0], out[1] + h[1])
    return out


def value(i: int) -> tuple[tuple[int, ...], float]:
    return (i,), 0.1 * i + 1e-3 / (i + 1)  # floats whose sum depends on the order of the adds


class Shell:
    """Carries out instructions the simplest way: merges here at once, tasks kept until answered."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.tasks: dict[int, SubmitChunks | SubmitMerge] = {}
        self.log: list = []  # every instruction
        self.root = None

    def feed(self, *events) -> list:
        return self.carry_out(self.state.handle_all(events))

    def carry_out(self, instructions: list) -> list:
        done = []
        queue = list(instructions)
        while queue:
            ins = queue.pop(0)
            done.append(ins)
            self.log.append(ins)
            if isinstance(ins, (SubmitChunks, SubmitMerge)):
                self.tasks[ins.task] = ins
            elif isinstance(ins, MergeHere):
                queue += self.state.handle(MergedHere(ins.group, merged(ins.group.children)))
            elif isinstance(ins, Finish):
                self.root = ins.root
            elif isinstance(ins, Cancel):
                self.tasks.pop(ins.task, None)
        return done

    def ok(self, task: int, **kw) -> list:
        """Task ``task`` succeeds: every node's value."""
        ins = self.tasks.pop(task)
        if isinstance(ins, SubmitMerge):
            return self.feed(MergeDone(task, merged(ins.group.children)))
        outcomes = []
        for level, index in ins.nodes:
            span = self.state.tree.span(level, index)
            outcomes.append(Ok(merged([_H(value(i)) for i in span]), nbytes=kw.get("nbytes", 8),
                               events=len(span), wall_s=kw.get("wall_s", 1.0), worker="w"))
        return self.feed(ChunksDone(task, tuple(outcomes)))

    def fail(self, task: int, error="boom") -> list:
        ins = self.tasks.pop(task)
        return self.feed(ChunksDone(task, tuple(Failed(error) for _ in ins.nodes)))

    def answer(self, chunk: int, error: str | None = None) -> list:
        """The task running chunk ``chunk`` succeeds, or fails with ``error``."""
        task = next(t for t, s in self.tasks.items() if isinstance(s, SubmitChunks) and s.nodes == ((0, chunk),))
        return self.ok(task) if error is None else self.fail(task, error)

    def run_all(self) -> None:
        while self.tasks and self.root is None:
            self.ok(min(self.tasks))


class _H:
    __slots__ = ("handle",)

    def __init__(self, handle) -> None:
        self.handle = handle


def start(n: int, skippable=None, **rules) -> Shell:
    shell = Shell(RunState(n, Rules(**rules), skippable=skippable))
    shell.feed(Tick(0.0))
    return shell


# -- tasks ---------------------------------------------------------------------------------------------


def test_tasks_go_out_in_order_while_the_window_has_room():
    shell = start(10, window=3, batch=2)
    assert chunks(shell.log) == [[0, 1], [2, 3], [4, 5]]
    shell.ok(1)
    assert chunks(shell.log)[-1] == [6, 7]


def test_guided_batches_shrink_with_the_work_left():
    shell = start(100, window=1, batch=10, guided=True)
    sizes = []
    while shell.root is None:
        sizes.append(len(shell.tasks[min(shell.tasks)].nodes))
        shell.ok(min(shell.tasks))
    assert sizes[0] == 10 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    assert sum(sizes) == 100 and shell.root.handle[0] == tuple(range(100))


def test_guided_split_shrinks_tasks_within_one_round_of_submissions():
    """A deep window takes the whole run in one round: once a round, every task is of the first size
    (the last wave part-full); worked out again per task, the round's last tasks are the smallest."""
    once = start(100, window=100, batch=10, guided=True)
    assert [len(s.nodes) for s in of(SubmitChunks, once.log)] == [10] * 10
    per_task = start(100, window=100, batch=10, guided=True, guided_split=4)
    sizes = [len(s.nodes) for s in of(SubmitChunks, per_task.log)]
    assert sizes[:7] == [10] * 7 and sizes[7] == 8 and sizes[-1] == 1  # 10 until a task is a quarter of what is left
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 100
    per_task.run_all()
    assert per_task.root.handle[0] == tuple(range(100))


def test_backends_split_guided_per_task_only_when_tasks_are_at_their_cap():
    from casa_executors.backends.base import Backend

    class Sized(Backend):
        name = "sized"

        def submit(self, fn, arg):
            raise AssertionError("runs nothing")

    small, facility = Sized(2), Sized(10_000)
    assert small.guided_split(40) is None and small.batch_size(40) == 10  # four tasks of 10 on 2 workers
    assert facility.batch_size(1_000_000) == 32 and facility.guided_split(1_000_000) == 20_000
    assert facility.guided_split(32 * 10_000 * facility.tasks_per_worker) is None


def test_a_batch_holding_all_leaves_of_a_node_folds_them():
    shell = start(16, window=1, batch=10, fanin=4)
    (first,) = of(SubmitChunks, shell.log)
    assert first.folds == ((0, 0, 4), (1, 4, 4))  # chunks 0-3 and 4-7: nodes (1, 0) and (1, 1); 8, 9 alone


def test_a_fold_outcome_enters_the_tree_as_its_level_one_node():
    shell = start(4, window=1, batch=4, fanin=4)
    (task,) = shell.tasks
    whole = merged([_H(value(i)) for i in range(4)])
    shell.feed(ChunksDone(task, (Ok(whole, node=0), Ok(None, merged=True), Ok(None, merged=True),
                                 Ok(None, merged=True))))
    assert shell.root.handle == whole and shell.state.attempts == [1, 1, 1, 1]


# -- retries and giving up -----------------------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_a_failing_chunk_is_attempted_exactly_retries_plus_one_times(retries):
    shell = start(3, window=2, retries=retries)
    while shell.root is None:
        task = min(shell.tasks)
        (shell.fail if shell.tasks[task].nodes == ((0, 1),) else shell.ok)(task)
    assert sum(c == [1] for c in chunks(shell.log)) == retries + 1 == shell.state.attempts[1]
    (give_up,) = of(GiveUp, shell.log)
    assert (give_up.index, give_up.reason, give_up.skipped) == (1, "failed", False)
    assert shell.state.abort == (1, "boom") and shell.root.handle[0] == (0, 2)


def test_a_failed_chunk_goes_to_the_back_or_with_retry_at_once_to_the_front():
    shell = start(4, window=1)
    shell.fail(1)
    shell.run_all()
    assert chunks(shell.log) == [[0], [1], [2], [3], [0]]
    shell = start(4, window=1, retry_at_once=True)
    shell.fail(1)
    assert chunks(shell.log) == [[0], [0]]


def test_a_lost_task_sends_its_chunks_again_first_with_a_priority_and_counts_an_attempt():
    shell = start(6, window=2, batch=2, retries=1)
    out = shell.feed(TaskFailed(1, "WorkerLost"))
    shell.tasks.pop(1)
    assert chunks(out) == [[0, 1]] and of(SubmitChunks, out)[0].priority == 1  # before chunks 4-5
    assert chunks(shell.log) == [[0, 1], [2, 3], [0, 1]] and shell.state.attempts[:2] == [1, 1]
    shell.ok(2)
    assert chunks(shell.log)[-1] == [4, 5] and of(SubmitChunks, shell.log)[-1].priority == 0
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(6)) and not of(GiveUp, shell.log)


def test_skipbadfiles_skips_a_chunk_and_the_run_goes_on():
    shell = start(5, window=2, retries=1, skippable=lambda e: e == "OSError")
    while shell.root is None:
        task = min(shell.tasks)
        if shell.tasks[task].nodes == ((0, 2),):
            shell.fail(task, "OSError")
        else:
            shell.ok(task)
    assert shell.state.skipped == [(2, "OSError")] and shell.state.abort is None
    assert shell.root.handle[0] == (0, 1, 3, 4)
    assert [(g.index, g.skipped) for g in of(GiveUp, shell.log)] == [(2, True)]


def test_an_abort_stops_retries_and_gives_up_what_waits_as_not_run():
    shell = start(6, window=2, retries=1)
    shell.answer(0, "KeyError")  # to the back of the queue: 2, 3, 4, 5, 0
    shell.answer(1)
    shell.answer(2, "fatal")  # to the back: 3, 4, 5, 0, 2
    shell.answer(3)
    shell.answer(4)
    shell.answer(5)
    shell.answer(0, "fatal")  # out of attempts: the run aborts; chunk 2's retry (sent) may still come
    assert shell.state.abort == (0, "fatal")
    shell.answer(2, "fatal")  # no more retries after an abort
    assert [(g.index, g.reason) for g in of(GiveUp, shell.log)] == [(0, "failed"), (2, "failed")]
    assert shell.root.handle[0] == (1, 3, 4, 5)


def test_after_an_abort_the_waiting_chunks_are_given_up_as_not_run():
    shell = start(6, window=1, retries=0)
    shell.answer(0)
    shell.answer(1, "fatal")
    assert [(g.index, g.reason, g.error) for g in of(GiveUp, shell.log)] == [
        (1, "failed", "fatal"), (2, "not_run", None), (3, "not_run", None), (4, "not_run", None),
        (5, "not_run", None)]
    assert shell.root.handle[0] == (0,) and shell.state.skipped == []


# -- merges ---------------------------------------------------------------------------------------------


def test_merges_fan_in_left_to_right_on_the_engine_and_the_tail_comes_here():
    shell = start(8, window=8, fanin=2, merges_here=False, tail_bytes=None)
    for task in range(1, 5):
        shell.ok(task)
    merges = of(SubmitMerge, shell.log)
    assert [(m.group.level, m.group.index, [c.index for c in m.group.children]) for m in merges] == [
        (1, 0, [0, 1]), (1, 1, [2, 3])]
    for task in range(5, 9):
        shell.ok(task)
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(8))
    # the last group, ready with nothing else in flight: merged here (the tail rule), the root
    assert [(m.group.level, m.root) for m in of(MergeHere, shell.log)] == [(3, True)]


def test_with_small_outputs_every_merge_left_once_the_chunks_are_in_comes_here():
    shell = start(8, window=8, fanin=2, merges_here=False, tail_bytes=1000)
    for task in range(1, 8):
        shell.ok(task, nbytes=10)
    submitted = len(of(SubmitMerge, shell.log))
    shell.ok(8, nbytes=10)  # the last chunk: no chunk task in flight, outputs small
    assert len(of(SubmitMerge, shell.log)) == submitted
    shell.run_all()
    assert len(of(MergeHere, shell.log)) >= 2 and shell.root.handle[0] == tuple(range(8))


def test_large_outputs_on_an_engine_never_merge_here():
    shell = start(8, window=8, fanin=2, merges_here=False, tail_bytes=100, tail_only_small=True)
    for task in range(1, 9):
        shell.ok(task, nbytes=1000)
    shell.run_all()
    assert not of(MergeHere, shell.log) and shell.root.handle[0] == tuple(range(8))


def test_a_failed_merge_task_is_retried_then_merged_here_from_the_store():
    shell = start(2, window=2, fanin=2, merges_here=False, tail_here=False, retries=1,
                  merge_fallback_here=True)
    shell.ok(1)
    shell.ok(2)
    for _ in range(2):
        (merge,) = of(SubmitMerge, shell.tasks.values())
        shell.tasks.pop(merge.task)
        shell.feed(MergeTaskFailed(merge.task, "engine hiccup"))
    assert len(of(SubmitMerge, shell.log)) == 2 and len(of(MergeHere, shell.log)) == 1
    assert shell.root.handle[0] == (0, 1)


# -- lost outputs ---------------------------------------------------------------------------------------


def test_lost_children_of_a_merge_run_again_and_the_others_are_kept():
    shell = start(4, window=4, fanin=2, merges_here=False, tail_here=False)
    for task in range(1, 5):
        shell.ok(task)
    first = of(SubmitMerge, shell.log)[0]
    shell.tasks.pop(first.task)
    lost = first.group.children[1]  # chunk 1's output
    out = shell.feed(MergeTaskFailed(first.task, "worker died", (lost,)))
    assert of(Requeue, out) == [Requeue(1)] and chunks(out) == [[1]]
    shell.run_all()
    assert shell.root.handle[0] == (0, 1, 2, 3) and shell.state.losses == [0, 1, 0, 0]


def test_an_output_lost_too_often_is_given_up():
    shell = start(2, window=2, fanin=2, merges_here=False, tail_here=False, retries=0)
    shell.answer(0)
    shell.answer(1)
    for losses in (1, 2):
        (merge,) = of(SubmitMerge, shell.tasks.values())
        shell.tasks.pop(merge.task)
        out = shell.feed(MergeTaskFailed(merge.task, "gone", (merge.group.children[0],)))
        assert Requeue(0) in out
        if losses == 1:
            assert chunks(out) == [[0]]
            shell.answer(0)
    (give_up,) = of(GiveUp, shell.log)
    assert give_up.reason == "lost" and give_up.error == LostTooOften(2, "gone")
    assert shell.root.handle[0] == (1,)


def test_outputs_lost_while_held_in_the_tree_are_recomputed():
    shell = start(4, window=4, fanin=4, merges_here=False)
    shell.ok(1)
    shell.ok(2)
    out = shell.feed(OutputsLost((_Node(0, 1),), "preempted"))
    assert chunks(out) == [[1]]
    shell.run_all()
    assert shell.root.handle[0] == (0, 1, 2, 3)


class _Node:
    def __init__(self, level, index):
        self.level, self.index = level, index


def test_a_root_that_cannot_be_fetched_is_computed_again():
    shell = start(2, window=2, fanin=2)
    shell.run_all()
    root = shell.root
    shell.root = None
    out = shell.feed(OutputsLost((root,), "the store lost it"))
    assert sorted(chunks(out)) == [[0], [1]] and not shell.state.finished
    shell.run_all()
    assert shell.root.handle[0] == (0, 1)


# -- checkpoints ----------------------------------------------------------------------------------------


def test_a_resumed_run_runs_only_what_the_checkpoint_lacks():
    state = RunState(8, Rules(window=8, fanin=2, merges_here=False, tail_here=False))
    shell = Shell(state)
    shell.feed(Tick(0.0), CheckpointRestored(((2, 0), (0, 5))))  # chunks 0-3 and 5
    assert chunks(shell.log) == [[4], [6], [7]]
    restored = [c for m in of(SubmitMerge, shell.log) for c in m.group.children]
    assert restored == []  # (2, 0)'s sibling (2, 1) is not in yet
    for task in list(shell.tasks):
        shell.ok(task)
    merges = [m.group for m in of(SubmitMerge, shell.log)]
    assert any(c.handle == node_key(0, 5) for g in merges for c in g.children)
    with pytest.raises(ValueError, match="before any other event"):
        state.handle(CheckpointRestored(((0, 1),)))


def test_a_lost_node_restores_what_the_checkpoint_holds_below_it():
    shell = start(4, window=4, fanin=2, merges_here=False, tail_here=False)
    for task in range(1, 5):
        shell.ok(task)
    upper = of(SubmitMerge, shell.log)[0]
    shell.tasks.pop(upper.task)
    out = shell.feed(MergeTaskFailed(upper.task, "corrupt", tuple(upper.group.children), restored=((0, 0),)))
    assert chunks(out) == [[1]]  # chunk 0 comes from the checkpoint


# -- adaptive chunking ----------------------------------------------------------------------------------


def adaptive(target: float, retries: int = 3) -> Shell:
    # one file, four items of 16,000 entries: two grains each (a node of the binary tree may join items)
    items = [WorkItem("d", "f", "Events", k * 16_000, (k + 1) * 16_000, b"u") for k in range(4)]
    grains = Grains.split(items, 2)
    shell = Shell(RunState(len(grains.leaves), Rules(window=1, fanin=2, retries=retries, target_task_s=target),
                           grains=grains))
    shell.feed(Tick(0.0), WorkersChanged(1))
    return shell


def grains_of(shell: Shell) -> list[int]:
    return [len(shell.state.tree.span(*s.nodes[0])) for s in of(SubmitChunks, shell.log)]


def test_adaptive_tasks_start_as_the_items_then_coalesce_towards_the_target():
    shell = adaptive(target=1e6)
    assert grains_of(shell) == [2]  # before any measurement: the user's item
    shell.run_all()
    assert grains_of(shell) == [2, 2, 4]  # then as big as the tree allows
    assert shell.root.handle[0] == tuple(range(8))


def test_adaptive_tasks_split_when_the_target_is_short():
    shell = adaptive(target=1e-3)
    shell.ok(min(shell.tasks), wall_s=10.0)
    shell.run_all()
    assert grains_of(shell) == [2, 1, 1, 1, 1, 1, 1]  # 10 s for 2 grains: one is still far above 1 ms
    assert shell.root.handle[0] == tuple(range(8))


def test_adaptive_failure_narrows_the_range_and_counts_attempts_per_leaf():
    shell = adaptive(target=1e6, retries=1)
    shell.fail(min(shell.tasks))  # grains 0-1: each runs alone on its last attempt
    shell.run_all()
    assert grains_of(shell) == [2, 2, 4, 1, 1]
    assert shell.root.handle[0] == tuple(range(8)) and shell.state.attempts == [2, 2, 1, 1, 1, 1, 1, 1]


# -- speculation ----------------------------------------------------------------------------------------


def run_but_chunk_zero(shell: Shell, step: float = 1.0) -> list:
    """Answer every task but chunk 0's, one a ``step``, until a copy of chunk 0's is sent."""
    now = shell.state.now
    while True:
        now += step
        out = shell.feed(Tick(now))
        others = [t for t, s in shell.tasks.items() if isinstance(s, SubmitMerge) or s.nodes != ((0, 0),)]
        if others:
            out += shell.ok(min(others))
        dups = [s for s in of(SubmitChunks, out) if s.nodes == ((0, 0),)]
        if dups:
            return dups


def start_with(n: int, workers: int, **rules) -> Shell:
    """The engine's workers known from the start: tasks beyond them are presumed queued."""
    shell = Shell(RunState(n, Rules(**rules)))
    shell.feed(Tick(0.0), WorkersChanged(workers))
    return shell


def test_a_straggler_gets_a_duplicate_first_while_chunks_wait_and_the_first_to_finish_wins():
    shell = start_with(60, 4, window=4, speculate=True, speculate_after=20, speculate_min_s=0.0, speculate_factor=2.0)
    (dup,) = run_but_chunk_zero(shell)
    state = shell.state
    assert state.todo and state.speculated == 1 and dup.priority == 1  # chunks still wait
    # every other task lasted 3 s (3 workers free, one answered a second): 3 s a chunk; the limit 2 x (1 + 2) x 3
    # s, checked from the 20th finished task on
    assert state._rate.median == 3.0 and state._rate.count == 20 and state.now == 20.0
    out = shell.ok(dup.task)
    assert Cancel(1) in out
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(60))
    late = shell.state.handle(ChunksDone(1, (Ok(value(0)),)))  # the original, late: ignored
    assert late == [] and shell.state.attempts[0] == 1


def test_a_task_is_dated_from_its_presumed_start_not_its_submission():
    shell = start_with(8, 2, window=4, speculate=True, speculate_after=1, speculate_min_s=0.0)
    state = shell.state
    assert [state._chunk_tasks[t].started for t in (1, 2, 3, 4)] == [0.0, 0.0, None, None]  # 2 workers
    shell.feed(Tick(5.0))
    shell.ok(2)  # chunk 1 ends at 5 s: chunk 2's task starts now, chunk 3's still waits
    assert state._chunk_tasks[3].started == 5.0 and state._chunk_tasks[4].started is None
    assert state._rate.median == 5.0


def test_copies_of_a_straggler_are_caught_after_their_length_up_to_four_copies():
    shell = start_with(300, 4, window=4, speculate=True, speculate_after=20, speculate_min_s=0.0,
                       speculate_factor=2.0)
    (first,) = run_but_chunk_zero(shell)  # at 2 x (1 + 2) x 3 s: see the test above
    t = shell.state.now
    (second,) = run_but_chunk_zero(shell)  # the original and the first copy are both slow
    # a copy of a task that straggled is caught after once its length, not twice: (1 + 2) x the rate after its
    # presumed start (the next answer), the rate 2-3 s a chunk now (two of the four workers are stuck)
    assert 1 + 3 * 2.0 <= shell.state.now - t <= 1 + 3 * 3.0 < 2 * 3 * 3.0
    (third,) = run_but_chunk_zero(shell)
    assert shell.state.todo and second.priority == third.priority == 1
    assert shell.state.copies(1) == [1, first.task, second.task, third.task]
    shell.feed(Tick(shell.state.now + 1000.0))
    assert shell.state.speculated == 3  # MAX_COPIES
    out = shell.ok(second.task)
    assert set(of(Cancel, out)) == {Cancel(1), Cancel(first.task), Cancel(third.task)}
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(300)) and shell.state.attempts[0] == 1


def test_at_the_end_an_idle_worker_backs_up_a_task_past_its_expected_length():
    shell = start_with(12, 4, window=4, speculate=True, speculate_after=4, speculate_min_s=0.0, speculate_factor=2.0)
    (dup,) = run_but_chunk_zero(shell)  # the others last 3 s: 3 s a chunk
    state = shell.state
    # not a straggler yet (2 x (1 + 2) x 3 s = 18 s), but nothing waits and a worker is idle: past 1 x 3 s
    assert not state.todo and state.now < 18.0 and dup.priority == 1
    shell.ok(dup.task)
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(12))


def test_a_late_merge_task_gets_a_duplicate_and_the_first_to_finish_wins():
    shell = start_with(16, 16, window=16, fanin=4, merges_here=False, tail_here=False, speculate=True,
                       speculate_after=2, speculate_min_s=0.0)
    shell.feed(Tick(1.0))
    for task in sorted(shell.tasks):
        shell.ok(task)  # chunk tasks and the merges they make ready, one at a time, all at 1 s
    merges = sorted(t for t, s in shell.tasks.items() if isinstance(s, SubmitMerge))
    assert merges and all(s.priority == 1 for s in of(SubmitMerge, shell.log))  # merges go first
    shell.feed(Tick(2.0))
    for task in merges[:2]:
        shell.ok(task)  # 1 s each
    slow = min(t for t, s in shell.tasks.items() if isinstance(s, SubmitMerge))
    out = shell.feed(Tick(10.0))
    (dup,) = [m for m in of(SubmitMerge, out) if m.group is shell.tasks[slow].group]
    assert dup.priority == 1
    assert Cancel(slow) in shell.ok(dup.task)
    assert shell.state.handle(MergeDone(slow, ((), 0.0))) == []  # the original, late: ignored
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(16))


def test_a_lost_copy_is_dropped_while_its_duplicate_runs():
    shell = start_with(40, 4, window=4, speculate=True, speculate_after=20, speculate_min_s=0.0)
    (dup,) = run_but_chunk_zero(shell)
    assert shell.state.duplicated(1) and shell.state.duplicated(dup.task)
    shell.tasks.pop(1)
    assert shell.feed(TaskFailed(1, "WorkerLost")) == [] and shell.state.attempts[0] == 0
    shell.ok(dup.task)
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(40)) and not of(GiveUp, shell.log)


def test_a_straggler_whose_copy_is_lost_gets_another_copy_at_once():
    # the straggler's watch entry went when it was copied: without a new one it waited for the run's end
    shell = start_with(60, 4, window=4, speculate=True, speculate_after=20, speculate_min_s=0.0)
    (dup,) = run_but_chunk_zero(shell)
    shell.tasks.pop(dup.task)
    out = shell.feed(TaskFailed(dup.task, "WorkerLost"))
    (again,) = [s for s in of(SubmitChunks, out) if s.nodes == ((0, 0),)]
    assert again.priority == 1 and shell.state.todo and shell.state.copies(1) == [1, again.task]
    shell.ok(again.task)
    shell.run_all()
    assert shell.root.handle[0] == tuple(range(60)) and shell.state.attempts[0] == 1


def test_tasks_that_end_while_presumed_queued_still_give_the_rate():
    # the presumed-running task 2 is stuck (behind a straggler on its worker): tasks 3.. run elsewhere, each
    # while presumed queued; without their samples no rate, so no speculation, ever
    shell = start_with(40, 2, window=6, speculate=True, speculate_after=4, speculate_min_s=0.0)
    for step in range(1, 5):
        shell.feed(Tick(float(step)))
        shell.ok(min(t for t in shell.tasks if t > 2))
    state = shell.state
    assert state._chunk_tasks[1].started == state._chunk_tasks[2].started == 0.0  # still presumed running
    assert state._rate.count == 4 and state._rate.median == 1.0  # dated from the previous end
    dups = run_but_chunk_zero(shell)
    assert dups[0].priority == 1


def test_no_speculation_before_enough_tasks_finished():
    shell = start_with(30, 2, window=2, speculate=True, speculate_after=20, speculate_min_s=0.0)
    out = shell.feed(Tick(1e6))
    assert not of(SubmitChunks, out)  # nothing finished yet: no rate to compare with


def test_with_speculation_a_task_carries_at_most_a_share_of_the_chunks_left_for_its_copies():
    # tasks of at most 1/((2 x speculate_factor + 1) x workers) of what is left, so that a straggler caught
    # after speculate_factor times its length, and a duplicate that straggles too, still end with the run
    plain = start_with(1_000, 10, window=20, batch=32, guided=True, guided_split=20)
    assert len(of(SubmitChunks, plain.log)[0].nodes) == 32
    for factor, split in ((2.0, 50), (1.5, 40)):
        spec = start_with(1_000, 10, window=20, batch=32, guided=True, guided_split=20, speculate=True,
                          speculate_factor=factor)
        assert len(of(SubmitChunks, spec.log)[0].nodes) == 1_000 // split


# -- properties -----------------------------------------------------------------------------------------


class RandomShell(Shell):
    """Answers tasks in a random order; chunks fail, tasks and outputs get lost at random."""

    def __init__(self, state: RunState, rng: random.Random, p_fail: float, p_lost: float, bad: set[int]) -> None:
        super().__init__(state)
        self.rng, self.p_fail, self.p_lost, self.bad = rng, p_fail, p_lost, bad
        self.now = 0.0
        self.late: list = []  # cancelled copies whose results still come: (task, its submission)

    def carry_out(self, instructions: list) -> list:
        queue, done = list(instructions), []
        while queue:
            ins = queue.pop(0)
            done.append(ins)
            self.log.append(ins)
            if isinstance(ins, (SubmitChunks, SubmitMerge)):
                self.tasks[ins.task] = ins
            elif isinstance(ins, MergeHere):
                lost = [c for c in ins.group.children if c.handle is not None and self.rng.random() < self.p_lost]
                event = (OutputsLost(tuple(lost), "lost while merging here", ins.group) if lost
                         else MergedHere(ins.group, merged(ins.group.children)))
                queue += self.state.handle(event)
            elif isinstance(ins, Finish):
                if ins.root.handle is not None and self.rng.random() < self.p_lost:
                    queue += self.state.handle(OutputsLost((ins.root,), "the root's fetch failed"))
                else:
                    self.root = ins.root
            elif isinstance(ins, Cancel):
                cancelled = self.tasks.pop(ins.task, None)
                if cancelled is not None and self.rng.random() < 0.5:
                    self.late.append((ins.task, cancelled))
        return done

    def step(self) -> None:
        rng = self.rng
        self.now += rng.random()
        if self.late and rng.random() < 0.3:  # a cancelled copy's result comes after all: ignored
            task, ins = self.late.pop()
            if isinstance(ins, SubmitMerge):
                late = MergeDone(task, merged(ins.group.children))
            elif rng.random() < 0.5:
                late = ChunksDone(task, tuple(Ok(merged([_H(value(i)) for i in self.state.tree.span(*node)]))
                                              for node in ins.nodes))
            else:
                late = TaskFailed(task, "cancelled")
            self.feed(Tick(self.now), late)
            return
        task = rng.choice(list(self.tasks))
        ins = self.tasks.pop(task)
        if isinstance(ins, SubmitMerge):
            lost = [c for c in ins.group.children if c.handle is not None and rng.random() < self.p_lost]
            if lost or rng.random() < self.p_fail:
                self.feed(Tick(self.now), MergeTaskFailed(task, "merge lost", tuple(lost)))
            else:
                self.feed(Tick(self.now), MergeDone(task, merged(ins.group.children)))
            return
        if rng.random() < self.p_lost:
            self.feed(Tick(self.now), TaskFailed(task, "WorkerLost"))
            return
        outcomes = []
        for level, index in ins.nodes:
            span = self.state.tree.span(level, index)
            if any(i in self.bad for i in span) or rng.random() < self.p_fail:
                outcomes.append(Failed(rng.choice(["OSError", "fatal"])))
            else:
                outcomes.append(Ok(merged([_H(value(i)) for i in span]), nbytes=rng.choice([1, 10**9])))
        self.feed(Tick(self.now), ChunksDone(task, tuple(outcomes)))
        if rng.random() < self.p_lost:  # a worker dies with outputs the tree holds
            held = [n for n in self.state.tree.held_nodes() if n.handle is not None]
            if held:
                self.feed(OutputsLost((rng.choice(held),), "preempted"))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 40), fanin=st.integers(2, 4), batch=st.integers(1, 4),
       window=st.integers(1, 6), retries=st.integers(0, 3), merges_here=st.booleans(),
       tail_bytes=st.sampled_from([None, 100]), fallback=st.booleans(), speculate=st.booleans(), skip=st.booleans(),
       p_fail=st.sampled_from([0.0, 0.1, 0.3]), p_lost=st.sampled_from([0.0, 0.05, 0.2]),
       bad=st.sets(st.integers(0, 39), max_size=3), workers=st.sampled_from([None, 1, 3]))
def test_every_chunk_ends_once_in_the_output_or_the_report_with_the_bits_of_the_tree(
        seed, n, fanin, batch, window, retries, merges_here, tail_bytes, fallback, speculate, skip, p_fail, p_lost,
        bad, workers):
    rules = Rules(retries=retries, fanin=fanin, batch=batch, window=window, merges_here=merges_here,
                  tail_bytes=tail_bytes, merge_fallback_here=fallback, speculate=speculate, speculate_after=2,
                  speculate_min_s=0.0, speculate_factor=1.5)
    state = RunState(n, rules, skippable=(lambda e: e == "OSError") if skip else None)
    shell = RandomShell(state, random.Random(seed), p_fail, p_lost, bad)
    shell.feed(Tick(0.0), *([WorkersChanged(workers)] if workers else []))  # None: tasks start when sent
    for _ in range(20_000):
        if shell.root is not None:
            break
        assert shell.tasks, "the tree is incomplete with nothing left to run"
        shell.step()
    assert shell.root is not None
    given_up = [g.index for g in of(GiveUp, shell.log)]
    output = shell.root.handle[0] if shell.root.handle is not None else ()
    assert len(set(given_up)) == len(given_up), "a chunk given up twice"
    assert sorted(given_up + list(output)) == list(range(n)), "a chunk missing or twice"
    assert list(output) == sorted(output), "merged out of chunk order"
    for g in of(GiveUp, shell.log):
        assert state.failures[g.index] <= retries + 1 and state.losses[g.index] <= retries + 2
        assert g.reason != "failed" or state.failures[g.index] == retries + 1 or state.abort is not None
    expected = TreeMerger(n, fanin)
    for i in range(n):
        expected.add(i, value(i)[1] if i in output else None)
    assert (shell.root.handle[1] if shell.root.handle is not None else None) == expected.result  # same bits


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), lengths=st.lists(st.integers(500, 40_000), min_size=1, max_size=8),
       files=st.integers(1, 3), target=st.sampled_from([1e-4, 0.05, 1e6]), workers=st.integers(1, 8),
       retries=st.integers(0, 2), p_fail=st.sampled_from([0.0, 0.2]), p_lost=st.sampled_from([0.0, 0.1]))
def test_adaptive_tasks_keep_every_chunk_exactly_once(seed, lengths, files, target, workers, retries, p_fail,
                                                      p_lost):
    rng = random.Random(seed)
    items, start = [], {}
    for length in lengths:
        name = f"f{rng.randrange(files)}"
        begin = start.get(name, 0)
        items.append(WorkItem("d", name, "Events", begin, begin + length, name.encode()))
        start[name] = begin + length
    grains = Grains.split(items, 2)
    n = len(grains.leaves)
    state = RunState(n, Rules(retries=retries, fanin=2, window=workers, merges_here=False, target_task_s=target),
                     skippable=lambda e: True, grains=grains)
    shell = RandomShell(state, rng, p_fail, p_lost, set())
    shell.feed(Tick(0.0), WorkersChanged(workers))
    for _ in range(20_000):
        if shell.root is not None:
            break
        shell.step()
    assert shell.root is not None
    given_up = [g.index for g in of(GiveUp, shell.log)]
    output = shell.root.handle[0] if shell.root.handle is not None else ()
    assert sorted(given_up + list(output)) == list(range(n)) and list(output) == sorted(output)
    for s in of(SubmitChunks, shell.log):  # a task is one node whose grains are one stretch of one file
        (node,) = s.nodes
        span = shell.state.tree.span(*node)
        assert grains.segment[span.start] == grains.segment[span.stop - 1]
    assert max(state.failures) <= retries + 1


def test_workers_changed_widens_the_window():
    shell = start(10, window=2)
    assert len(shell.tasks) == 2
    out = shell.feed(WorkersChanged(4, window=5))
    assert len(of(SubmitChunks, out)) == 3 and shell.state.workers == 4


# -- the driver's shell ---------------------------------------------------------------------------------


def test_the_driver_with_speculation_on_a_process_pool_gives_iteratives_output(sample_files, monkeypatch):
    """Driver(speculate=True), outputs merged here: the rules speculate, get the pool's workers
    (WorkersChanged) and date tasks from their presumed start; the output and the report are those of
    iterative."""
    from analysis import run, same

    import casa_executors as ce
    import casa_executors.driver as driver_module
    from casa_executors.backends.futures import FuturesBackend

    states: list[RunState] = []

    class Kept(RunState):  # the real rules, kept to look at after the run
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            states.append(self)

    monkeypatch.setattr(driver_module, "RunState", Kept)
    ex = driver_module.Driver(backend=FuturesBackend(workers=2), status=False, speculate=True, merge="driver")
    out = run(ex, sample_files, chunksize=20)
    processing = states[-1]
    assert same(out, run(ce.iterative(status=False), sample_files, chunksize=20))
    assert processing.rules.speculate and processing.workers == 2 and processing._workers_known
    s = ex.report.summary()
    assert s["processed"] == s["chunks"] == 150 and len(ex.report.processing.rows) == 150
