"""What ``on_progress`` costs: the same Runner call with the hook off and on, side by side.

    python -m casa_benchmarks.progress_cost --backends iterative,futures --repeat 3 --json bench-out/progress_cost.json

On the synthetic ADL dataset (``--events`` in ``--files``, chunks of ``--chunksize``), ADL query
``--query`` runs per backend, engine held and warmed, in three ways in turn (``rotated``), fastest of
``--repeat`` kept:

* ``off``: no callback (the default);
* ``every``: a callback that does nothing, ``progress_interval=0``: called after every step of the
  driver that brought outputs, the most it can be called;
* ``1s``: the same callback, ``progress_interval=1.0`` (the default interval).

Reported per contender: wall time, ``over_off`` (its wall time / off's), the callback's calls, and from
the report (``summary()["progress"]``) the driver's time adding outputs into the partial view
(``add_ms_per_chunk``: the deep copy of the first, coffea's ``iadd`` of the others, and reading them back
where the outputs do not come to the driver). ``identical``: the run's histograms, flow bins included,
are those of ``off`` (the partial view never touches the run's output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import casa_executors
from casa_benchmarks.adl.runner import quiet_nanoaod
from casa_benchmarks.common import counts, dataset, dataset_options, rotated, save_json, timed

CONTENDERS = {"off": None, "every": 0.0, "1s": 1.0}  # name -> progress_interval (None: no callback)


def measure(backend: str, files: list[str], query: int, chunksize: int, workers: int, repeat: int) -> dict:
    calls = {"n": 0}

    def nothing(p: casa_executors.Progress) -> None:
        calls["n"] += 1

    options = {"workers": workers} if backend != "iterative" else {}
    executors = {name: casa_executors.create(backend, status=False, **options,
                                             **({} if interval is None else
                                                {"on_progress": nothing, "progress_interval": interval}))
                 for name, interval in CONTENDERS.items()}
    best: dict[str, dict] = {}
    reference = None
    for ex in executors.values():
        ex.backend.hold()
    try:
        for ex in executors.values():
            timed(ex, files[:1], query, chunksize)  # warm: worker processes, imports, JIT
        for rep in range(repeat):
            for name in rotated(list(CONTENDERS), rep):
                calls["n"] = 0
                wall, out = timed(executors[name], files, query, chunksize)
                summary = executors[name].report.summary()
                got = counts(out, flow=True)
                if reference is None:
                    reference = got
                progress = summary["progress"] or {}
                row = {"wall_s": wall, "chunks": summary["chunks"], "calls": calls["n"],
                       "add_s": progress.get("add_s", 0.0),
                       "add_ms_per_chunk": 1e3 * progress.get("add_s", 0.0) / max(summary["chunks"], 1),
                       "identical": got == reference}
                if name not in best or wall < best[name]["wall_s"]:
                    best[name] = row
    finally:
        for ex in executors.values():
            ex.backend.release()
    for row in best.values():
        row["over_off"] = row["wall_s"] / best["off"]["wall_s"]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m casa_benchmarks.progress_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="iterative,futures")
    ap.add_argument("--query", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    dataset_options(ap, events=400_000, files=4, chunksize=10_000)
    args = ap.parse_args(argv)
    quiet_nanoaod()
    files = dataset(Path(args.data_dir), args.events, args.files)
    result = {"query": args.query, "events": args.events, "chunksize": args.chunksize, "workers": args.workers,
              "backends": {}}
    for backend in args.backends.split(","):
        rows = measure(backend, files, args.query, args.chunksize, args.workers, args.repeat)
        result["backends"][backend] = rows
        for name, r in rows.items():
            print(f"{backend:10s} {name:6s} {r['wall_s']:7.3f} s  x{r['over_off']:.3f}  {r['calls']:4d} calls  "
                  f"{r['add_ms_per_chunk']:.3f} ms/chunk adding  identical={r['identical']}", file=sys.stderr)
    save_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
