"""PNG figures of a benchmark run: one per query (its histograms), a
throughput bar chart (events/s per backend and query), and per casa_executors
backend a timeline of its queries' chunks (one row per worker)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mplhep
import numpy as np

from casa_benchmarks.adl.binning import BINNING, HISTOGRAMS
from casa_benchmarks.adl.runner import Row


def query_figure(query: int, rows: list[Row], out: Path) -> Path:
    """The query's histograms from the first good row; rows whose counts
    differ from it are overlaid (dashed) and marked DIFF."""
    good = [r for r in rows if r.query == query and r.error is None]
    if not good:
        return out
    base = good[0]
    names = HISTOGRAMS[query]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        n, lo, hi, label = BINNING[name]
        edges = np.linspace(lo, hi, n + 1)
        mplhep.histplot(base.counts[name][1:-1], edges, ax=ax, label=f"{base.backend} (and identical)")
        for r in good[1:]:
            if not np.array_equal(r.counts[name], base.counts[name]):
                mplhep.histplot(r.counts[name][1:-1], edges, ax=ax, ls="--", label=f"{r.backend} DIFF")
        ax.set_xlabel(label)
        ax.set_ylabel("Events" if name not in ("q2", "q3") else "Jets")
        ax.set_title(f"Q{query} {name}: {int(base.counts[name].sum()):,} entries")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def throughput_figure(rows: list[Row], out: Path) -> Path:
    backends = list(dict.fromkeys(r.backend for r in rows))
    queries = sorted({r.query for r in rows})
    rate = {(r.backend, r.query): r.events_per_s for r in rows if r.error is None}
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(queries), 5))
    x = np.arange(len(queries))
    for i, b in enumerate(backends):
        ax.bar(x + (i - (len(backends) - 1) / 2) * width, [rate.get((b, q), 0.0) for q in queries], width, label=b)
    ax.set_xticks(x, [f"Q{q}" for q in queries])
    ax.set_yscale("log")
    ax.set_ylabel("events / s")
    ax.set_title("ADL queries: throughput per backend")
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def timeline_figure(backend: str, rows: list[Row], out: Path) -> Path:
    """The chunks of every query one backend ran (its kept run of each), on one time axis: one row per
    worker, a colour per query; the gaps between queries are the benchmark's own work between them."""
    from casa_executors.timeline import draw_runs

    runs = {f"Q{r.query}": r.phase for r in rows if r.backend == backend and r.phase is not None and r.phase.spans()}
    if not runs:
        return out
    fig = draw_runs(runs, title=f"{backend}: the chunks of {len(runs)} ADL queries, one row per worker")
    fig.savefig(out, dpi=100)
    return out


def write_plots(rows: list[Row], directory: str) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [query_figure(q, rows, out / f"q{q}.png") for q in sorted({r.query for r in rows})]
    paths.append(throughput_figure(rows, out / "throughput.png"))
    for backend in dict.fromkeys(r.backend for r in rows if r.phase is not None):
        paths.append(timeline_figure(backend, rows, out / f"timeline_{backend}.png"))
    return [p for p in paths if p.exists()]
