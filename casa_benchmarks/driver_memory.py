"""Peak memory of the submitting process against the number of chunks (up to 20,000).

    python -m casa_benchmarks.driver_memory --chunks 1000,5000,20000 --json bench-out/driver_memory.json

Each count runs in a fresh Python process: the executor's engine is started
first (``with ex:``), then one processing call over that many work items (real
coffea ``WorkItem`` objects, one per chunk, with the progress bar on) whose
chunks return a small accumulator; outputs merge on the workers as usual
(``dask`` is a LocalCluster, whose scheduler runs inside the measured process;
``dask-external`` a scheduler and workers of their own, as on a facility). We
report the process's RSS just before the call, its peak RSS (``ru_maxrss``),
the growth per chunk, and the driver's CPU per chunk. What grows with the
chunk count is the bookkeeping the report keeps (one small row per chunk) and
the work items themselves; the merge tree and the tasks in flight do not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny(item) -> dict:
    """A chunk's output: a few numbers (what matters here is the driver's per-chunk bookkeeping)."""
    return {"chunks": 1, "entries": item.entrystop - item.entrystart}


def measure(backend: str, n: int, workers: int, address: str = "") -> dict:
    import psutil
    from coffea.processor.executor import WorkItem

    import casa_executors as ce

    files = [f"root://eos.example//store/data/Run2012B/file-{i:05d}.root" for i in range(max(n // 20, 1))]
    uuids = [uuid.uuid4().bytes for _ in files]
    items = [WorkItem("SingleMu", files[i // 20 % len(files)], "Events", (i % 20) * 10_000, (i % 20 + 1) * 10_000,
                      uuids[i // 20 % len(files)]) for i in range(n)]
    if backend == "dask-external":
        from distributed import Client

        client = Client(address, set_as_default=False)
        client.wait_for_workers(workers)
        ex = ce.dask(client=client, status=True)
    else:
        ex = ce.create(backend, workers=workers, status=True)
    with ex:
        rss0 = psutil.Process().memory_info().rss / 2**20
        cpu0, t0 = time.process_time(), time.perf_counter()
        out, _ = ex(items, tiny, None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert out == {"chunks": n, "entries": 10_000 * n}, out
    s = ex.report.summary()
    return {"backend": backend, "chunks": n, "rss_before_mb": rss0, "peak_rss_mb": peak,
            "growth_mb": peak - rss0, "growth_kb_per_chunk": 1024 * (peak - rss0) / n,
            "driver_cpu_ms_per_chunk": 1000 * cpu / n, "wall_s": wall, "merge": s["merge"]}


def _one(backend: str, n: int, workers: int, address: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "casa_benchmarks.driver_memory", "--one", backend, str(n), str(workers),
                           address], capture_output=True, text=True, cwd=REPO, timeout=3600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        return {"backend": backend, "chunks": n, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--chunks", default="1000,5000,20000")
    ap.add_argument("--backends", default="futures,dask,dask-external",
                    help="dask: a LocalCluster (its scheduler lives in this process); dask-external: a scheduler "
                         "and workers of their own")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.one:
        backend, n, workers, address = args.one
        print(json.dumps(measure(backend, int(n), int(workers), address)))
        return {}
    from casa_benchmarks.submit_ceiling import start_cluster
    from casa_executors import procs
    from casa_executors.standins.ports import free_port

    results = []
    for backend in args.backends.split(","):
        cluster, address = [], "-"
        if backend == "dask-external":
            port = free_port()
            cluster, address = start_cluster(args.workers, port), f"tcp://127.0.0.1:{port}"
        try:
            for n in (int(c) for c in args.chunks.split(",")):
                results.append(_one(backend, n, args.workers, address))
                print(json.dumps(results[-1]), flush=True)
        finally:
            for p in cluster:
                procs.terminate_tree(p)
    lines = ["| backend | chunks | RSS before MB | peak RSS MB | growth MB | growth kB/chunk | driver CPU ms/chunk |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" not in r:
            lines.append(f"| {r['backend']} | {r['chunks']} | {r['rss_before_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['growth_mb']:.1f} | {r['growth_kb_per_chunk']:.2f} | "
                         f"{r['driver_cpu_ms_per_chunk']:.2f} |")
    doc = {"command": "python -m casa_benchmarks.driver_memory " + " ".join(argv or sys.argv[1:]),
           "results": results, "table": "\n".join(lines)}
    print(doc["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
