"""Per-chunk wall times of the ADL queries, measured here: the facility simulator draws chunk durations
from them (``casa_benchmarks/chunk_durations.json``).

    python -m casa_benchmarks.chunk_durations --queries 1,6,8 --chunksize 100000 --repeat 3 \\
        --out casa_benchmarks/chunk_durations.json

The iterative backend runs each query over the generated ADL dataset (``--events`` in ``--files``, as
``casa_benchmarks.scaling``) once to warm up (imports, JIT, page cache), then ``--repeat`` times; the report's
row of every chunk gives its wall time (the worker's own measure: reading, decompressing, the query). A
chunk's figure is its fastest of the repeats: this machine is shared, and the slower repeats measure the
other processes more than the chunk. The file keeps the command, the date, the load average and each
query's sample in milliseconds, in chunk order.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from casa_benchmarks.common import DATA_DIR, dataset

DEFAULT_PATH = Path(__file__).with_name("chunk_durations.json")


def measure(queries: list[int], chunksize: int, repeat: int, events: int, files: int) -> dict[str, list[float]]:
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    import casa_executors
    from casa_benchmarks.adl.queries import QUERIES
    from casa_benchmarks.adl.runner import quiet_nanoaod

    quiet_nanoaod()
    paths = dataset(Path(DATA_DIR), events, files)
    ex = casa_executors.iterative(status=False)
    samples: dict[str, list[float]] = {}
    for q in queries:
        best: list[float] | None = None
        for rep in range(repeat + 1):
            runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize, metadata_cache={})
            runner({"adl": paths}, QUERIES[q](), treename="Events")
            walls = [1000.0 * row.wall_s for row in ex.report.rows()]
            if rep == 0:  # warm-up
                continue
            best = walls if best is None else [min(a, b) for a, b in zip(best, walls)]
        samples[f"Q{q}"] = [round(w, 3) for w in best or []]
        print(f"Q{q}: {len(samples[f'Q{q}'])} chunks, median {sorted(best)[len(best) // 2]:.1f} ms", file=sys.stderr)
    return samples


def load(path: str | os.PathLike[str] = DEFAULT_PATH) -> dict:
    """The stored measurement: ``{"command", "date", "samples_ms": {"Q1": [...], ...}, ...}``."""
    return json.loads(Path(path).read_text())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", default="1,6,8")
    ap.add_argument("--chunksize", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--events", type=int, default=4_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--out", default=str(DEFAULT_PATH))
    args = ap.parse_args(argv)
    queries = [int(q) for q in args.queries.split(",")]
    load_before = os.getloadavg()
    samples = measure(queries, args.chunksize, args.repeat, args.events, args.files)
    doc = {
        "command": "python -m casa_benchmarks.chunk_durations " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before / "
                   f"{os.getloadavg()[0]:.1f} after (shared with other jobs)",
        "backend": "iterative", "chunksize": args.chunksize, "events": args.events, "files": args.files,
        "statistic": f"per chunk, the fastest of {args.repeat} repeats after a warm-up run",
        "samples_ms": samples,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
