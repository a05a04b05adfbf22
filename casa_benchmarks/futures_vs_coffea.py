"""Our futures backend against coffea's FuturesExecutor, side by side in one run.

    python -m casa_benchmarks.futures_vs_coffea --events 400000 --files 4 --workers 2 --json out.json

Each repetition runs the same ADL queries through ``coffea.processor.Runner``
with coffea's ``FuturesExecutor`` (its default loky pool), with
``casa_executors.futures`` called cold (pool started per Runner call, as a
user who just calls Runner gets), and held (``with ex:`` across calls). The
order rotates between repetitions; medians and ratios go to the JSON.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

from coffea import processor

import casa_executors
from casa_benchmarks.common import counts, dataset, dataset_options, rotated, save_json, timed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_options(ap, events=400_000, files=4, chunksize=50_000)
    ap.add_argument("--queries", default="1,6")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    files = dataset(Path(args.data_dir), args.events, args.files)
    w = args.workers
    held = casa_executors.futures(workers=w, status=False)
    contenders = {
        "coffea-futures": lambda: processor.FuturesExecutor(workers=w, status=False),
        "casa-futures-cold": lambda: casa_executors.futures(workers=w, status=False),
        "casa-futures-held": lambda: held,
    }
    runs = []
    with held:
        for q in (int(x) for x in args.queries.split(",")):
            reference = None
            for rep in range(args.repeat):
                for name in rotated(list(contenders), rep):
                    wall, out = timed(contenders[name](), files, q, args.chunksize)
                    hists = counts(out)
                    reference = reference or hists
                    runs.append({"query": q, "contender": name, "rep": rep, "wall_s": wall,
                                 "events_per_s": args.events / wall, "identical": hists == reference})
    summary = {}
    for q in {r["query"] for r in runs}:
        med = {n: statistics.median(r["wall_s"] for r in runs if r["query"] == q and r["contender"] == n)
               for n in contenders}
        summary[f"q{q}"] = {"median_wall_s": med,
                            "cold_over_coffea": med["casa-futures-cold"] / med["coffea-futures"],
                            "held_over_coffea": med["casa-futures-held"] / med["coffea-futures"]}
    result = {"events": args.events, "files": args.files, "workers": w, "chunksize": args.chunksize,
              "runs": runs, "summary": summary,
              "all_identical": all(r["identical"] for r in runs)}
    for q, s in sorted(summary.items()):
        m = s["median_wall_s"]
        print(f"{q}: coffea {m['coffea-futures']:.2f} s, ours cold {m['casa-futures-cold']:.2f} s "
              f"({s['cold_over_coffea']:.2f}x), held {m['casa-futures-held']:.2f} s ({s['held_over_coffea']:.2f}x)")
    print("histograms identical across contenders:", result["all_identical"])
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
