"""A facility of 10 to 10,000 workers, simulated over the driver's real rules (``casa_executors.state``).

    python -m casa_benchmarks.facility_sim --workers 10000 --chunks 1000000 --json bench-out/sim.json \\
        [--plot bench-out/sim.png] [--loss-rate 0.01] [--stragglers 0.01] [--straggler-factor 10] \\
        [--preempt-rate 0.05] [--join-over 60] [--round-trip-ms 13] [--loss-detect-s 5] [--no-priorities] \\
        [--speculate] [--seed 1]

A discrete-event simulation (a heap of ``(time, seq, event)``) plays the engine and the workers; every
decision (what a task carries, how many are in flight, retries, merges and the tail, speculation) is
:class:`casa_executors.state.RunState`'s, fed the events a driver's shell would feed it.

The model
    * **Workers** join at ``t = 0``, or, with ``--join-over S``, at times drawn uniformly in ``[0, S]`` (a batch
      queue starting jobs, an autoscaler). ``--preempt-rate p``: a fraction ``p`` of the workers leave for
      good (pre-emption) at a time drawn uniformly in ``[join, join + T0]``, ``T0`` the no-fault estimate
      ``join_over / 2 + work / workers``; what such a worker runs is lost.
    * **The engine** queues tasks first in, first out, those sent with a priority (retries of lost tasks,
      duplicates, merges: ``SubmitChunks.priority``) before the others, as Dask's ``priority=`` and Work
      Queue's ``specify_priority`` do (``--no-priorities``: one queue, as an engine without them), and starts
      one on each idle worker (one task a worker, as ``threads_per_worker=1``). A cancelled task that has
      started runs on to its end (as a Dask worker thread does), its result dropped; ``--cancel-stops``:
      the cancellation stops it half a round trip later and frees its worker (as Work Queue kills it). A task reaches it half a round trip after the driver submitted it, and
      its result reaches the driver half a round trip after it ended (``--round-trip-ms``, default 13: dask's
      here, docs/performance.md). ``--engine-tasks-per-s R``: the engine starts at most ``R`` tasks a second
      (a scheduler's throughput; default unlimited).
    * **Chunks** last a duration drawn (with replacement, seeded) from the per-chunk wall times measured on
      ADL queries (``casa_benchmarks/chunk_durations.json``, ``--durations Q1|Q6|Q8|mix`` or ``const:MS``); a task
      lasts the sum of its chunks. ``--stragglers s``: a fraction ``s`` of task runs take
      ``--straggler-factor`` times longer. ``--loss-rate l``: the worker of a fraction ``l`` of task runs
      (merge tasks too) is lost at a uniform point of the run; a new worker takes its place after
      ``--replace-s``. The engine notices ``--loss-detect-s`` later (default 5 s: a node that goes silent is
      found by a heartbeat timeout, not at once; Dask's ``worker-ttl`` default is 300 s, a killed worker
      process closes its connection at once: ``--loss-detect-s 0``), and the task fails then
      (``TaskFailed``). A pre-empted worker (``--preempt-rate``) is noticed at once (it closes its connection). Merge tasks last ``--merge-ms``; merges the rules do "here" cost no simulated
      time. Outputs live in a store the workers share (a lost worker loses only what it runs).
    * **The driver** feeds ``Tick(now)`` and each result as it arrives, and ``WorkersChanged`` with the
      workers present at the start and, when it changed, at its 0.25 s ticks (as the real driver asks its
      backend); ``MergeHere`` is answered at once. The rules are the real driver's for Dask with outputs on
      the engine (``driver.run_rules``): the batch from ``Backend.batch_size`` (guided), a window of
      ``4 x 2 x workers`` tasks (``EnginePlacement.window``), merges on the engine, the tail rule when the
      outputs are small; ``--speculate`` and its knobs as ``Rules`` has them, but ``--speculate-min-s``
      0.1 s (the driver's 10 s floor is for real tasks, not these of 1-2 s).

Every chunk's output is a bitmask handle; merges check no chunk is in two children and the root must hold
exactly the chunks not given up: every chunk exactly once in the output or in the failure report.

What is measured
    * ``makespan_s`` (simulated) against ``bound_s``, the lower bound with the same workers:
      ``max(rt/2 + tau, max(rt/2, first join) + longest chunk + rt/2)`` where ``tau`` is the first time by
      which the workers present between ``rt/2`` and ``tau`` (joins and pre-emptions as drawn) have had as
      many worker-seconds as the run's nominal work (the sum of the chunk durations, no straggling, no
      losses, no merges). ``makespan_over_bound`` is their ratio.
    * ``idle_fraction``: 1 - busy worker-seconds / worker-seconds present before the end (busy includes
      lost partial runs and cancelled duplicates, reported as ``wasted_s``).
    * ``driver_us_per_chunk``: CPU of the rules, ``time.process_time()`` read just before and after each
      ``RunState.handle_all`` call and summed, divided by the chunks. It is honest because the simulation is
      single-threaded (process CPU between the two reads is the rules' own, plus any garbage-collection pass
      their allocations trigger), and conservative: the two reads' own cost is included (``timer_us``, the
      cost of a pair of reads, is reported so it can be taken off). The engine, the workers and the merges
      are outside the reads. ``driver_cpu_over_makespan`` compares it with the simulated makespan: above 1
      a real driver could not keep up with this facility.
    * ``rss_mb``: the process's peak RSS (``ru_maxrss``: simulator and rules together), ``rss_before_mb`` its
      RSS before the rules were made.
    * ``tasks``, ``speculated``, ``retried``, ``lost_runs``, ``stragglers``, the peak of tasks in flight,
      and a time series (``--plot``: busy and present workers, tasks in flight).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import random
import resource
import sys
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from casa_benchmarks.chunk_durations import DEFAULT_PATH as DURATIONS_PATH
from casa_benchmarks.chunk_durations import load as load_durations
from casa_executors.backends.base import Backend
from casa_executors.driver import Driver, run_rules
from casa_executors.outputs import EnginePlacement
from casa_executors.state import (
    Cancel,
    ChunksDone,
    Finish,
    GiveUp,
    MergedHere,
    MergeDone,
    MergeHere,
    MergeTaskFailed,
    Ok,
    Requeue,
    Rules,
    RunState,
    SubmitChunks,
    SubmitMerge,
    TaskFailed,
    Tick,
    WorkersChanged,
)

log = logging.getLogger(__name__)

# heap event kinds
ARRIVE, FINISH, LOSE, REPORT, JOIN, LEAVE, TICK, STOP = range(8)
DRIVER_TICK_S = 0.25  # the real driver's loop wakes at least this often (driver._Run.drive)
SERIES_POINTS = 4000  # about this many samples of the time series over the bound


@dataclass
class Settings:
    workers: int = 100
    chunks: int = 10_000
    seed: int = 1
    loss_rate: float = 0.0
    stragglers: float = 0.0
    straggler_factor: float = 10.0
    preempt_rate: float = 0.0
    join_over: float = 0.0
    round_trip_ms: float = 13.0
    engine_tasks_per_s: float = 0.0  # 0: unlimited
    replace_s: float = 0.0
    loss_detect_s: float = 5.0
    priorities: bool = True
    cancel_stops: bool = False
    merge_ms: float = 2.0
    output_kb: float = 4.0
    durations: str = "mix"
    retries: int = 3
    fanin: int = 8
    speculate: bool = False
    speculate_factor: float = 1.5  # Rules' default
    speculate_min_s: float = 0.1
    speculate_after: int = 20
    speculate_share: float = 0.05

    def check(self) -> None:
        if not 1 <= self.workers or not 1 <= self.chunks:
            raise ValueError(f"--workers and --chunks must be >= 1, got {self.workers} and {self.chunks}")
        for name in ("loss_rate", "stragglers", "preempt_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be a fraction in [0, 1), got {value}")
        if (self.straggler_factor < 1 or self.join_over < 0 or self.round_trip_ms < 0 or self.replace_s < 0
                or self.loss_detect_s < 0):
            raise ValueError("--straggler-factor must be >= 1; --join-over, --round-trip-ms, --replace-s, "
                             "--loss-detect-s >= 0")


class _SimBackend(Backend):
    """Only for the real driver's sizing rules (``batch_size``, ``max_inflight``): it runs nothing."""

    name = "sim"

    def submit(self, fn: Any, arg: Any) -> Any:
        raise NotImplementedError("the simulator's engine is the event loop")


def rules_for(s: Settings) -> Rules:
    """The rules the real driver gives Dask with outputs on the engine (``driver.run_rules``), for
    ``s.workers`` workers; the speculation knobs from ``s``."""
    backend = _SimBackend(s.workers)
    driver = Driver(backend=backend, retries=s.retries, merge_fanin=s.fanin, speculate=s.speculate)
    rules = run_rules(driver, EnginePlacement(backend, driver.compression), s.chunks)
    return dataclasses.replace(rules, speculate_factor=s.speculate_factor, speculate_min_s=s.speculate_min_s,
                               speculate_after=s.speculate_after, speculate_share=s.speculate_share)


def chunk_durations(spec: str, n: int, rng: np.random.Generator, path: Path = DURATIONS_PATH) -> array:
    """``n`` chunk durations in seconds: ``const:MS``, or drawn from the measured sample of a query or all."""
    if spec.startswith("const:"):
        return array("d", [float(spec[6:]) / 1000.0]) * n
    samples = load_durations(path)["samples_ms"]
    if spec == "mix":
        pool = [x for values in samples.values() for x in values]
    elif spec in samples:
        pool = samples[spec]
    else:
        raise ValueError(f"--durations must be one of {', '.join(samples)}, mix or const:MS, got {spec!r}")
    return array("d", (rng.choice(np.asarray(pool), size=n) / 1000.0).tolist())


class Out:
    """A node's output in the simulation: the chunks it holds, as a bitmask from ``lo``."""

    __slots__ = ("lo", "mask")

    def __init__(self, lo: int, mask: int) -> None:
        self.lo, self.mask = lo, mask

    @staticmethod
    def merge(children: list[Out]) -> Out:
        lo = min(c.lo for c in children)
        mask = 0
        for c in children:
            shifted = c.mask << (c.lo - lo)
            if mask & shifted:
                raise AssertionError(f"a chunk from {c.lo} is in two outputs merged together")
            mask |= shifted
        return Out(lo, mask)


def capacity_bound(joins: list[float], leaves: list[float], work: float, start: float) -> float:
    """The first time ``tau`` by which the workers present between ``start`` and ``tau`` have had ``work``
    worker-seconds (``inf`` if they never do)."""
    spans = [(max(j, start), gone) for j, gone in zip(joins, leaves) if gone > max(j, start)]
    steps = sorted([(begin, 1) for begin, _ in spans] + [(gone, -1) for _, gone in spans if gone != float("inf")])
    t, n, done = start, 0, 0.0
    for when, delta in steps:
        if n > 0 and done + n * (when - t) >= work:
            return t + (work - done) / n
        done += n * (when - t)
        t, n = when, n + delta
    return t + (work - done) / n if n > 0 else float("inf")


class Facility:
    """The simulated engine and workers around one :class:`RunState`."""

    def __init__(self, s: Settings) -> None:
        s.check()
        self.s = s
        self.rng = np.random.default_rng(s.seed)
        self.rand = random.Random(s.seed).random
        self.half = s.round_trip_ms / 2000.0
        self.durations = chunk_durations(s.durations, s.chunks, self.rng)
        self.work = float(sum(self.durations))
        n = s.workers
        self.joins = sorted(self.rng.uniform(0.0, s.join_over, n).tolist()) if s.join_over > 0 else [0.0] * n
        estimate = s.join_over / 2 + self.work / n
        self.leaves = [float("inf")] * n
        if s.preempt_rate > 0:
            for w in np.flatnonzero(self.rng.random(n) < s.preempt_rate).tolist():
                self.leaves[w] = self.joins[w] + float(self.rng.uniform(0.0, estimate))
        tau = capacity_bound(self.joins, self.leaves, self.work, self.half)
        self.bound = max(tau + self.half, max(self.half, self.joins[0]) + max(self.durations) + self.half)
        # the engine and workers
        self.heap: list[tuple] = []
        self.seq = 0
        self.present = bytearray(n)
        self.running = [0] * n  # task id on each worker, 0 none
        self.token = [0] * n  # bumped when a worker is lost: its pending FINISH is stale
        self.idle: list[int] = []
        self.queue: deque[int] = deque()
        self.queue_first: deque[int] = deque()  # tasks sent with a priority (when the engine honours them)
        self.dispatch_free = 0.0
        self.tasks: dict[int, tuple] = {}  # task -> ("c", nodes, folds, work) | ("m", group, work)
        self.started: dict[int, float] = {}
        self.worker_of: dict[int, int] = {}  # running task -> its worker
        self.cancelled: set[int] = set()
        self.outstanding = 0  # submitted, result not at the driver yet (cancelled ones until they end)
        # what is counted
        self.busy = 0
        self.busy_s = 0.0
        self.wasted_s = 0.0
        self.last_t = 0.0
        self.n_present = 0
        self.present_s = 0.0
        self.counts = {"tasks": 0, "merge_tasks": 0, "merges_here": 0, "lost_runs": 0, "preempted_runs": 0,
                       "straggler_runs": 0, "cancelled": 0, "requeued": 0, "given_up": 0, "skipped": 0}
        self.given_up: set[int] = set()
        self.peak_inflight = 0
        self.series_step = self.bound / SERIES_POINTS
        self.series_next = 0.0
        self.series = {k: array("d") for k in ("t", "busy", "present", "inflight")}
        self.now = 0.0
        self.driver_cpu = 0.0
        self.driver_calls = 0
        self.result: Out | None = None
        self.makespan: float | None = None

    # -- the heap --------------------------------------------------------------------------------
    def push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def advance(self, t: float) -> None:
        """Integrate busy and present worker-time up to ``t``; sample the series."""
        if t > self.now and self.now >= self.series_next:  # the state after every event of the last instant
            self.sample()
        dt = t - self.last_t
        if dt > 0:
            self.busy_s += self.busy * dt
            self.present_s += self.n_present * dt
            self.last_t = t
        self.now = t

    def sample(self) -> None:
        """The state after every event of the instant ``now`` (plotted as steps), at most once a
        ``series_step``."""
        t = self.now
        self.series_next = t + self.series_step
        for key, value in (("t", t), ("busy", self.busy), ("present", self.n_present),
                           ("inflight", self.outstanding)):
            self.series[key].append(value)

    # -- the driver ------------------------------------------------------------------------------
    def drive(self, events: list) -> None:
        """Feed the rules, carry out what they say (answering ``MergeHere`` at once)."""
        state, clock = self.state, time.process_time
        while events:
            t0 = clock()
            out = state.handle_all(events)
            self.driver_cpu += clock() - t0
            self.driver_calls += 1
            events = []
            for ins in out:
                kind = type(ins)
                if kind is SubmitChunks:
                    work = 0.0
                    durations = self.durations
                    for level, index in ins.nodes:
                        for i in (state.tree.span(level, index) if level else (index,)):
                            work += durations[i]
                    self.submit(ins.task, ("c", ins.nodes, ins.folds, work), ins.priority)
                elif kind is SubmitMerge:
                    self.submit(ins.task, ("m", ins.group, self.s.merge_ms / 1000.0), ins.priority)
                    self.counts["merge_tasks"] += 1
                elif kind is MergeHere:
                    self.counts["merges_here"] += 1
                    events.append(MergedHere(ins.group, Out.merge([c.handle for c in ins.group.children
                                                                   if c.handle is not None])))
                elif kind is Cancel:
                    self.cancelled.add(ins.task)
                    self.counts["cancelled"] += 1
                    if self.s.cancel_stops and ins.task in self.started:
                        self.push(self.now + self.half, STOP, ins.task)
                elif kind is GiveUp:
                    if ins.index in self.given_up:
                        raise AssertionError(f"chunk {ins.index} given up twice")
                    self.given_up.add(ins.index)
                    self.counts["given_up"] += 1
                    self.counts["skipped"] += ins.skipped
                elif kind is Requeue:
                    self.counts["requeued"] += 1
                elif kind is Finish:
                    self.result = ins.root.handle
                    self.makespan = self.now

    def submit(self, task: int, info: tuple, priority: int = 0) -> None:
        self.tasks[task] = info
        self.counts["tasks"] += 1
        self.outstanding += 1
        self.peak_inflight = max(self.peak_inflight, self.outstanding)
        arrive = self.now + self.half
        if self.s.engine_tasks_per_s > 0:
            arrive = max(arrive, self.dispatch_free)
            self.dispatch_free = arrive + 1.0 / self.s.engine_tasks_per_s
        self.push(arrive, ARRIVE, task, priority > 0 and self.s.priorities)

    # -- the engine --------------------------------------------------------------------------------
    def start_next(self, w: int) -> bool:
        """Start the next queued task on worker ``w`` (idle and present); False if none waits."""
        queue, first = self.queue, self.queue_first
        while first or queue:
            task = (first or queue).popleft()
            if task in self.cancelled:  # never started: gone from the engine
                self.cancelled.discard(task)
                self.outstanding -= 1
                del self.tasks[task]
                continue
            info = self.tasks[task]
            duration = info[-1]
            if self.s.stragglers and self.rand() < self.s.stragglers:
                duration *= self.s.straggler_factor
                self.counts["straggler_runs"] += 1
            self.running[w] = task
            self.started[task] = self.now
            self.worker_of[task] = w
            self.busy += 1
            if self.s.loss_rate and self.rand() < self.s.loss_rate:
                self.push(self.now + self.rand() * duration, LOSE, w, self.token[w])
            else:
                self.push(self.now + duration, FINISH, w, self.token[w])
            return True
        return False

    def worker_free(self, w: int) -> None:
        if not self.start_next(w):
            self.idle.append(w)

    def end_run(self, w: int, lost: bool) -> int:
        task = self.running[w]
        self.running[w] = 0
        self.busy -= 1
        ran = self.now - self.started.pop(task)
        del self.worker_of[task]
        if lost or task in self.cancelled:
            self.wasted_s += ran
        return task

    def report(self, task: int, event: Any, delay: float = 0.0) -> None:
        self.push(self.now + delay + self.half, REPORT, task, event)

    def result_of(self, task: int) -> Any:
        info = self.tasks.pop(task)
        if info[0] == "m":
            return MergeDone(task, Out.merge([c.handle for c in info[1].children if c.handle is not None]))
        nodes, folds = info[1], info[2]
        span = self.state.tree.span
        outcomes = []
        for level, index in nodes:
            leaves = span(level, index) if level else range(index, index + 1)
            outcomes.append(Ok(Out(leaves.start, (1 << len(leaves)) - 1), nbytes=int(self.s.output_kb * 1024)
                               * len(leaves), wall_s=0.0))
        for index, start, count in folds:  # the task merged these leaves: the first carries node (1, index)
            lo = nodes[start][1]
            outcomes[start] = Ok(Out(lo, (1 << count) - 1), nbytes=int(self.s.output_kb * 1024) * count, node=index)
            for k in range(start + 1, start + count):
                outcomes[k] = Ok(None, nbytes=0, merged=True)
        return ChunksDone(task, tuple(outcomes))

    def lost_worker(self, w: int, why: str, detect_s: float = 0.0) -> None:
        """Worker ``w`` is gone while running a task: the task fails on the engine, which notices
        ``detect_s`` later."""
        task = self.end_run(w, lost=True)
        self.token[w] += 1
        if task in self.cancelled:
            self.cancelled.discard(task)
            self.outstanding -= 1
            del self.tasks[task]
            return
        info = self.tasks.pop(task)
        event = (MergeTaskFailed(task, why) if info[0] == "m" else TaskFailed(task, ConnectionError(why)))
        self.report(task, event, detect_s)

    def set_present(self, w: int, present: bool) -> None:
        self.present[w] = present
        self.n_present += 1 if present else -1

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        import psutil

        s = self.s
        for w in range(s.workers):
            self.push(self.joins[w], JOIN, w)
            if self.leaves[w] != float("inf"):
                self.push(self.leaves[w], LEAVE, w)
        rss_before = psutil.Process().memory_info().rss / 2**20
        self.state = RunState(s.chunks, rules_for(s))
        fed_workers = max(sum(j <= 0.0 for j in self.joins), 1)
        self.drive([Tick(0.0), WorkersChanged(fed_workers)])
        self.push(DRIVER_TICK_S, TICK)
        last_tick = 0.0
        heap, pop = self.heap, heapq.heappop
        wall0 = time.perf_counter()
        while heap and self.makespan is None:
            t, _, kind, a, b = pop(heap)
            self.advance(t)
            if kind == REPORT:
                if a in self.cancelled:  # a cancelled copy that still ended: the rules ignore it, fed or not
                    self.cancelled.discard(a)
                self.outstanding -= 1
                events = [b] if t - last_tick < 1e-3 else [Tick(t), b]
                last_tick = t if len(events) == 2 else last_tick
                self.drive(events)
            elif kind == FINISH:
                w = a
                if b != self.token[w]:
                    continue
                task = self.end_run(w, lost=False)
                if task in self.cancelled:
                    self.cancelled.discard(task)
                    self.outstanding -= 1
                    del self.tasks[task]
                else:
                    self.report(task, self.result_of(task))
                self.worker_free(w)
            elif kind == ARRIVE:
                (self.queue_first if b else self.queue).append(a)
                while self.idle and (self.queue or self.queue_first):
                    w = self.idle.pop()
                    if self.present[w] and not self.running[w]:
                        if not self.start_next(w):
                            self.idle.append(w)
            elif kind == LOSE:
                w = a
                if b != self.token[w]:
                    continue
                self.counts["lost_runs"] += 1
                self.lost_worker(w, f"worker {w} lost", s.loss_detect_s)
                self.set_present(w, False)
                self.push(t + s.replace_s, JOIN, w)
            elif kind == STOP:  # a cancelled copy is stopped on its worker (--cancel-stops)
                w = self.worker_of.get(a)
                if w is not None and a in self.cancelled:
                    self.end_run(w, lost=False)
                    self.token[w] += 1
                    self.cancelled.discard(a)
                    self.outstanding -= 1
                    del self.tasks[a]
                    self.worker_free(w)
            elif kind == JOIN:
                self.set_present(a, True)
                self.worker_free(a)
            elif kind == LEAVE:
                w = a
                if self.running[w]:
                    self.counts["preempted_runs"] += 1
                    self.lost_worker(w, f"worker {w} pre-empted")
                self.set_present(w, False)
                self.token[w] += 1
            elif kind == TICK:
                if t - last_tick >= DRIVER_TICK_S / 2:
                    last_tick = t
                    events = [Tick(t)]
                    if self.n_present != fed_workers and self.n_present:  # the shell asks the engine
                        fed_workers = self.n_present
                        events.append(WorkersChanged(fed_workers))
                    self.drive(events)
                self.push(t + DRIVER_TICK_S, TICK)
        self.sample()
        sim_wall = time.perf_counter() - wall0
        if self.makespan is None:
            raise RuntimeError(f"the run did not finish: {self.state.running} tasks in flight, "
                               f"{len(self.queue)} queued, {self.n_present} workers present")
        self.check_exactly_once()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        present = self.present_s
        return {
            **asdict(s),
            "makespan_s": self.makespan, "bound_s": self.bound, "makespan_over_bound": self.makespan / self.bound,
            "work_s": self.work, "idle_fraction": 1.0 - self.busy_s / present if present else 0.0,
            "busy_s": self.busy_s, "wasted_s": self.wasted_s, "present_worker_s": present,
            "driver_us_per_chunk": 1e6 * self.driver_cpu / s.chunks, "driver_cpu_s": self.driver_cpu,
            "driver_calls": self.driver_calls, "timer_us": timer_cost_us(),
            "driver_cpu_over_makespan": self.driver_cpu / self.makespan,
            "rss_mb": peak, "rss_before_mb": rss_before,
            "batch": self.state.rules.batch, "window": self.state.rules.window,
            "speculated": self.state.speculated, "retried": self.state.retried,
            "peak_inflight": self.peak_inflight, **self.counts,
            "chunks_in_output": self.result.mask.bit_count() if self.result is not None else 0,
            "simulator_wall_s": sim_wall,
            "durations_source": f"{DURATIONS_PATH.name} ({load_durations()['date']})"
            if not s.durations.startswith("const:") else s.durations,
            "series": {k: v.tolist() for k, v in self.series.items()},
        }

    def check_exactly_once(self) -> None:
        """The root holds every chunk not given up, once (merges refused any chunk twice)."""
        n = self.s.chunks
        root = self.result
        got = 0 if root is None else root.mask << root.lo
        want = ((1 << n) - 1) & ~sum(1 << i for i in self.given_up)
        if got != want:
            missing = (want & ~got).bit_count()
            raise AssertionError(f"the output holds {got.bit_count()} chunks, {missing} missing, "
                                 f"{len(self.given_up)} given up, of {n}")


def timer_cost_us(rounds: int = 20_000) -> float:
    """The cost of a pair of ``process_time()`` reads (what each timed call adds), in microseconds."""
    clock = time.process_time
    t0 = clock()
    for _ in range(rounds):
        clock()
        clock()
    return 1e6 * (clock() - t0) / rounds


def simulate(s: Settings) -> dict:
    return Facility(s).run()


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.step(series["t"], series["present"], where="post", label="workers present", color="0.6")
    ax.step(series["t"], series["busy"], where="post", label="workers busy")
    ax2 = ax.twinx()
    ax2.step(series["t"], series["inflight"], where="post", label="tasks in flight", color="C1", alpha=0.7)
    ax.axvline(result["bound_s"], color="k", ls="--", lw=1, label=f"lower bound {result['bound_s']:.2f} s")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("workers")
    ax2.set_ylabel("tasks in flight")
    ax.set_title(f"{result['workers']} workers, {result['chunks']} chunks: makespan {result['makespan_s']:.2f} s "
                 f"= {result['makespan_over_bound']:.3f} x bound")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m casa_benchmarks.facility_sim", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--chunks", type=int, default=d.chunks)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--loss-rate", type=float, default=0.0, help="fraction of task runs whose worker is lost")
    ap.add_argument("--stragglers", type=float, default=0.0, help="fraction of task runs --straggler-factor slower")
    ap.add_argument("--straggler-factor", type=float, default=d.straggler_factor)
    ap.add_argument("--preempt-rate", type=float, default=0.0, help="fraction of workers pre-empted during the run")
    ap.add_argument("--join-over", type=float, default=0.0, metavar="S", help="workers join over S seconds")
    ap.add_argument("--round-trip-ms", type=float, default=d.round_trip_ms, help="engine round trip per task")
    ap.add_argument("--engine-tasks-per-s", type=float, default=0.0, help="the engine's start rate (0: no limit)")
    ap.add_argument("--replace-s", type=float, default=d.replace_s, help="a lost worker's replacement comes after")
    ap.add_argument("--loss-detect-s", type=float, default=d.loss_detect_s,
                    help="the engine notices a lost worker this long after (its heartbeat timeout)")
    ap.add_argument("--cancel-stops", action="store_true",
                    help="cancelling a running task frees its worker (Work Queue) instead of running on (Dask)")
    ap.add_argument("--no-priorities", dest="priorities", action="store_false",
                    help="the engine ignores the priority of retries and duplicates (first in, first out)")
    ap.add_argument("--merge-ms", type=float, default=d.merge_ms)
    ap.add_argument("--output-kb", type=float, default=d.output_kb, help="a chunk output's encoded size")
    ap.add_argument("--durations", default=d.durations, help="Q1, Q6, Q8, mix (of the measured sample) or const:MS")
    ap.add_argument("--retries", type=int, default=d.retries)
    ap.add_argument("--fanin", type=int, default=d.fanin)
    ap.add_argument("--speculate", action="store_true", help="duplicate stragglers (Rules.speculate)")
    ap.add_argument("--speculate-factor", type=float, default=d.speculate_factor)
    ap.add_argument("--speculate-min-s", type=float, default=d.speculate_min_s)
    ap.add_argument("--speculate-after", type=int, default=d.speculate_after)
    ap.add_argument("--speculate-share", type=float, default=d.speculate_share)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--plot", help="write a figure (PNG) of busy workers and tasks in flight here")
    return ap


SUMMARY_KEYS = ("workers", "chunks", "makespan_s", "bound_s", "makespan_over_bound", "idle_fraction",
                "driver_us_per_chunk", "driver_cpu_over_makespan", "rss_mb", "tasks", "speculated", "lost_runs",
                "straggler_runs", "given_up", "simulator_wall_s")


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    try:
        s = Settings(**fields)
        s.check()
    except ValueError as exc:
        parser().error(str(exc))
    result = simulate(s)
    result["command"] = "python -m casa_benchmarks.facility_sim " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps({k: result[k] for k in SUMMARY_KEYS}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result))
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
