"""How far iterative is from this machine's limit on ADL Q1 and Q6: the reading alone, the kernel alone,
and iterative end to end, side by side.

    python -m casa_benchmarks.limit --data DIR --queries 1,6 --chunksize 100000 --repeat 3 --json out.json

* ``read_s``: uproot alone (no coffea) reads and decompresses the branches the query reads, chunk by
  chunk, each file opened once (as a worker keeps it open), into awkward arrays; ``read_whole_s``: the
  same, each file in one call (every basket decompressed once: the floor for the bytes).
* ``kernel_s``: the query's own computation on those arrays, already in memory: the same functions the
  coffea processor calls (``casa_benchmarks.adl.queries``/``kernels``), and the histogram fill.
* ``iterative_s``: ``casa_executors.iterative`` end to end (coffea Runner, NanoEvents), read-ahead on
  and off (``CASA_EXECUTORS_READ_AHEAD``).

``read_s + kernel_s`` is the work itself, done one after the other; ``max(read_s, kernel_s)`` is that
work overlapped on two cores. Everything is read from the page cache (a warm-up pass reads it first).
The fastest of ``--repeat`` runs of each is kept; the load (``os.getloadavg``) is recorded.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from casa_benchmarks.adl.kernels import trijet_closest
from casa_benchmarks.adl.queries import make_hist
from casa_benchmarks.common import save_json

BRANCHES = {
    1: ["MET_pt"],
    6: ["nJet", "Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "Jet_btag"],  # NanoEvents' offsets come from nJet
}


def _ranges(n: int, chunksize: int) -> list[tuple[int, int]]:
    """coffea's chunking of a file of ``n`` entries: equal chunks of at most ``chunksize``."""
    k = max(1, -(-n // chunksize))
    size = -(-n // k)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def read(files: list[str], branches: list[str], chunksize: int) -> tuple[float, list[dict]]:
    """uproot alone: every chunk's branches as awkward arrays."""
    t0 = time.perf_counter()
    chunks = []
    for path in files:
        with uproot.open(path) as f:
            tree = f["Events"]
            for start, stop in _ranges(tree.num_entries, chunksize):
                arrays = tree.arrays(branches, entry_start=start, entry_stop=stop, how=dict)
                chunks.append(arrays)
    return time.perf_counter() - t0, chunks


def read_whole(files: list[str], branches: list[str]) -> float:
    """uproot alone, each file's branches in one call: every basket read and decompressed once (chunks that
    end inside a basket, as ``read`` does, decompress it twice: our workers keep it, casa_executors.baskets)."""
    t0 = time.perf_counter()
    for path in files:
        with uproot.open(path) as f:
            f["Events"].arrays(branches, how=dict)
    return time.perf_counter() - t0


def kernel(query: int, chunks: list[dict]) -> tuple[float, int]:
    """The query's computation and fill on arrays in memory; the total count filled (a check)."""
    t0 = time.perf_counter()
    filled = 0
    for c in chunks:
        if query == 1:
            h = make_hist("q1")
            h.fill(ak.to_numpy(c["MET_pt"]))
            filled += int(h.sum(flow=True))
        elif query == 6:
            offsets = np.zeros(len(c["nJet"]) + 1, dtype=np.int64)
            np.cumsum(ak.to_numpy(c["nJet"]), out=offsets[1:])
            flat = [ak.to_numpy(ak.flatten(c[f"Jet_{v}"])) for v in ("pt", "eta", "phi", "mass", "btag")]
            pt, btag, _ = trijet_closest(offsets, *flat)
            for name, values in (("q6_pt", pt), ("q6_btag", btag)):
                h = make_hist(name)
                h.fill(values)
                filled += int(h.sum(flow=True))
        else:
            raise ValueError(f"the limit benchmark has the kernels of Q1 and Q6 only, not Q{query}")
    return time.perf_counter() - t0, filled


def iterative(files: list[str], query: int, chunksize: int, read_ahead: bool) -> tuple[float, int]:
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    import casa_executors
    from casa_benchmarks.adl.queries import QUERIES
    from casa_executors.prefetch import ENV

    os.environ[ENV] = "1" if read_ahead else "0"
    ex = casa_executors.iterative(status=False)
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize, metadata_cache={})
    t0 = time.perf_counter()
    out = runner({"adl": files}, QUERIES[query](), treename="Events")
    wall = time.perf_counter() - t0
    filled = sum(int(v.sum(flow=True)) for k, v in out.items() if k.startswith(f"q{query}"))
    return wall, filled


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory of ADL files (python -m casa_benchmarks.adl generate)")
    ap.add_argument("--queries", default="1,6")
    ap.add_argument("--chunksize", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    files = sorted(str(p) for p in Path(args.data).glob("*.root"))
    events = sum(uproot.open(f)["Events"].num_entries for f in files)
    result: dict = {"files": len(files), "events": events, "chunksize": args.chunksize, "repeat": args.repeat,
                    "load_before": os.getloadavg(), "queries": {}}
    for q in (int(x) for x in args.queries.split(",")):
        read(files, BRANCHES[q], args.chunksize)  # warm-up: page cache, imports, numba
        best: dict[str, float] = {}
        checks: dict[str, int] = {}
        for _ in range(args.repeat):  # one of each per round: the machine's load weighs on all alike
            t, chunks = read(files, BRANCHES[q], args.chunksize)
            best["read_s"] = min(best.get("read_s", t), t)
            t = read_whole(files, BRANCHES[q])
            best["read_whole_s"] = min(best.get("read_whole_s", t), t)
            t, checks["kernel"] = kernel(q, chunks)
            best["kernel_s"] = min(best.get("kernel_s", t), t)
            del chunks
            for mode, on in (("iterative_s", True), ("iterative_no_read_ahead_s", False)):
                t, checks[mode] = iterative(files, q, args.chunksize, on)
                best[mode] = min(best.get(mode, t), t)
        os.environ.pop("CASA_EXECUTORS_READ_AHEAD", None)
        work = best["read_s"] + best["kernel_s"]
        row = {**best, "read_plus_kernel_s": work, "max_read_kernel_s": max(best["read_s"], best["kernel_s"]),
               "iterative_over_read_plus_kernel": best["iterative_s"] / work,
               "iterative_over_max": best["iterative_s"] / max(best["read_s"], best["kernel_s"]),
               "same_counts": len(set(checks.values())) == 1}
        result["queries"][q] = row
        print(f"Q{q} ({events:,} events, chunks of {args.chunksize:,}): read {best['read_s']:.2f} s "
              f"(whole files, each basket once: {best['read_whole_s']:.2f} s), "
              f"kernel {best['kernel_s']:.2f} s, read+kernel {work:.2f} s; iterative {best['iterative_s']:.2f} s "
              f"(read-ahead off {best['iterative_no_read_ahead_s']:.2f} s) = "
              f"{row['iterative_over_read_plus_kernel']:.2f}x "
              f"read+kernel, {row['iterative_over_max']:.2f}x max(read, kernel); counts agree: {row['same_counts']}",
              flush=True)
    result["load_after"] = os.getloadavg()
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
