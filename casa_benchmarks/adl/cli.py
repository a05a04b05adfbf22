"""``python -m casa_benchmarks.adl {run,generate,validate} ...``"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from casa_benchmarks.adl.stats import FULL_FILE, FULL_FILE_EVENTS, summarize

# large enough that each query takes about a second or more on one core (Q1 ~1 s, Q7 ~8 s here): start-up,
# warm-up and a call's fixed costs would otherwise be most of what a first table shows
DEFAULT_EVENTS, DEFAULT_FILES, DEFAULT_SEED = 8_000_000, 16, 1
PEERS = ("rdataframe", "coffea")
COFFEA_PEERS = ("iterative", "futures", "dask")  # "coffea" = all three, or "coffea-<kind>"


def parse_queries(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    if not out or any(q < 1 or q > 8 for q in out):
        raise argparse.ArgumentTypeError(f"queries must be within 1-8: {text!r}")
    return sorted(set(out))


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m casa_benchmarks.adl", description="ADL benchmark queries on casa_executors")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run queries on backends (and peers), report and compare")
    run.add_argument("--backends", type=_csv, help="default: every available casa_executors backend")
    run.add_argument("--queries", type=parse_queries, default=list(range(1, 9)), help="e.g. 1-8 or 1,6,8")
    run.add_argument("--data", help="directory, file or comma-separated files/URLs; default: generated dataset")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    run.add_argument("--chunksize", type=int, default=250_000)
    run.add_argument("--peers", type=_csv, default=[], help=f"comma-separated from {', '.join(PEERS)}")
    run.add_argument("--cache", help="auto, none or an XCache URL; default: auto without --data, else none")
    run.add_argument("--cold-cache", action="store_true",
                     help="do not fill the local XCache before timing (the first backend then fills it)")
    run.add_argument("--json", help="write results here")
    run.add_argument("--plots", help="write PNG figures into this directory")
    run.add_argument("--repeat", type=int, default=1, help="run each query N times, keep the fastest")
    run.add_argument("--strict", action="store_true",
                     help="exit 1 if any backend is unavailable, fails, or differs from iterative (for CI)")
    _dataset_args(run)

    gen = sub.add_parser("generate", help="write a synthetic dataset")
    gen.add_argument("--out", required=True)
    gen.add_argument("--batch", type=int, default=200_000, help="events per basket batch")
    gen.add_argument("--compression", default="lz4", choices=("lz4", "zlib", "zstd", "none"))
    gen.add_argument("--json", help="write the generator's figures (events/minute, ...) here")
    _dataset_args(gen)

    val = sub.add_parser("validate", help="compare a dataset's query results with the full-file table")
    val.add_argument("--data", help="default: the generated default dataset")
    val.add_argument("--json")
    _dataset_args(val)
    return ap


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="generated dataset: number of events")
    p.add_argument("--files", type=int, default=DEFAULT_FILES, help="generated dataset: number of files")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generated dataset: seed")


def _files(args: argparse.Namespace) -> tuple[list[str], bool]:
    from casa_benchmarks.adl.dataset import default_dataset, resolve

    if args.data:
        return resolve(args.data), False
    return default_dataset(args.events, args.files, args.seed), True


# -- generate ------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from casa_benchmarks.adl.generate import generate, write_json

    res = generate(args.out, args.events, args.files, args.seed, args.batch, args.compression)
    print(f"{res.events:,} events in {len(res.files)} files, {res.bytes_written / 1e6:.1f} MB, "
          f"{res.wall_s:.1f} s: {res.events_per_minute / 1e6:.2f} M events/minute ({res.compression})")
    if args.json:
        write_json(res, args.json)
    return 0


# -- validate --------------------------------------------------------------------
def comparison_rows(stats: dict[str, tuple[int, float, float]], events: int) -> list[dict[str, Any]]:
    rows = []
    for name, (f_entries, f_mean, f_std) in FULL_FILE.items():
        if name not in stats:
            continue
        entries, mean, std = stats[name]
        rows.append({"histogram": name, "entries_per_event": entries / events,
                     "full_entries_per_event": f_entries / FULL_FILE_EVENTS,
                     "mean": mean, "full_mean": f_mean, "std": std, "full_std": f_std})
    return rows


def print_comparison(rows: list[dict[str, Any]]) -> None:
    head = ("histogram", "entries/event", "full file", "mean", "full", "std", "full")
    print("{:10s} {:>14s} {:>10s} {:>8s} {:>7s} {:>8s} {:>7s}".format(*head))
    for r in rows:
        print(f"{r['histogram']:10s} {r['entries_per_event']:14.4f} {r['full_entries_per_event']:10.4f} "
              f"{r['mean']:8.2f} {r['full_mean']:7.2f} {r['std']:8.2f} {r['full_std']:7.2f}")


def cmd_validate(args: argparse.Namespace) -> int:
    from casa_benchmarks.adl.runner import quiet_nanoaod
    from casa_benchmarks.adl.validate import dataset_stats

    quiet_nanoaod()
    files, _ = _files(args)
    stats, events = dataset_stats(files)
    rows = comparison_rows(stats, events)
    print(f"{events:,} events; means/stds are of the in-range part (trijet mass: 0-300 GeV)")
    print_comparison(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"events": events, "files": files, "comparison": rows}, indent=2) + "\n")
    return 0


# -- run -------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import casa_executors
    from casa_benchmarks.adl import runner
    from casa_benchmarks.adl.dataset import serve
    from casa_benchmarks.adl.kernels import warm_up

    kinds = {f"coffea-{k}" for k in COFFEA_PEERS}
    bad = [p for p in args.peers if p not in PEERS and p not in kinds]
    if bad:
        print(f"unknown peer(s) {bad}; choose from {', '.join(PEERS)} (or {', '.join(sorted(kinds))})",
              file=sys.stderr)
        return 2
    coffea_peers = [k for k in COFFEA_PEERS if "coffea" in args.peers or f"coffea-{k}" in args.peers]
    backends = args.backends
    if backends is None:  # strict: all of them, so that a missing one is a failure
        backends = [b for b in casa_executors.BACKENDS if args.strict or casa_executors.unavailable(b) is None]
    files, generated = _files(args)
    cache = args.cache or ("none" if args.data else "auto")
    runner.quiet_nanoaod()
    warm_up()
    cfg = runner.Settings(args.queries, args.workers, args.chunksize, args.repeat)
    rows: list[runner.Row] = []
    skipped: dict[str, str] = {}
    meta: dict = {}  # Runner metadata cache shared by every run on the same files
    t0 = time.perf_counter()
    with serve(files, cache, fill=not args.cold_cache) as served:
        for note in served.notes:
            print(note, file=sys.stderr)
        for name in backends:
            why = casa_executors.unavailable(name)
            if why is not None:
                skipped[name] = why
                print(f"skipping {name}: {why}", file=sys.stderr)
                continue
            print(f"{name}:", file=sys.stderr)
            try:
                rows += runner.run_backend(name, served.files, cfg, served.cache, meta)
            except Exception as exc:
                rows += [runner.Row(name, q, error=runner._short(exc)) for q in cfg.queries]
        if coffea_peers:
            for kind in coffea_peers:
                print(f"coffea-{kind}:", file=sys.stderr)
                try:
                    rows += runner.run_coffea_peer(kind, served.peer_files, cfg, meta)
                except Exception as exc:
                    rows += [runner.Row(f"coffea-{kind}", q, error=runner._short(exc)) for q in cfg.queries]
        if "rdataframe" in args.peers:
            print("rdataframe (single-thread, then implicit MT):", file=sys.stderr)
            rows += runner.run_rdf_peer(served.rdf_files, cfg, served.local_files)
    runner.compare(rows)
    print_table(rows)
    diffs = [r for r in rows if r.identical_to_iterative is False]
    comparison = _full_file_comparison(rows) if generated else []
    if comparison:
        print("\ngenerated dataset vs full file (in-range means/stds):")
        print_comparison(comparison)
    if args.json:
        doc = {
            "runs": [r.to_json() for r in rows],
            "config": {"backends": backends, "skipped": skipped, "queries": cfg.queries, "workers": cfg.workers,
                       "chunksize": cfg.chunksize, "repeat": cfg.repeat, "peers": args.peers, "cache": cache,
                       "cache_mode": served.mode, "notes": served.notes},
            "dataset": {"files": files, "generated": generated,
                        **({"events": args.events, "n_files": args.files, "seed": args.seed} if generated else {})},
            "full_file_comparison": comparison,
            "total_wall_s": time.perf_counter() - t0,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.plots:
        from casa_benchmarks.adl.plots import write_plots

        for p in write_plots(rows, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    errors = [r for r in rows if r.error]
    if args.strict and (diffs or errors or skipped):
        print(f"strict: {len(diffs)} differences, {len(errors)} errors, skipped {sorted(skipped)}", file=sys.stderr)
        return 1
    return 1 if diffs or (errors and len(errors) == len(rows)) else 0


def _full_file_comparison(rows: list[Any]) -> list[dict[str, Any]]:
    base = {r.query: r for r in rows if r.baseline}
    stats = {}
    events = 0
    for r in base.values():
        events = r.events
        for name, c in r.counts.items():
            stats[name] = summarize(name, c)
    return comparison_rows(stats, events) if events else []


def print_table(rows: list[Any]) -> None:
    headers = ["query", "backend", "events", "wall s", "events/s", "CPU eff", "MB read", "vs iterative", "check",
               "warm-up s"]
    table = []
    notes: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r.query):
        if r.note:
            notes.setdefault(r.note, []).append(f"Q{r.query} {r.backend}")
        if r.error:
            table.append([f"Q{r.query}", r.backend, "-", "-", "-", "-", "-", "-", f"ERROR {r.error}", "-"])
            continue
        eff = r.cpu_efficiency
        table.append([
            f"Q{r.query}", r.backend, f"{r.events:,}", f"{r.wall_s:.2f}", f"{r.events_per_s:,.0f}",
            "-" if eff is None else f"{eff:.0%}",
            "-" if r.bytes_read is None else f"{r.bytes_read / 1e6:.1f}",
            "-" if r.speedup_vs_iterative is None else f"{r.speedup_vs_iterative:.2f}x",
            "ok" if r.identical_to_iterative else ("DIFF" if r.identical_to_iterative is False else "-"),
            "-" if r.warmup_s is None else f"{r.warmup_s:.1f}",
        ])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("  ".join(headers))
        for line in table:
            print("  ".join(line))
    else:
        t = Table(title="ADL benchmark")
        for h in headers:
            t.add_column(h, justify="left" if h in ("query", "backend", "check") else "right")
        for line in table:
            style = "bold red" if line[-1] != "ok" and line[-1] != "-" else None
            t.add_row(*line, style=style)
        Console(width=160).print(t)
    for note, where in notes.items():
        print(f"note ({where[0]}{' ...' if len(where) > 1 else ''}): {note}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"run": cmd_run, "generate": cmd_generate, "validate": cmd_validate}[args.command](args)
