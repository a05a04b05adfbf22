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
import contextlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
import warnings
from pathlib import Path

import psutil
from coffea import processor
from coffea.nanoevents import NanoAODSchema
from coffea.nanoevents.trace import trace

import casa_executors
from casa_benchmarks.adl.dataset import default_dataset
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


SESSION = {"metadata_per_query": False, "warm_pool": True, "trace": False}  # how a client session runs (main's flags)


def export_dataset(store: Path, events: int, files: int) -> list[str]:
    """The generated dataset (made once, cached: ``casa_benchmarks.adl.dataset``) linked into the origin's
    export directory, readable by the xrootd user."""
    out = []
    for f in default_dataset(events, files, seed=3):
        link = store / Path(f).name
        try:
            os.link(f, link)
        except OSError:  # another file system
            shutil.copyfile(f, link)
        link.chmod(0o644)
        out.append(str(link))
    return out


def adl_suite(urls: list[str], cache: str | None, workers: int, chunksize: int) -> dict:
    """All eight queries, one executor held across them, as one analyst's session; wall time and bytes.

    The session keeps one metadata cache for its eight Runner calls, as coffea's Runner does by default
    (a process-wide cache): each file's entries and UUID cross the link once per session, not per query.
    The worker pool is started before the clock (a held executor's start-up is not reading).
    """
    ex = casa_executors.futures(workers=workers, status=False, cache=cache, retries=1)
    metadata: dict = {}
    nbytes, served, counts, per_query = 0, {}, {}, {}
    with ex:
        if SESSION["warm_pool"]:
            for f in [ex.backend.submit(abs, -1) for _ in range(workers)]:
                f.result()
        t0 = time.perf_counter()
        for q, proc in QUERIES.items():
            tq = time.perf_counter()
            runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=chunksize,
                                      metadata_cache={} if SESSION["metadata_per_query"] else metadata)
            out = runner({"adl": urls}, proc(), treename="Events", trace=trace if SESSION["trace"] else None)
            counts[q] = hist_counts(out)
            s = ex.report.summary()
            nbytes += s["bytes_read"]
            for k, v in s["served_by"].items():
                served[k] = served.get(k, 0) + v
            per_query[q] = (round(time.perf_counter() - tq, 3), s["bytes_read"])
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "bytes_read": nbytes, "served_by": served, "counts": counts, "query_s": per_query}


def server_cpu_s(servers: list) -> float:
    """CPU seconds the servers' processes (XRootD, relays) have used so far: on this 2-core machine they
    share the cores with the workers, which a cache on a node of its own would not."""
    total = 0.0
    for server in servers:
        for pid in server.pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
    return total


def scenario(servers: list, run, *args) -> dict:
    """``run(*args)``, with the CPU the servers used meanwhile and the bytes that crossed the link
    (``servers[0]`` is the origin)."""
    before, sent = server_cpu_s(servers), servers[0].bytes_sent()
    out = run(*args)
    out["server_cpu_s"] = round(server_cpu_s(servers) - before, 3)
    out["link_bytes"] = servers[0].bytes_sent() - sent
    return out


def concurrent(n: int, *args) -> dict:
    """``n`` clients running ``adl_suite(*args)`` at once; a client's error is raised here, not lost in its thread."""
    with ThreadPoolExecutor(n) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda _: adl_suite(*args), range(n)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "clients": n, "client_wall_s": [r["wall_s"] for r in results],
            "bytes_read": [r["bytes_read"] for r in results], "counts": results[0]["counts"],
            "counts_equal": all(r["counts"] == results[0]["counts"] for r in results)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rate", default="25mbit")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunksize", type=int, default=100_000)
    ap.add_argument("--blocksize", default="128k", help="XCache pfc.blocksize (1m over-fetches small baskets)")
    ap.add_argument("--cache-ram", default="1g",
                    help="XCache pfc.ram: its RAM for blocks in flight; when full, it reads past the cache")
    ap.add_argument("--cache-prefetch", type=int, default=0,
                    help="XCache pfc.prefetch: blocks it reads ahead in file order (0: none; XCache's own default: 10)")
    ap.add_argument("--burst", default=None, help="tc tbf burst (default 64kb; 1mb with --latency-bound)")
    ap.add_argument("--latency-bound", action="store_true",
                    help="a fast, far link: 500 Mbit/s and 50 ms RTT (overrides --rate and --rtt-ms)")
    ap.add_argument("--no-concurrent", action="store_true", help="skip the two-client runs")
    ap.add_argument("--metadata-per-query", action="store_true",
                    help="a fresh coffea metadata cache for every query (default: one per client session)")
    ap.add_argument("--trace", action="store_true",
                    help="with coffea's column tracing (Runner(trace=coffea.nanoevents.trace.trace)): branches preloaded")
    ap.add_argument("--cold-pool", action="store_true", help="start the worker pool inside the timing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    SESSION.update(metadata_per_query=args.metadata_per_query, warm_pool=not args.cold_pool, trace=args.trace)
    if args.latency_bound:
        args.rate, args.rtt_ms = "500mbit", 50.0
    burst = args.burst or ("1mb" if args.latency_bound else "64kb")  # tbf needs burst >= rate / HZ
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the workers' NanoAODSchema warnings too
    data = Path(tempfile.mkdtemp(prefix="casa-slow-origin-"))
    data.chmod(0o755)
    (data / "store").mkdir(mode=0o755)
    result: dict = {"events": args.events, "files": args.files, "rate": args.rate, "rtt_ms": args.rtt_ms,
                    "burst": burst, "blocksize": args.blocksize, "cache_ram": args.cache_ram, "cache_prefetch": args.cache_prefetch, "load_before": os.getloadavg(),
                    "read_ahead": os.environ.get(READ_AHEAD_ENV, "1"),
                    "backend": f"futures({args.workers})", **SESSION}
    try:
        files = export_dataset(data / "store", args.events, args.files)
        result["dataset_bytes"] = sum(os.path.getsize(f) for f in files)
        with slow_origin(data, rate=args.rate, rtt_ms=args.rtt_ms, burst=burst) as origin:
            urls = [origin.url(f"/store/{Path(f).name}") for f in files]
            run = (args.workers, args.chunksize)
            result["local"] = adl_suite(files, None, *run)  # the floor: same files from local disk
            result["direct"] = scenario([origin], adl_suite, urls, None, *run)
            with XCache(origin, blocksize=args.blocksize, ram=args.cache_ram, prefetch=args.cache_prefetch) as cache:
                result["cold"] = scenario([origin, cache], adl_suite, urls, cache.endpoint, *run)
                result["warm"] = scenario([origin, cache], adl_suite, urls, cache.endpoint, *run)
                if not args.no_concurrent:
                    result["warm_concurrent"] = scenario([origin, cache], concurrent, 2, urls, cache.endpoint, *run)
            if not args.no_concurrent:
                with XCache(origin, blocksize=args.blocksize, ram=args.cache_ram, prefetch=args.cache_prefetch) as cache:
                    result["cold_concurrent"] = scenario([origin, cache], concurrent, 2, urls, cache.endpoint, *run)
                result["direct_concurrent"] = scenario([origin], concurrent, 2, urls, None, *run)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    ref = result["direct"]["counts"]
    compared = [k for k in ("local", "cold", "warm", "warm_concurrent", "cold_concurrent", "direct_concurrent")
                if k in result]
    result["identical"] = all(result[k]["counts"] == ref and result[k].get("counts_equal", True) for k in compared)
    for k in ("local", "direct", "cold", "warm", *compared):
        result[k].pop("counts", None)
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
    # the same against what crossed the link: a cold cache fetches a block once for all the queries that read
    # it (the clients' bytes count it each time), and the wire carries TCP/IP headers too
    for k in ("direct", "cold", "cold_concurrent", "direct_concurrent"):
        if k in result:
            wire = max(result[k]["link_bytes"] * 8 / rate_bits(args.rate), result["local"]["wall_s"])
            result[k]["wire_limit_s"] = wire
            result[f"{k}_over_wire_limit"] = result[k]["wall_s"] / wire
    if not args.no_concurrent:
        # two clients: the cache fetches each byte once (the link's limit as for one); direct moves them twice
        result["cold_concurrent_over_limit"] = result["cold_concurrent"]["wall_s"] / limit
        result["direct_concurrent_over_limit"] = result["direct_concurrent"]["wall_s"] / max(2 * link_s, limit)
    result["load_after"] = os.getloadavg()
    print(f"ADL (8 queries), {args.events} events, origin {args.rate} + {args.rtt_ms} ms RTT, {result['backend']}:")
    for k in ("local", "direct", "cold", "warm"):
        r = result[k]
        print(f"  {k:6s} {r['wall_s']:7.1f} s  {r['bytes_read'] / 1e6:8.1f} MB  served by {r['served_by']}"
              f"  servers' CPU {r.get('server_cpu_s', 0):.1f} s")
    for k in ("direct_concurrent", "cold_concurrent", "warm_concurrent") if not args.no_concurrent else ():
        print(f"  {k:18s} 2 clients: {result[k]['wall_s']:.1f} s (each {result[k]['client_wall_s']}),"
              f" servers' CPU {result[k]['server_cpu_s']:.1f} s")
    print(f"  link limit {link_s:.1f} s ({result['direct']['bytes_read'] / 1e6:.1f} MB at {args.rate}); "
          f"direct/limit = {result['direct_over_limit']:.2f}, cold/limit = {result['cold_over_limit']:.2f}, "
          f"load {result['load_before']} -> {result['load_after']}")
    print("  against the bytes that crossed the link: " + ", ".join(
        f"{k} {result[k]['link_bytes'] / 1e6:.1f} MB, {result[f'{k}_over_wire_limit']:.2f}"
        for k in ("direct", "cold", "cold_concurrent", "direct_concurrent") if k in result))
    if not args.no_concurrent:
        print(f"  two clients: cold/limit = {result['cold_concurrent_over_limit']:.2f}, "
              f"direct/(2 x link) = {result['direct_concurrent_over_limit']:.2f}")
    print(f"  cold/direct = {result['cold_over_direct']:.2f} (target <= 1.10), "
          f"direct/warm = {result['direct_over_warm']:.1f}x (target >= 5), "
          f"warm/local-disk = {result['warm_over_local']:.2f}, identical: {result['identical']}")
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
