"""Scaling of each backend: 2 workers against twice the iterative throughput, and start-up cost.

    python -m benchmarks.scaling --events 400000 --files 4 --workers 2 --queries 6,8 --json out.json

For every backend available here: the fixed start-up cost (starting its
engine, then every query once on a few small chunks: worker start, imports,
JIT), then each query with the engine held (fastest of ``--repeat`` runs),
as events/s and as efficiency = events/s / (workers x iterative events/s).
Iterative runs in the same process and run, so the ratios share conditions.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors
from benchmarks.adl.queries import QUERIES
from benchmarks.common import counts, dataset, dataset_options, save_json, timed


def measure(name: str, workers: int, files: list[str], queries: list[int], chunksize: int, repeat: int) -> dict:
    opts = {} if name == "iterative" else {"workers": workers}
    ex = casa_executors.create(name, status=False, **opts)
    t0 = time.perf_counter()
    ex.backend.hold()  # the engine
    engine = time.perf_counter() - t0
    # fixed costs: workers up, imports, JIT — every query on a few small chunks
    for q in queries:
        warm = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=2000, maxchunks=2 * workers,
                                metadata_cache={})
        warm({"adl": files[:1]}, QUERIES[q](), treename="Events")
    startup = time.perf_counter() - t0
    row: dict = {"backend": name, "workers": ex.backend.workers, "engine_start_s": engine, "startup_s": startup,
                 "queries": {}}
    try:
        for q in queries:
            best = None
            for _ in range(repeat):
                wall, out = timed(ex, files, q, chunksize)
                best = wall if best is None else min(best, wall)
            s = ex.report.summary()
            row["queries"][q] = {"wall_s": best, "events": s["events"], "events_per_s": s["events"] / best,
                                 "attempts": s["attempts"],
                                 "counts": counts(out)}
    finally:
        t = time.perf_counter()
        ex.backend.release()
        row["shutdown_s"] = time.perf_counter() - t
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_options(ap, events=400_000, files=4, chunksize=50_000)
    ap.add_argument("--queries", default="6,8")
    ap.add_argument("--repeat", type=int, default=2, help="keep the fastest of N runs of each query")
    ap.add_argument("--backends", default=",".join(casa_executors.BACKENDS))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    files = dataset(Path(args.data_dir), args.events, args.files)
    queries = [int(q) for q in args.queries.split(",")]
    rows, skipped = [], {}
    for name in args.backends.split(","):
        why = casa_executors.unavailable(name)
        if why:
            skipped[name] = why
            continue
        rows.append(measure(name, args.workers, files, queries, args.chunksize, args.repeat))
    base = next(r for r in rows if r["backend"] == "iterative")
    print(f"{args.events} events, {args.files} files, chunksize {args.chunksize}; "
          "efficiency = ev/s / (workers x iterative ev/s)")
    header = " ".join(f"{'Q' + str(q) + ' ev/s':>12s} {'eff':>5s}" for q in queries)
    print(f"{'backend':10s} {'start-up s':>10s} {header}")
    for r in rows:
        cells = []
        for q in queries:
            mine, ref = r["queries"][q], base["queries"][q]
            r["queries"][q]["efficiency"] = mine["events_per_s"] / (r["workers"] * ref["events_per_s"])
            r["queries"][q]["identical_to_iterative"] = mine["counts"] == ref["counts"]
            flag = "" if r["queries"][q]["identical_to_iterative"] else " DIFF"
            cells.append(f"{mine['events_per_s']:12.0f} {r['queries'][q]['efficiency']:5.2f}{flag}")
        print(f"{r['backend']:10s} {r['startup_s']:10.2f} " + " ".join(cells))
    for r in rows:
        for q in queries:
            r["queries"][q].pop("counts")
    for name, why in skipped.items():
        print(f"{name:10s} not available: {why}")
    result = {"events": args.events, "files": args.files, "chunksize": args.chunksize, "rows": rows,
              "skipped": skipped}
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
