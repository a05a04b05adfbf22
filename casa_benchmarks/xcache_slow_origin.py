"""The ADL queries read from a slow origin: directly, through a cold XCache, through a warm one.

    python -m casa_benchmarks.xcache_slow_origin --events 400000 --files 4 --rate 25mbit --rtt-ms 20 --json out.json
    python -m casa_benchmarks.xcache_slow_origin --events 400000 --files 4 --latency-bound --no-concurrent

The physical limit of each run is the larger of the bytes over the link's rate and the computation
alone (the same suite from local disk); direct and cold are quoted against it, warm against local disk.

The origin runs in a network namespace behind a ``tc tbf`` rate limit and a
relay that adds the round-trip delay (this kernel has no netem). One backend
(futures, 2 workers) runs all eight queries per scenario; "concurrent" runs
two such clients at once. Root is needed for the namespaces.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors
from casa_benchmarks.adl.generate import generate
from casa_benchmarks.adl.queries import QUERIES
from casa_benchmarks.common import counts as hist_counts
from casa_benchmarks.common import save_json
from casa_executors.prefetch import ENV as READ_AHEAD_ENV
from casa_executors.standins.slowlink import slow_origin
from casa_executors.standins.xrootd import XCache


def rate_bits(rate: str) -> float:
    """A tc rate (``25mbit``, ``500mbit``, ``1gbit``, ``800kbit``) in bits per second."""
    text = rate.strip().lower()
    for suffix, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    raise ValueError(f"not a tc rate in bits: {rate!r} (e.g. 25mbit)")


def adl_suite(urls: list[str], cache: str | None, workers: int, chunksize: int) -> dict:
    """All eight queries, one executor held across them; wall time and bytes."""
    ex = casa_executors.futures(workers=workers, status=False, cache=cache, retries=1)
    t0 = time.perf_counter()
    nbytes, served, counts = 0, {}, {}
    with ex:
        for q, proc in QUERIES.items():
            runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize, metadata_cache={})
            out = runner({"adl": urls}, proc(), treename="Events")
            counts[q] = hist_counts(out)
            s = ex.report.summary()
            nbytes += s["bytes_read"]
            for k, v in s["served_by"].items():
                served[k] = served.get(k, 0) + v
    return {"wall_s": time.perf_counter() - t0, "bytes_read": nbytes, "served_by": served, "counts": counts}


def concurrent(n: int, *args) -> dict:
    results: list[dict] = [{} for _ in range(n)]

    def one(i: int) -> None:
        results[i] = adl_suite(*args)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "clients": n,
            "client_wall_s": [r.get("wall_s") for r in results],
            "counts_equal": all(r.get("counts") == results[0].get("counts") for r in results)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rate", default="25mbit")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunksize", type=int, default=100_000)
    ap.add_argument("--blocksize", default="128k", help="XCache pfc.blocksize (1m over-fetches small baskets)")
    ap.add_argument("--burst", default=None, help="tc tbf burst (default 64kb; 1mb with --latency-bound)")
    ap.add_argument("--latency-bound", action="store_true",
                    help="a fast, far link: 500 Mbit/s and 50 ms RTT (overrides --rate and --rtt-ms)")
    ap.add_argument("--no-concurrent", action="store_true", help="skip the two-client runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.latency_bound:
        args.rate, args.rtt_ms = "500mbit", 50.0
    burst = args.burst or ("1mb" if args.latency_bound else "64kb")  # tbf needs burst >= rate / HZ
    warnings.filterwarnings("ignore")
    data = Path(tempfile.mkdtemp(prefix="casa-slow-origin-"))
    data.chmod(0o755)
    (data / "store").mkdir(mode=0o755)
    result: dict = {"events": args.events, "files": args.files, "rate": args.rate, "rtt_ms": args.rtt_ms,
                    "burst": burst, "blocksize": args.blocksize, "load_before": os.getloadavg(),
                    "read_ahead": os.environ.get(READ_AHEAD_ENV, "1"),
                    "backend": f"futures({args.workers})"}
    try:
        gen = generate(data / "store", args.events, args.files, seed=3)
        for f in gen.files:
            Path(f).chmod(0o644)
        result["dataset_bytes"] = gen.bytes_written
        with slow_origin(data, rate=args.rate, rtt_ms=args.rtt_ms, burst=burst) as origin:
            urls = [origin.url(f"/store/{Path(f).name}") for f in gen.files]
            run = (args.workers, args.chunksize)
            result["local"] = adl_suite(gen.files, None, *run)  # the floor: same files from local disk
            result["direct"] = adl_suite(urls, None, *run)
            with XCache(origin, blocksize=args.blocksize) as cache:
                result["cold"] = adl_suite(urls, cache.endpoint, *run)
                result["warm"] = adl_suite(urls, cache.endpoint, *run)
                if not args.no_concurrent:
                    result["warm_concurrent"] = concurrent(2, urls, cache.endpoint, *run)
            if not args.no_concurrent:
                with XCache(origin, blocksize=args.blocksize) as cache:
                    result["cold_concurrent"] = concurrent(2, urls, cache.endpoint, *run)
                result["direct_concurrent"] = concurrent(2, urls, None, *run)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    ref = result["direct"]["counts"]
    result["identical"] = all(result[k]["counts"] == ref for k in ("local", "cold", "warm"))
    for k in ("local", "direct", "cold", "warm"):
        result[k].pop("counts")
    d, c, w = (result[k]["wall_s"] for k in ("direct", "cold", "warm"))
    result["cold_over_direct"] = c / d
    result["direct_over_warm"] = d / w
    result["warm_over_local"] = w / result["local"]["wall_s"]
    # the physical limit: the bytes over the link's rate, or the computation alone (local disk), the larger
    link_s = result["direct"]["bytes_read"] * 8 / rate_bits(args.rate)
    result["link_s"] = link_s
    result["limit_s"] = limit = max(link_s, result["local"]["wall_s"])
    result["direct_over_limit"] = d / limit
    result["cold_over_limit"] = c / limit
    result["load_after"] = os.getloadavg()
    print(f"ADL (8 queries), {args.events} events, origin {args.rate} + {args.rtt_ms} ms RTT, {result['backend']}:")
    for k in ("local", "direct", "cold", "warm"):
        r = result[k]
        print(f"  {k:6s} {r['wall_s']:7.1f} s  {r['bytes_read'] / 1e6:8.1f} MB  served by {r['served_by']}")
    for k in ("direct_concurrent", "cold_concurrent", "warm_concurrent") if not args.no_concurrent else ():
        print(f"  {k:18s} 2 clients: {result[k]['wall_s']:.1f} s (each {result[k]['client_wall_s']})")
    print(f"  link limit {link_s:.1f} s ({result['direct']['bytes_read'] / 1e6:.1f} MB at {args.rate}); "
          f"direct/limit = {result['direct_over_limit']:.2f}, cold/limit = {result['cold_over_limit']:.2f}, "
          f"load {result['load_before']} -> {result['load_after']}")
    print(f"  cold/direct = {result['cold_over_direct']:.2f} (target <= 1.10), "
          f"direct/warm = {result['direct_over_warm']:.1f}x (target >= 5), "
          f"warm/local-disk = {result['warm_over_local']:.2f}, identical: {result['identical']}")
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
