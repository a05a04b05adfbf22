"""Run the ADL queries on casa_executors backends and on peers; collect rows."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from casa_benchmarks.adl.binning import BINNING, HISTOGRAMS

Counts = dict[str, np.ndarray]  # histogram name -> counts with flow bins


@dataclass
class Row:
    backend: str
    query: int
    events: int = 0
    wall_s: float = 0.0
    cpu_s: float | None = None
    bytes_read: int | None = None
    workers: int = 1
    counts: Counts = field(default_factory=dict, repr=False)
    identical_to_iterative: bool | None = None
    speedup_vs_iterative: float | None = None
    baseline: bool = False
    error: str | None = None
    note: str | None = None
    warmup_s: float | None = None  # the engine's fixed costs, paid before the timed runs (warm_up)
    # casa_executors backends: the report's processing phase of the kept run (its chunks' times, workers), for
    # the timeline figure (plots.timeline_figure)
    phase: Any = field(default=None, repr=False, compare=False)

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_efficiency(self) -> float | None:
        if self.cpu_s is None or self.wall_s <= 0:
            return None
        return self.cpu_s / (self.wall_s * self.workers)

    def to_json(self) -> dict[str, Any]:
        hists = {}
        for name, c in self.counts.items():
            n, lo, hi, _ = BINNING[name]
            hists[name] = {"edges": np.linspace(lo, hi, n + 1).tolist(), "counts": c[1:-1].tolist(),
                           "underflow": int(c[0]), "overflow": int(c[-1])}
        return {
            "backend": self.backend, "query": self.query, "events": self.events,
            "wall_s": self.wall_s, "events_per_s": self.events_per_s, "bytes_read": self.bytes_read,
            "warmup_s": self.warmup_s,
            "cpu_s": self.cpu_s, "workers": self.workers, "cpu_efficiency": self.cpu_efficiency,
            "speedup_vs_iterative": self.speedup_vs_iterative,
            "identical_to_iterative": self.identical_to_iterative, "error": self.error, "note": self.note,
            "histograms": hists,
        }


@dataclass
class Settings:
    queries: list[int]
    workers: int
    chunksize: int
    repeat: int = 1
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)


def counts_of(out: dict[str, Any], query: int) -> Counts:
    return {name: np.asarray(out[name].values(flow=True), dtype=np.int64) for name in HISTOGRAMS[query]}


def quiet_nanoaod() -> None:
    """Synthetic (and the real ADL) files have no GenPart etc.: NanoAODSchema
    warns per chunk about missing cross-references; silence that here and in
    worker processes started from now on."""
    import warnings

    msgs = ("Missing cross-reference", "Branch Photon_")
    for msg in msgs:
        warnings.filterwarnings("ignore", message=msg, category=RuntimeWarning)
    extra = ",".join(f"ignore:{m}:RuntimeWarning" for m in msgs)
    old = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = f"{old},{extra}" if old else extra


# -- CPU time of this process and its children (for executors without a report)
def _tree_cpu() -> dict[int, float]:
    import psutil

    out = {}
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


@contextlib.contextmanager
def cpu_meter() -> Iterator[dict[str, float]]:
    box = {"cpu_s": 0.0}
    before = _tree_cpu()
    reaped0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield box
    after = _tree_cpu()
    reaped1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    alive = sum(t - before.get(pid, 0.0) for pid, t in after.items())
    reaped = (reaped1.ru_utime + reaped1.ru_stime) - (reaped0.ru_utime + reaped0.ru_stime)
    gone_before = sum(t for pid, t in before.items() if pid not in after)
    box["cpu_s"] = alive + max(reaped - gone_before, 0.0)


def _run_query(runner_factory: Callable[[], Any], fileset: dict, query: int) -> tuple[dict, float]:
    from casa_benchmarks.adl.queries import QUERIES

    runner = runner_factory()
    t0 = time.perf_counter()
    out = runner(fileset, QUERIES[query](), treename="Events")
    return out, time.perf_counter() - t0


def warm_up(executor: Any, files: list[str], cfg: Settings, meta: dict, workers: int) -> float:
    """Every query once on a few small chunks of the first file, untimed: worker processes up,
    imports, numba kernels compiled (or loaded from their cache) on every worker. Without it a
    parallel backend's first query pays what iterative paid once in this process, and the first
    look compares start-up, not throughput. Returns the seconds it took."""
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    from casa_benchmarks.adl.queries import QUERIES

    t0 = time.perf_counter()
    for q in cfg.queries:
        runner = processor.Runner(executor=executor, schema=NanoAODSchema, chunksize=min(cfg.chunksize, 5_000),
                                  maxchunks=2 * workers, metadata_cache=meta)
        runner({"adl": files[:1]}, QUERIES[q](), treename="Events")
    return time.perf_counter() - t0


def _best(rows: list[Row]) -> Row:
    best = min(rows, key=lambda r: r.wall_s)
    for r in rows:
        if not _same(r.counts, best.counts):
            best.error = "histograms differ between repeats"
    return best


def _same(a: Counts, b: Counts) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def run_backend(name: str, files: list[str], cfg: Settings, cache: str | None, meta: dict) -> list[Row]:
    """Every query on one casa_executors backend, kept up across queries."""
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    import casa_executors

    fileset = {"adl": files}
    rows: list[Row] = []
    workers = 1 if name == "iterative" else cfg.workers  # iterative runs in this thread
    ex = casa_executors.create(name, workers=workers, status=False, cache=cache)
    with ex:
        try:
            warm = warm_up(ex, files, cfg, meta, workers)
            cfg.log(f"  {name}: warm-up (engine up, imports, JIT on every worker) {warm:.1f} s")
        except Exception as exc:  # the timed runs will say what is wrong
            warm = None
            cfg.log(f"  {name}: warm-up failed: {_short(exc)}")
        for q in cfg.queries:
            tries = []
            try:
                for _ in range(cfg.repeat):
                    def factory() -> Any:
                        return processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=cfg.chunksize,
                                                metadata_cache=meta)
                    out, wall = _run_query(factory, fileset, q)
                    s = ex.report.summary()
                    tries.append(Row(name, q, int(out["events"]), wall, float(s["cpu_s"]),
                                     int(s["bytes_read"]), workers, counts_of(out, q),
                                     phase=ex.report.processing))
                row = _best(tries)
                row.warmup_s = warm
            except Exception as exc:  # a failing backend must not stop the others
                row = Row(name, q, workers=workers, error=_short(exc))
            cfg.log(_progress(row))
            rows.append(row)
    return rows


def run_coffea_peer(kind: str, files: list[str], cfg: Settings, meta: dict) -> list[Row]:
    """coffea's own executors: iterative, futures (workers=N), dask (LocalCluster)."""
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    with contextlib.ExitStack() as stack:
        workers = cfg.workers
        if kind == "iterative":
            ex, workers = processor.IterativeExecutor(status=False), 1
        elif kind == "futures":
            ex = processor.FuturesExecutor(workers=cfg.workers, status=False)
        elif kind == "dask":
            from distributed import Client, LocalCluster

            cluster = stack.enter_context(
                LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                             dashboard_address=None, host="127.0.0.1")
            )
            client = stack.enter_context(Client(cluster))
            ex = processor.DaskExecutor(client=client, status=False)
        else:
            raise ValueError(f"unknown coffea peer {kind!r}")
        try:
            warm = warm_up(ex, files, cfg, meta, workers)
        except Exception as exc:
            warm = None
            cfg.log(f"  coffea-{kind}: warm-up failed: {_short(exc)}")
        rows = []
        for q in cfg.queries:
            tries = []
            try:
                for _ in range(cfg.repeat):
                    def factory() -> Any:
                        return processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=cfg.chunksize,
                                                metadata_cache=meta)
                    with cpu_meter() as cpu:
                        out, wall = _run_query(factory, {"adl": files}, q)
                    tries.append(Row(f"coffea-{kind}", q, int(out["events"]), wall, cpu["cpu_s"], None,
                                     workers, counts_of(out, q)))
                row = _best(tries)
                row.warmup_s = warm
            except Exception as exc:
                row = Row(f"coffea-{kind}", q, workers=workers, error=_short(exc))
            cfg.log(_progress(row))
            rows.append(row)
        return rows


def _rdf_subprocess(files: list[str], threads: int, cfg: Settings) -> tuple[list[dict], str | None]:
    cmd = [sys.executable, "-m", "casa_benchmarks.adl.rdf", "--threads", str(threads),
           "--queries", ",".join(map(str, cfg.queries)), "--repeat", str(cfg.repeat), *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        err = [line.strip() for line in proc.stderr.strip().splitlines() if line.strip()]
        return [], err[-1] if err else f"exit code {proc.returncode}"
    return json.loads(proc.stdout), None


def run_rdf_peer(files: list[str], cfg: Settings, local_files: list[str] | None = None) -> list[Row]:
    """RDataFrame single-thread, then implicit MT with cfg.workers threads, each
    in a subprocess so that ROOT stays out of this process and its workers.
    ``local_files``: read instead when ``files`` (URLs) cannot be opened (ROOT
    6.40's TTreeProcessorMT opens ``root://host//path`` as the local ``/path``)."""
    rows = []
    for threads, backend in ((0, "rdf-st"), (cfg.workers, "rdf-mt")):
        items, error = _rdf_subprocess(files, threads, cfg)
        note = None
        if error and local_files and local_files != files:
            items, error2 = _rdf_subprocess(local_files, threads, cfg)
            note = f"read the local files: with the URLs RDataFrame failed: {error}"
            error = error2 and f"{error2} (URLs: {error})"
        if error:
            rows += [Row(backend, q, error=f"RDataFrame failed: {error}") for q in cfg.queries]
            continue
        for item in items:
            row = Row(backend, item["query"], item["events"], item["wall_s"], item["cpu_s"], item.get("bytes_read"),
                      threads or 1, {k: np.asarray(v, dtype=np.int64) for k, v in item["counts"].items()}, note=note)
            cfg.log(_progress(row))
            rows.append(row)
    return rows


def compare(rows: list[Row]) -> None:
    """Fill identical_to_iterative and speedup_vs_iterative per query. The
    baseline is our iterative backend, else coffea's, else the first row."""
    for q in {r.query for r in rows}:
        same_q = [r for r in rows if r.query == q and r.error is None]
        if not same_q:
            continue
        base = next((r for r in same_q if r.backend == "iterative"), None)
        base = base or next((r for r in same_q if r.backend == "coffea-iterative"), same_q[0])
        base.baseline = True
        for r in same_q:
            r.identical_to_iterative = _same(r.counts, base.counts)
            r.speedup_vs_iterative = r.events_per_s / base.events_per_s if base.events_per_s else None


def _short(exc: BaseException) -> str:
    if os.environ.get("ADL_TRACEBACK"):
        traceback.print_exception(exc)
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _progress(row: Row) -> str:
    if row.error:
        return f"  Q{row.query} {row.backend}: ERROR {row.error}"
    return f"  Q{row.query} {row.backend}: {row.events} events in {row.wall_s:.2f} s ({row.events_per_s:,.0f}/s)"
