"""One real engine at scale on this machine, against the facility simulator's prediction.

    python -m casa_benchmarks.dask_at_scale --workers 200 --tasks 20000 --sleep-ms 50 --json bench-out/dask_at_scale.json

A Dask ``LocalCluster(processes=False, n_workers=--workers, threads_per_worker=1)``: hundreds of workers in
this process, each a thread. The chunks (``--tasks`` work items) only sleep ``--sleep-ms``, so what is measured
is the engine and our driver, not the CPU. They go through casa_executors' real driver shell
(``casa_executors.dask(client=...)`` called as coffea's Runner calls it, without Runner): guided batches,
outputs held on the workers, merges there.

Measured first, with the engine held: its latency (one no-op task at a time, median of ``--waves`` x 5: what
the simulator calls the round trip) and its throughput (``casa_benchmarks.scaling.round_trip``'s waves of one no-op
task per worker, median: workers / that is the tasks a second it starts and collects when busy). Then one timed
call: its makespan, the engine tasks it ran (counted by a scheduler plugin: chunk tasks and merges), tasks and
chunks per second, the process's CPU (scheduler, workers and driver share it here). Then the simulator runs the
same settings (the same workers, chunks of exactly ``--sleep-ms``, the measured latency as its round trip and
the measured throughput as ``engine_tasks_per_s``; and once with the latency alone; no faults) and its makespan
is set beside the measured one. The cluster is closed in any case.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 180


def sleeper(ms: float):
    """A chunk's work: sleep, return a count (what the driver merges)."""

    def work(item: Any) -> dict:
        time.sleep(ms / 1000.0)
        return {"chunks": 1}

    return work


class TaskCounter:
    """A scheduler plugin counting tasks that reached memory (done), by kind."""

    name = "casa-task-counter"

    def __init__(self) -> None:
        self.done = 0
        self.first: float | None = None
        self.last = 0.0

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing" and finish in ("memory", "erred"):
            now = time.perf_counter()
            self.done += 1
            self.first = self.first if self.first is not None else now
            self.last = now


def measure(workers: int, chunks: int, sleep_ms: float, waves: int = 10) -> dict:
    import dask
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    import casa_executors as ce
    from casa_benchmarks.scaling import round_trip

    class Counter(TaskCounter, SchedulerPlugin):
        pass

    t0 = time.perf_counter()
    # hundreds of workers share this process's event loop: on a loaded machine the client's first connection
    # took over dask's default 30 s once (200 workers, load average 17)
    # and missed heartbeats must not remove them (worker-ttl)
    config = {"distributed.worker.profile.enabled": False, "distributed.scheduler.allowed-failures": 0,
              "distributed.comm.timeouts.connect": f"{CONNECT_TIMEOUT_S}s", "distributed.scheduler.worker-ttl": None}
    with dask.config.set(config):
        # memory_limit=0: LocalCluster splits the machine's memory between the workers, and every in-process
        # worker sees the whole process's memory as its own: with 200 they all paused at once (120 MiB each)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, memory_limit=0,
                               dashboard_address="127.0.0.1:0")  # None still serves on *:8787
    try:
        with dask.config.set(config):
            client = Client(cluster, set_as_default=False, timeout=CONNECT_TIMEOUT_S)
        try:
            client.wait_for_workers(workers)
            start_s = time.perf_counter() - t0
            counter = Counter()
            cluster.scheduler.add_plugin(counter)  # processes=False: the scheduler is in this process
            ex = ce.dask(client=client, status=False)
            with ex:
                latency = round_trip(ex.backend, 1, 5 * waves)
                wave = round_trip(ex.backend, workers, waves)
                before = counter.done
                items = list(range(chunks))
                cpu0, t1 = time.process_time(), time.perf_counter()
                out, _ = ex(items, sleeper(sleep_ms), None)
                makespan = time.perf_counter() - t1
                cpu = time.process_time() - cpu0
            if out != {"chunks": chunks}:
                raise AssertionError(f"the run's output is {out!r}, not {{'chunks': {chunks}}}")
            summary = ex.report.summary()
            tasks = counter.done - before
        finally:
            client.close()
    finally:
        cluster.close()
    ideal = chunks * sleep_ms / 1000.0 / workers
    return {"workers": workers, "chunks": chunks, "sleep_ms": sleep_ms, "cluster_start_s": start_s,
            "round_trip_ms": 1000.0 * latency, "wave_ms": 1000.0 * wave, "engine_tasks_per_s": workers / wave,
            "makespan_s": makespan, "ideal_s": ideal,
            "makespan_over_ideal": makespan / ideal, "engine_tasks": tasks,
            "merge_tasks": summary["merge"].get("merge_tasks", 0), "tasks_per_s": tasks / makespan,
            "chunks_per_s": chunks / makespan, "process_cpu_s": cpu, "attempts": summary["attempts"]}


def predict(workers: int, chunks: int, sleep_ms: float, round_trip_ms: float, engine_tasks_per_s: float = 0.0,
            seed: int = 1) -> dict:
    from casa_benchmarks.facility_sim import Settings, simulate

    r = simulate(Settings(workers=workers, chunks=chunks, durations=f"const:{sleep_ms}", round_trip_ms=round_trip_ms,
                          engine_tasks_per_s=engine_tasks_per_s, output_kb=0.1, seed=seed))  # outputs: a tiny dict
    return {k: r[k] for k in ("makespan_s", "bound_s", "makespan_over_bound", "tasks", "merge_tasks",
                              "idle_fraction", "driver_us_per_chunk")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m casa_benchmarks.dask_at_scale", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=20_000, help="work items (chunks) of the call")
    ap.add_argument("--sleep-ms", type=float, default=50.0)
    ap.add_argument("--waves", type=int, default=10, help="no-op waves for the round trip (median)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.tasks < 1 or args.sleep_ms < 0:
        ap.error("--workers and --tasks must be >= 1, --sleep-ms >= 0")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    real = measure(args.workers, args.tasks, args.sleep_ms, args.waves)
    sim = predict(args.workers, args.tasks, args.sleep_ms, real["round_trip_ms"], real["engine_tasks_per_s"])
    latency_only = predict(args.workers, args.tasks, args.sleep_ms, real["round_trip_ms"])
    doc = {"command": "python -m casa_benchmarks.dask_at_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
           "dask": real, "simulated": sim, "simulated_latency_only": latency_only,
           "makespan_real_over_simulated": real["makespan_s"] / sim["makespan_s"]}
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
