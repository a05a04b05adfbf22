"""Reads overlapped with compute, before and after, side by side: iterative on the ADL queries with
read-ahead off and on (``CASA_EXECUTORS_READ_AHEAD``), alternating run by run.

    python -m casa_benchmarks.read_ahead --data DIR --queries 1-8 --chunksize 100000 --repeat 3 --json out.json

For each query and mode, the fastest of ``--repeat`` runs and, from that run:

* ``cpu_efficiency``: the process's CPU time over the wall time (what ``casa_benchmarks.adl`` reports);
* ``waiting``: the share of the wall time the thread running the chunks was blocked (neither on a
  core nor waiting for one: reads, and joins on a read-ahead), from ``/proc/thread-self/schedstat``;
* ``runnable``: the share it was ready to run but had no core: the machine's load, not ours.

``1 - waiting`` is the efficiency the run would show on an idle machine, where the runnable time is
time on a core. Each mode's outputs are compared with the other's (bit for bit: Int64 histograms).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors
from casa_benchmarks.adl.cli import parse_queries
from casa_benchmarks.adl.queries import QUERIES
from casa_benchmarks.common import counts as hist_counts
from casa_benchmarks.common import save_json
from casa_executors.prefetch import ENV


def _schedstat() -> tuple[float, float]:
    """This thread's time on a core and time runnable without one, in seconds."""
    with open("/proc/thread-self/schedstat") as f:
        on, waiting, _ = f.read().split()
    return int(on) / 1e9, int(waiting) / 1e9


def run_once(files: list[str], query: int, chunksize: int, read_ahead: bool) -> dict:
    os.environ[ENV] = "1" if read_ahead else "0"
    ex = casa_executors.iterative(status=False)
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize, metadata_cache={})
    on0, rq0 = _schedstat()
    t0, c0 = time.perf_counter(), time.process_time()
    out = runner({"adl": files}, QUERIES[query](), treename="Events")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    on1, rq1 = _schedstat()
    oncore, runnable = on1 - on0, rq1 - rq0
    return {"wall_s": wall, "cpu_s": cpu, "cpu_efficiency": cpu / wall,
            "on_core_s": oncore, "runnable_s": runnable, "waiting_s": max(wall - oncore - runnable, 0.0),
            "waiting": max(wall - oncore - runnable, 0.0) / wall, "runnable": runnable / wall,
            "bytes_read": ex.report.summary()["bytes_read"], "counts": hist_counts(out)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory of ADL files (python -m casa_benchmarks.adl generate)")
    ap.add_argument("--queries", default="1-8")
    ap.add_argument("--chunksize", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    files = sorted(str(p) for p in Path(args.data).glob("*.root"))
    result: dict = {"files": len(files), "chunksize": args.chunksize, "repeat": args.repeat,
                    "load_before": os.getloadavg(), "queries": {}}
    for q in parse_queries(args.queries):
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.repeat + 1):  # the first pair warms up (page cache, numba, imports)
            order = ("off", "on") if r % 2 else ("on", "off")
            for mode in order:
                one = run_once(files, q, args.chunksize, mode == "on")
                if r:
                    runs[mode].append(one)
        best = {m: min(v, key=lambda x: x["wall_s"]) for m, v in runs.items()}
        identical = all(x["counts"] == best["off"]["counts"] for v in runs.values() for x in v)
        for b in best.values():
            b.pop("counts")
        result["queries"][q] = {**best, "identical": identical,
                                "on_over_off_wall": best["on"]["wall_s"] / best["off"]["wall_s"]}
        off, on = best["off"], best["on"]
        print(f"Q{q}: wall {off['wall_s']:.2f} -> {on['wall_s']:.2f} s, cpu eff {off['cpu_efficiency']:.2f} -> "
              f"{on['cpu_efficiency']:.2f}, waiting {off['waiting']:.1%} -> {on['waiting']:.1%} "
              f"(runnable {off['runnable']:.1%}, {on['runnable']:.1%}), 1-waiting {1 - off['waiting']:.3f} -> "
              f"{1 - on['waiting']:.3f}, MB {off['bytes_read'] / 1e6:.1f}/{on['bytes_read'] / 1e6:.1f}, "
              f"identical {identical}", flush=True)
    result["load_after"] = os.getloadavg()
    os.environ.pop(ENV, None)
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
