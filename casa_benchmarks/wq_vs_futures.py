"""Work Queue against the futures backend on ADL query 6, same workers, same data.

    python -m casa_benchmarks.wq_vs_futures --events 2000000 --files 8 --workers 2 --json out.json

Contenders, each through ``coffea.processor.Runner`` (preprocessing included):
``futures`` and ``workqueue`` called cold (engine started per Runner call, as a
user who just calls Runner gets) and held (``with ex:`` across calls), plus
``workqueue-fresh`` (held, ``warm=False``: every task a fresh interpreter, only
batching amortises the start-up). The order rotates between repetitions;
medians, event rates and the ratio to futures go to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
from pathlib import Path

import casa_executors
from casa_benchmarks.common import counts, dataset, dataset_options, rotated, save_json, timed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_options(ap, events=2_000_000, files=8, chunksize=100_000)
    ap.add_argument("--query", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    files = dataset(Path(args.data_dir), args.events, args.files)
    w = args.workers
    held = {
        "futures-held": casa_executors.futures(workers=w, status=False),
        "workqueue-held": casa_executors.workqueue(workers=w, status=False),
        "workqueue-fresh": casa_executors.workqueue(workers=w, warm=False, status=False),
    }
    contenders = {
        "futures-cold": lambda: casa_executors.futures(workers=w, status=False),
        "workqueue-cold": lambda: casa_executors.workqueue(workers=w, status=False),
        **{name: (lambda ex=ex: ex) for name, ex in held.items()},
    }
    runs, reference = [], None
    with contextlib.ExitStack() as stack:
        for ex in held.values():
            stack.enter_context(ex)
        for rep in range(args.repeat):
            for name in rotated(list(contenders), rep):
                ex = contenders[name]()
                wall, out = timed(ex, files, args.query, args.chunksize)
                hists = counts(out, flow=True)
                reference = reference or hists
                s = ex.report.summary()
                runs.append({"contender": name, "rep": rep, "wall_s": wall, "events_per_s": args.events / wall,
                             "tasks_attempts": s["attempts"], "chunks": s["chunks"],
                             "identical": hists == reference and out["events"] == args.events})
    med = {n: statistics.median(r["wall_s"] for r in runs if r["contender"] == n) for n in contenders}
    summary = {
        "median_wall_s": med,
        "events_per_s": {n: args.events / m for n, m in med.items()},
        "wq_cold_over_futures_cold": med["workqueue-cold"] / med["futures-cold"],
        "wq_held_over_futures_held": med["workqueue-held"] / med["futures-held"],
        "wq_fresh_over_futures_held": med["workqueue-fresh"] / med["futures-held"],
    }
    result = {"events": args.events, "files": args.files, "workers": w, "chunksize": args.chunksize,
              "query": args.query, "runs": runs, "summary": summary,
              "all_identical": all(r["identical"] for r in runs)}
    for n, m in med.items():
        print(f"{n:16s} {m:6.2f} s  {args.events / m / 1e3:8.0f} kHz")
    print(f"workqueue/futures wall: cold {summary['wq_cold_over_futures_cold']:.2f}x, "
          f"held {summary['wq_held_over_futures_held']:.2f}x, "
          f"fresh interpreters {summary['wq_fresh_over_futures_held']:.2f}x")
    print("histograms identical across contenders:", result["all_identical"])
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
