"""Per-task overhead: how many trivial chunks per second the driver dispatches and collects, per backend.

    python -m casa_benchmarks.task_overhead --chunks 2000 --repeat 2 --json bench-out/task_overhead.json

The data are a few tiny generated ROOT files (tree ``Events``, one int32
branch ``x``), cut into chunks of ``--chunksize`` events (5 by default), so a
run has ``--chunks`` chunks. The processor (``Trivial``) reads no branch and
returns ``{"events": len(events), "chunks": 1}``: what is left per chunk is
coffea's own work function (open the file, build NanoEvents, call the
processor) and the executor's dispatch, collection and merging. Files are
preprocessed once (coffea's metadata cache, filled before anything is timed),
so only the processing call is measured.

For every backend available here (``--backends``), with the engine started
once and held (``ex.backend.hold()``) and every contender warmed first, these
run in turn in one loop (``rotated``: each goes first in turn), fastest of
``--repeat``:

* ``ours``: ``Runner(executor=casa_executors.<backend>(...))``;
* ``coffea``: coffea's executor on the same engine where it has one
  (``IterativeExecutor``; ``FuturesExecutor`` on a held process pool of the same
  size; ``DaskExecutor`` on the same ``Client``; ``ParslExecutor`` on the same
  DataFlowKernel — ``casa_benchmarks.scaling.coffea_peer``); Spark and Work Queue have
  none in coffea 2026;
* ``bare``: the engine's own trivial tasks through the backend's ``submit``
  (``abs`` of an int; no Runner, no driver) with the driver's in-flight window:
  futures ``pool.submit``, dask ``client.submit``, a parsl ``PythonApp``, one
  one-partition Spark job per task, one Work Queue task (our task wrapper
  and its warm per-worker server). Stopped after ``--bare-budget`` seconds
  if not done (Work Queue tasks are slow), so its count may be smaller.

Reported per contender: wall time, chunks/s, ms per chunk, and the submitting
process's CPU per chunk (``time.process_time``: every thread of this process,
so the LocalCluster's scheduler for dask, the Spark/parsl/Work Queue client
threads); ``over_coffea`` is our wall time / coffea's, and ``same_as_coffea``
that both returned the same event and chunk counts (which must also be the
dataset's, ``complete``); ``task_ms_per_chunk`` is the time our chunks spent in
the chunk function on the workers (from ``ex.report``), the rest being dispatch,
collection and merging. ``bare_over_ours`` (where a task carries one chunk) is
the bare task's time over our chunk's: the engine's share of a chunk's cost.
Slow engines run fewer chunks (``--chunks-for``, default ``spark=200``: a Spark
job costs ~0.1 s here); each row says how many it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import queue
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import uproot
from coffea import processor
from coffea.nanoevents import BaseSchema

import casa_executors
from casa_benchmarks.common import DATA_DIR, rotated, save_json
from casa_benchmarks.scaling import coffea_peer
from casa_executors.outputs import choose

log = logging.getLogger(__name__)
TREE = "Events"


class Trivial(processor.ProcessorABC):
    """Touches no branch: ``len(events)`` is the chunk's entry range."""

    def process(self, events: Any) -> dict[str, int]:
        return {"events": len(events), "chunks": 1}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


def tiny_dataset(directory: Path, events_per_file: int, files: int) -> list[str]:
    """``files`` ROOT files of ``events_per_file`` entries of one int32 branch, written once."""
    d = directory / f"tiny-{events_per_file}x{files}"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = d / f"tiny-{i}.root"
        if not path.exists():
            tmp = path.with_suffix(".tmp")  # renamed when complete: a killed run leaves no short file
            with uproot.recreate(tmp) as f:
                f[TREE] = {"x": np.arange(i * events_per_file, (i + 1) * events_per_file, dtype=np.int32)}
            tmp.rename(path)
        paths.append(str(path))
    return paths


def metadata(files: list[str]) -> dict:
    """Coffea's metadata cache for ``files``: with it, Runner preprocesses nothing."""
    cache: dict = {}
    runner = processor.Runner(executor=processor.IterativeExecutor(status=False), schema=BaseSchema,
                              metadata_cache=cache)
    list(runner.preprocess({"tiny": files}, treename=TREE))
    return cache


def timed(executor: Any, files: list[str], cache: dict, chunksize: int, proc: processor.ProcessorABC,
          maxchunks: int | None = None) -> tuple[float, float, dict]:
    """Wall time, this process's CPU time and output of one processing call."""
    runner = processor.Runner(executor=executor, schema=BaseSchema, chunksize=chunksize, metadata_cache=cache,
                              maxchunks=maxchunks)
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = runner({"tiny": files}, proc, treename=TREE)
    return time.perf_counter() - t0, time.process_time() - cpu0, out


def bare(submit: Callable[[Any, Any], Future], n: int, window: int, budget_s: float) -> tuple[int, float, float]:
    """``n`` trivial tasks, ``window`` in flight, each completion refilling it (as the driver does).

    Stops submitting after ``budget_s`` seconds; returns (tasks done, wall, CPU of this process)."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    cpu0, t0 = time.process_time(), time.perf_counter()
    submitted = finished = 0
    while finished < submitted or submitted == 0:
        while submitted - finished < window and submitted < n and time.perf_counter() - t0 < budget_s:
            submit(abs, -submitted).add_done_callback(done.put)
            submitted += 1
        exc = done.get(timeout=600).exception()
        if exc is not None:
            raise exc
        finished += 1
    return finished, time.perf_counter() - t0, time.process_time() - cpu0


def driver_window(backend: Any) -> int:
    """The number of chunk tasks our driver keeps in flight on ``backend`` (its placement's window)."""
    placement = choose(backend, "processing", None, "auto", None, None)
    try:
        return placement.window(max(backend.max_inflight(), 1))
    finally:
        placement.close(False)  # a store placement made a temporary folder


@contextlib.contextmanager
def peer_of(name: str, ex: Any, workers: int) -> Iterator[Callable[[], Any] | None]:
    """Coffea's executor on ``ex``'s engine (scaling.coffea_peer), plus its IterativeExecutor."""
    if name == "iterative":
        yield lambda: processor.IterativeExecutor(status=False)
        return
    with coffea_peer(name, ex, workers) as peer:
        yield peer


def measure(name: str, workers: int, files: list[str], cache: dict, chunksize: int, chunks: int, repeat: int,
            with_coffea: bool, bare_budget_s: float, proc: processor.ProcessorABC) -> dict:
    opts = {} if name == "iterative" else {"workers": workers}
    ex = casa_executors.create(name, status=False, **opts)
    t0 = time.perf_counter()
    ex.backend.hold()
    row: dict = {"backend": name, "workers": ex.backend.workers, "chunks": chunks,
                 "engine_start_s": time.perf_counter() - t0, "contenders": {}}
    try:
        window = driver_window(ex.backend)
        row["window"] = window
        row["chunks_per_task"] = ex.backend.batch_size(chunks)  # the first tasks' (they shrink towards the end)
        warm = 8 * max(workers, 1)  # every worker up and through its first chunks (imports, files opened)
        timed(ex, files, cache, chunksize, proc, maxchunks=warm)
        with peer_of(name if with_coffea else "", ex, workers) as peer:
            if peer is not None:
                timed(peer(), files, cache, chunksize, proc, maxchunks=warm)
            contenders = ["ours"] + (["coffea"] if peer is not None else []) + (["bare"] if name != "iterative"
                                                                                 else [])
            if "bare" in contenders:
                bare(ex.backend.submit, 4 * window, window, bare_budget_s)  # the no-op's own first calls
            best: dict[str, dict] = {}
            for rep in range(repeat):
                for who in rotated(contenders, rep):
                    if who == "bare":
                        n, wall, cpu = bare(ex.backend.submit, chunks, window, bare_budget_s)
                        cell = {"tasks": n, "wall_s": wall, "cpu_s": cpu}
                    else:
                        wall, cpu, out = timed(ex if who == "ours" else peer(), files, cache, chunksize, proc)
                        cell = {"wall_s": wall, "cpu_s": cpu, "events": out["events"], "chunks": out["chunks"]}
                        if who == "ours":
                            rows = ex.report.processing.rows
                            # time inside the chunk function on the workers (coffea's work and the
                            # processor); the rest of a chunk's wall time is dispatch, collection, merging
                            cell.update(attempts=sum(r.attempts for r in rows),
                                        task_ms_per_chunk=1000 * sum(r.wall_s for r in rows) / len(rows))
                    log.info("%s %s rep %d: %.2f s", name, who, rep, wall)
                    # a bare run cut short by its budget: compare rates, not walls
                    rate = cell.get("tasks", cell.get("chunks")) / wall
                    if who not in best or rate > best[who]["per_s"]:
                        best[who] = {**cell, "per_s": rate}
        for cell in best.values():
            cell["ms_per"] = 1000 / cell["per_s"]
            count = cell.get("tasks", cell.get("chunks"))
            cell["cpu_ms_per"] = 1000 * cell["cpu_s"] / count if count else math.nan
        row["contenders"] = best
        ours = best["ours"]
        ours["complete"] = ours["chunks"] == chunks and ours["events"] == chunks * chunksize
        if "coffea" in best:
            theirs = best["coffea"]
            row["over_coffea"] = ours["wall_s"] / theirs["wall_s"]
            row["same_as_coffea"] = (ours["events"], ours["chunks"]) == (theirs["events"], theirs["chunks"])
        if "bare" in best and row["chunks_per_task"] == 1:  # one task a chunk: the engine's share of a chunk
            row["bare_over_ours"] = best["bare"]["ms_per"] / ours["ms_per"]
    finally:
        t = time.perf_counter()
        ex.backend.release()
        row["shutdown_s"] = time.perf_counter() - t
    return row


def table(rows: list[dict]) -> str:
    """The markdown table of the measured rows."""
    lines = ["| backend | contender | chunks (tasks) | wall s | chunks/s | ms/chunk | driver CPU ms/chunk "
             "| in-task ms/chunk | ours ÷ coffea | bare ÷ ours | same output |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for who, c in r["contenders"].items():
            n = f"({c['tasks']} tasks)" if "tasks" in c else str(c["chunks"])
            ratio = f"{r['over_coffea']:.2f}" if who == "ours" and "over_coffea" in r else ""
            share = f"{r['bare_over_ours']:.2f}" if who == "bare" and "bare_over_ours" in r else ""
            same, inside = "", f"{c['task_ms_per_chunk']:.2f}" if "task_ms_per_chunk" in c else ""
            if who == "ours":
                same = "yes" if r.get("same_as_coffea", True) and c["complete"] else "NO"
            lines.append(f"| {r['backend']} | {who} | {n} | {c['wall_s']:.2f} | {c['per_s']:.0f} | "
                         f"{c['ms_per']:.2f} | {c['cpu_ms_per']:.2f} | {inside} | {ratio} | {share} | {same} |")
    return "\n".join(lines)


def parse_chunks_for(text: str) -> dict[str, int]:
    """``"spark=200,workqueue=500"`` -> ``{"spark": 200, "workqueue": 500}``."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, n = part.partition("=")
        if name not in casa_executors.BACKENDS or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--chunks-for: {part!r} is not BACKEND=N (N >= 1)")
        out[name] = int(n)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=2000, help="chunks in a run (rounded up to whole files)")
    ap.add_argument("--chunks-for", default="spark=200",
                    help="fewer chunks for slow engines, NAME=N[,NAME=N] (Spark: ~0.1 s a job here); '' for none")
    ap.add_argument("--chunksize", type=int, default=5, help="events per chunk")
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="keep the fastest of N runs of each contender")
    ap.add_argument("--backends", default=",".join(casa_executors.BACKENDS))
    ap.add_argument("--no-coffea", dest="coffea", action="store_false",
                    help="do not run coffea's executors beside ours")
    ap.add_argument("--bare-budget", type=float, default=20.0,
                    help="seconds a bare-engine run may take (it stops submitting then)")
    ap.add_argument("--data-dir", default=str(DATA_DIR), help="where the generated files are kept between runs")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    # by reference, from the importable module (not __main__): the workers of every engine import it
    from casa_benchmarks import task_overhead

    fewer = parse_chunks_for(args.chunks_for)
    datasets: dict[int, tuple[list[str], dict, int]] = {}  # chunks asked -> files, metadata, chunks made
    rows, skipped = [], {}
    for name in args.backends.split(","):
        why = casa_executors.unavailable(name)
        if why:
            skipped[name] = why
            continue
        asked = fewer.get(name, args.chunks)
        if asked not in datasets:
            per_file = math.ceil(asked / args.files)
            files = tiny_dataset(Path(args.data_dir), per_file * args.chunksize, args.files)
            datasets[asked] = (files, metadata(files), per_file * args.files)
        files, cache, chunks = datasets[asked]
        rows.append(measure(name, args.workers, files, cache, args.chunksize, chunks, args.repeat, args.coffea,
                            args.bare_budget, task_overhead.Trivial()))
    print(f"chunks of {args.chunksize} events in {args.files} files, {args.workers} workers; "
          f"fastest of {args.repeat}; ours ÷ coffea = wall time; bare = the engine's own no-op tasks")
    print(table(rows))
    for name, why in skipped.items():
        print(f"{name}: not available: {why}")
    result = {"chunks": args.chunks, "chunks_for": fewer, "chunksize": args.chunksize, "files": args.files,
              "workers": args.workers, "repeat": args.repeat, "rows": rows, "skipped": skipped}
    return save_json(result, args.json)


if __name__ == "__main__":
    main()
