"""Adaptive chunking against fixed chunks: ADL Q1 and Q8 at chunks of 10k, 50k and 100k.

    python -m casa_benchmarks.adaptive_chunking --events 4000000 --files 8 --workers 2 --json out.json

For each backend (``iterative`` and ``futures`` with ``--workers``), query and chunk size, the same
engine (held) runs the query with fixed chunks, with ``target_task_s=--target`` (its default binary
merge tree) and with ``target_task_s`` and ``merge_fanin=8`` (the fixed runs' tree: fewer node sizes
fit inside a file), one after the other, each contender first in turn over ``--repeat`` repetitions
(the fastest run of each is kept). Every query runs once beforehand on a few small chunks (workers
up, imports, JIT), and preprocessing is cached, so that only processing is timed. Reported: events/s, the tasks that ran
(report rows), the gain over fixed chunks, and whether the histograms are bit-identical.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors
from casa_benchmarks.adl.queries import QUERIES
from casa_benchmarks.common import DATA_DIR, counts, dataset, rotated, save_json

CONTENDERS = {  # name -> driver options on top of the backend's
    "fixed": {},
    "adaptive": {"target_task_s": None},  # None: --target
    "adaptive fanin 8": {"target_task_s": None, "merge_fanin": 8},
}


def timed(ex: casa_executors.Driver, files: list[str], query: int, chunksize: int, cache: dict) -> tuple[float, dict]:
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize, metadata_cache=cache)
    t0 = time.perf_counter()
    out = runner({"adl": files}, QUERIES[query](), treename="Events")
    return time.perf_counter() - t0, out


def measure(name: str, workers: int, files: list[str], queries: list[int], chunks: list[int], target: float,
            repeat: int) -> dict:
    opts = {} if name == "iterative" else {"workers": workers}
    base = casa_executors.create(name, status=False, **opts)
    cache: dict = {}
    row: dict = {"backend": name, "workers": base.backend.workers, "runs": []}
    with base:  # the engine stays up for every run below
        for q in queries:  # workers up, imports, JIT; and the files' metadata
            warm = processor.Runner(executor=base, schema=NanoAODSchema, chunksize=2000, maxchunks=2 * workers,
                                    metadata_cache=cache)
            warm({"adl": files}, QUERIES[q](), treename="Events")
        for q in queries:
            for chunk in chunks:
                best: dict[str, dict] = {}
                for rep in range(repeat):
                    for contender in rotated(list(CONTENDERS), rep):
                        options = {k: (target if v is None else v) for k, v in CONTENDERS[contender].items()}
                        ex = casa_executors.Driver(backend=base.backend, status=False, **options)
                        wall, out = timed(ex, files, q, chunk, cache)
                        s = ex.report.summary()
                        if contender not in best or wall < best[contender]["wall_s"]:
                            best[contender] = {"wall_s": wall, "events": s["events"], "tasks": s["chunks"],
                                               "events_per_s": s["events"] / wall, "counts": counts(out, flow=True)}
                fixed = best["fixed"]
                for r in best.values():
                    r["gain"] = r["events_per_s"] / fixed["events_per_s"]
                    r["identical"] = r["counts"] == fixed["counts"]
                for r in best.values():
                    r.pop("counts")
                row["runs"].append({"query": q, "chunksize": chunk, "results": best})
                print(f"  {name} Q{q} chunks {chunk}: " + ", ".join(
                    f"{c} {r['events_per_s'] / 1e6:.2f} M ev/s ({r['tasks']} tasks)" for c, r in best.items()),
                    flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=4_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="of futures (and any other backend but iterative)")
    ap.add_argument("--data-dir", default=str(DATA_DIR), help="where the generated files are kept between runs")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--chunks", default="10000,50000,100000", help="fixed chunk sizes to compare")
    ap.add_argument("--queries", default="1,8")
    ap.add_argument("--target", type=float, default=2.0, help="target_task_s of the adaptive runs")
    ap.add_argument("--repeat", type=int, default=1, help="keep the fastest of N runs of each")
    ap.add_argument("--backends", default="iterative,futures")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    files = dataset(Path(args.data_dir), args.events, args.files)
    queries = [int(q) for q in args.queries.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    t0 = time.perf_counter()
    rows = [measure(name, args.workers, files, queries, chunks, args.target, args.repeat)
            for name in args.backends.split(",")]
    print(f"\n{args.events} events in {args.files} files; target_task_s={args.target}; "
          f"gain = events/s over fixed chunks of the same size; tasks = report rows")
    names = list(CONTENDERS)
    print(f"{'backend':10s} {'query':>5s} {'chunks':>7s} " + " ".join(
        f"{n + ' M ev/s':>22s} {'tasks':>5s} {'gain':>5s}" for n in names) + "  identical")
    for row in rows:
        for run in row["runs"]:
            res = run["results"]
            cells = " ".join(f"{res[n]['events_per_s'] / 1e6:22.2f} {res[n]['tasks']:5d} {res[n]['gain']:5.2f}"
                             for n in names)
            same = "yes" if all(r["identical"] for r in res.values()) else "NO"
            print(f"{row['backend']:10s} {'Q' + str(run['query']):>5s} {run['chunksize']:7d} {cells}  {same}")
    result = {"events": args.events, "files": args.files, "target_task_s": args.target, "workers": args.workers,
              "repeat": args.repeat, "wall_s": time.perf_counter() - t0, "rows": rows}
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
