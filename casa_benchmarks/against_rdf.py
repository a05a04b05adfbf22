"""Ours against RDataFrame, timed in turn: iterative against single-thread RDataFrame, futures with
N workers against RDataFrame with implicit multithreading on N threads.

    python -m casa_benchmarks.against_rdf --events 4000000 --files 8 --chunksizes 100000,500000 --repeat 3

``python -m casa_benchmarks.adl run --peers rdataframe`` times each contender's queries in a block, a minute
or more apart, and this machine's speed drifts by up to 2x between minutes; here every round runs the
four contenders one after the other on the same query (each first in turn), and each keeps its fastest
round. RDataFrame runs in a subprocess of its own (ROOT stays out of this process and its workers)
that answers one query at a time, at its best: compiled with ``EXTRA_CLING_ARGS=-O2``, and timed by its
event loop as it times it, the just-in-time compilation of the query's expressions apart
(``rdf_total_s`` has the whole call); ours include everything (coffea's preprocessing too). Every
output is checked against RDataFrame's counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

import casa_executors
from casa_benchmarks.adl.runner import counts_of
from casa_benchmarks.common import dataset, dataset_options, rotated, save_json, timed

CONTENDERS = ["iterative", "futures", "rdf-st", "rdf-mt"]


class RdfServer:
    """``python -m casa_benchmarks.adl.rdf --serve``: one query per request, JIT warmed once."""

    def __init__(self, files: list[str], queries: list[int]) -> None:
        cmd = [sys.executable, "-m", "casa_benchmarks.adl.rdf", "--serve", "--queries", ",".join(map(str, queries)), *files]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().startswith('{"ready"'):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the RDataFrame server did not start (exit code {self.proc.returncode})")

    def run(self, query: int, threads: int) -> dict:
        self.proc.stdin.write(f"{query} {threads}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    dataset_options(ap, events=4_000_000, files=8, chunksize=100_000)
    ap.add_argument("--chunksizes", default="100000,500000")
    ap.add_argument("--queries", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per query; each contender keeps its fastest")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    files = dataset(Path(args.data_dir), args.events, args.files)
    queries = [int(q) for q in args.queries.split(",")]
    rows = []
    with contextlib.ExitStack() as stack:  # the RDataFrame process and the futures pool stop whatever happens
        rdf = RdfServer(files, queries)
        stack.callback(rdf.close)
        ours = {"iterative": casa_executors.iterative(status=False),
                "futures": casa_executors.futures(status=False, workers=args.workers)}
        ours["futures"].backend.hold()
        stack.callback(ours["futures"].backend.release)
        for q in queries:  # warm: imports, JIT on every worker, files in the page cache
            timed(ours["iterative"], files, q, 100_000)
            timed(ours["futures"], files, q, 100_000)
        for chunksize in (int(c) for c in args.chunksizes.split(",")):
            for q in queries:
                best: dict[str, float] = {}
                counts: dict[str, dict] = {}
                rdf_total: dict[str, float] = {}
                cling_args = ""
                for rep in range(args.repeat):
                    for who in rotated(CONTENDERS, rep):
                        if who.startswith("rdf"):
                            r = rdf.run(q, 0 if who == "rdf-st" else args.workers)
                            wall, got = r["wall_s"], {k: np.asarray(v, dtype=np.int64) for k, v in r["counts"].items()}
                            rdf_total[who] = min(rdf_total.get(who, r["total_s"]), r["total_s"])
                            cling_args = r.get("cling_args", "")
                        else:
                            wall, out = timed(ours[who], files, q, chunksize)
                            got = counts_of(out, q)
                        best[who] = min(best.get(who, wall), wall)
                        counts[who] = got
                same = all(set(c) == set(counts["rdf-st"]) and all(np.array_equal(c[k], counts["rdf-st"][k]) for k in c)
                           for c in counts.values())
                row = {"chunksize": chunksize, "query": q, "wall_s": best, "identical": same,
                       "rdf_total_s": rdf_total, "rdf_cling_args": cling_args,
                       "iterative_over_rdf_st": best["rdf-st"] / best["iterative"],
                       "futures_over_rdf_mt": best["rdf-mt"] / best["futures"]}
                rows.append(row)
                print(f"chunks {chunksize:>7d} Q{q}: iterative {best['iterative']:6.2f} s  rdf-st"
                      f" {best['rdf-st']:6.2f} s  ({row['iterative_over_rdf_st']:.2f}x)   futures"
                      f" {best['futures']:6.2f} s  rdf-mt"
                      f" {best['rdf-mt']:6.2f} s  ({row['futures_over_rdf_mt']:.2f}x){'' if same else '  DIFF'}",
                      flush=True)
    return save_json({"events": args.events, "files": args.files, "workers": args.workers,
                      "repeat": args.repeat, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
