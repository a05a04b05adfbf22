"""The submitting process's ceiling: chunks that return 8 MB and 32 MB histograms.

    python -m casa_benchmarks.submit_ceiling --json bench-out/submit_ceiling.json

A Dask scheduler and ``--workers`` workers run as processes of their own (as on
a facility), so the CPU and memory measured are the submitting process's only.
Each configuration runs in a fresh Python process connected to that cluster:
``casa`` (ours: outputs stay in worker memory and merge there), ``casa-driver``
(ours with ``merge="driver"``: every output comes back and merges in the
submitting process, as before issue 9) and ``coffea`` (coffea's
``DaskExecutor`` on the same kind of client, tree reduction on the workers).

Every chunk opens the real 1000-event sample (copies of it, 10 chunks a file)
and returns a histogram of ``MB`` megabytes of dense, incompressible doubles
(random, seeded by the chunk). Preprocessing is done once beforehand (coffea's
metadata cache), so only the processing call is measured:

* ``wall_s`` against ``ideal_s`` = the workers' summed chunk wall time / workers
  (merging for free);
* ``driver_cpu_ms_per_chunk``: ``time.process_time()`` of the submitting process
  over the call, per chunk; ``ceiling_chunks_per_s`` = 1000 / that (what one
  submitting process could take in, whatever the cluster's size); the table's
  ``marginal`` column is the CPU per extra chunk between the two counts (fixed
  costs such as fetching the final output cancel out);
* ``peak_rss_mb``: the process's peak RSS (``ru_maxrss``) and ``rss_growth_mb``
  over its RSS just before the call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import cloudpickle
import hist
import numpy as np
from coffea import processor
from coffea.nanoevents import NanoAODSchema

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "Run2012B_SingleMu-1000.parquet"
CHUNKSIZE = 100  # 10 chunks per 1000-event file
EXECUTORS = ("casa", "casa-driver", "coffea")


class BigHist(processor.ProcessorABC):
    """One dense histogram of ``nbins`` doubles per chunk (8 bytes a bin), different in every chunk."""

    def __init__(self, nbins: int) -> None:
        self.nbins = nbins

    def process(self, events):
        meta = events.metadata
        rng = np.random.default_rng([zlib.crc32(meta["filename"].encode()), meta["entrystart"]])
        h = hist.Hist.new.Reg(self.nbins, 0, 1, name="x").Double()
        h.view(flow=True)[:] = rng.random(self.nbins + 2)
        return {"h": h, "events": len(events)}

    def postprocess(self, accumulator):
        return accumulator


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nbins(mb: int) -> int:
    return mb * 1_000_000 // 8 - 2


# -- one measured call, in a process of its own ---------------------------------------------------


def measure(spec: dict) -> dict:
    from distributed import Client

    import casa_executors as ce

    warnings.filterwarnings("ignore")
    with open(spec["metadata"], "rb") as f:
        cache = pickle.load(f)
    files = spec["files"]
    client = Client(spec["address"], set_as_default=False)
    client.wait_for_workers(spec["workers"])
    name = spec["executor"]
    if name == "coffea":
        ex = processor.DaskExecutor(client=client, status=False)
    else:
        ex = ce.dask(client=client, status=False, merge="driver" if name == "casa-driver" else "auto")
    runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=CHUNKSIZE, metadata_cache=cache)
    rss0 = _rss_mb()
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = runner({"big": files}, BigHist(nbins(spec["mb"])), treename="Events")
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        **{k: spec[k] for k in ("executor", "mb", "chunks")},
        "wall_s": wall,
        "driver_cpu_s": cpu,
        "driver_cpu_ms_per_chunk": 1000 * cpu / spec["chunks"],
        "ceiling_chunks_per_s": spec["chunks"] / cpu if cpu > 0 else math.inf,
        "peak_rss_mb": peak,
        "rss_before_mb": rss0,
        "rss_growth_mb": peak - rss0,
        "events": out["events"],
        "digest": hashlib.blake2b(out["h"].view(flow=True).tobytes(), digest_size=8).hexdigest(),
        "sum": float(out["h"].view(flow=True).sum()),
    }
    if name != "coffea":
        rows = ex.report.rows()
        result["chunk_wall_sum_s"] = sum(r.wall_s for r in rows)
        result["merge"] = ex.report.summary()["merge"]
    client.close()
    return result


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# -- the driver of the benchmark --------------------------------------------------------------------


def start_cluster(workers: int, port: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    dask = str(Path(sys.executable).with_name("dask"))
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], **quiet)]
    procs += [subprocess.Popen([dask, "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--nanny",
                                "--memory-limit", "0", "--host", "127.0.0.1"], **quiet) for _ in range(workers)]
    return procs


def prepare(directory: Path, n_files: int) -> tuple[list[str], str]:
    """``n_files`` copies of the sample and a pickled metadata cache for them."""
    from casa_benchmarks.adl.sample import write_root

    first = directory / "sample-000.root"
    if not first.exists():
        write_root(str(SAMPLE), str(first))
    files = [str(first)]
    for i in range(1, n_files):
        p = directory / f"sample-{i:03d}.root"
        if not p.exists():
            shutil.copy(first, p)
        files.append(str(p))
    cache: dict = {}
    runner = processor.Runner(executor=processor.IterativeExecutor(status=False), schema=NanoAODSchema,
                              chunksize=CHUNKSIZE, metadata_cache=cache)
    runner.preprocess({"big": files}, treename="Events")
    path = directory / f"metadata-{n_files}.pkl"
    path.write_bytes(pickle.dumps(cache))
    return files, str(path)


def run_one(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "casa_benchmarks.submit_ceiling", "--one", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO, timeout=3600)
    if proc.returncode != 0:
        return {**{k: spec[k] for k in ("executor", "mb", "chunks")}, "error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_chunks(text: str) -> dict[int, list[int]]:
    """``8:120,360/32:40,120`` -> {8: [120, 360], 32: [40, 120]}"""
    out = {}
    for part in text.split("/"):
        mb, counts = part.split(":")
        out[int(mb)] = [int(c) for c in counts.split(",")]
    return out


def marginal(results: list[dict]) -> dict[tuple[str, int], float]:
    """Driver CPU per extra chunk between the smallest and largest count (fixed costs cancel out:
    connecting, the first submission, fetching the one final output)."""
    out = {}
    for name in {r["executor"] for r in results}:
        for mb in {r["mb"] for r in results}:
            runs = sorted((r for r in results if r["executor"] == name and r["mb"] == mb and "error" not in r),
                          key=lambda r: r["chunks"])
            if len(runs) >= 2 and runs[-1]["chunks"] > runs[0]["chunks"]:
                lo, hi = runs[0], runs[-1]
                out[name, mb] = 1000 * (hi["driver_cpu_s"] - lo["driver_cpu_s"]) / (hi["chunks"] - lo["chunks"])
    return out


def table(results: list[dict]) -> str:
    head = ("| executor | output | chunks | wall s | ideal s | driver CPU ms/chunk | marginal ms/chunk "
            "| ceiling chunks/s | peak RSS MB | RSS growth MB |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    extra = marginal(results)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['executor']} | {r['mb']} MB | {r['chunks']} | error | | | | | | |")
            continue
        m = extra.get((r["executor"], r["mb"]))
        lines.append(f"| {r['executor']} | {r['mb']} MB | {r['chunks']} | {r['wall_s']:.1f} | {r['ideal_s']:.1f} "
                     f"| {r['driver_cpu_ms_per_chunk']:.1f} | {'' if m is None else f'{m:.1f}'} "
                     f"| {r['ceiling_chunks_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunks", default="8:120,360/32:40,120", help="MB:count,count/MB:count,... (default %(default)s)")
    ap.add_argument("--executors", default=",".join(EXECUTORS))
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "casa-submit-ceiling"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return {}
    from casa_executors import procs
    from casa_executors.standins.ports import free_port

    plan = parse_chunks(args.chunks)
    directory = Path(args.data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    n_files = max(math.ceil(c / (1000 // CHUNKSIZE)) for counts in plan.values() for c in counts)
    files, metadata = prepare(directory, n_files)
    port = free_port()
    cluster = start_cluster(args.workers, port)
    results = []
    try:
        base = {"address": f"tcp://127.0.0.1:{port}", "workers": args.workers, "metadata": metadata}
        run_one({**base, "executor": "casa", "mb": 1, "chunks": 20, "files": files[:2]})  # warm the workers
        for mb, counts in plan.items():
            for chunks in counts:
                spec = {**base, "mb": mb, "chunks": chunks, "files": files[: chunks // (1000 // CHUNKSIZE)]}
                batch = [run_one({**spec, "executor": name}) for name in args.executors.split(",")]
                work = next((r["chunk_wall_sum_s"] for r in batch if "chunk_wall_sum_s" in r), math.nan)
                ours = {r["digest"] for r in batch if r["executor"].startswith("casa") and "digest" in r}
                for r in batch:
                    r["ideal_s"] = work / args.workers
                    r["identical_among_casa"] = len(ours) == 1
                    print(json.dumps(r), flush=True)
                results += batch
    finally:
        for p in cluster:
            procs.terminate_tree(p)
    doc = {"config": {"workers": args.workers, "chunks": plan, "chunksize": CHUNKSIZE, "cores": os.cpu_count(),
                      "command": "python -m casa_benchmarks.submit_ceiling " + " ".join(argv or sys.argv[1:])},
           "results": results, "table": table(results)}
    print(doc["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return doc


if __name__ == "__main__":
    main()
