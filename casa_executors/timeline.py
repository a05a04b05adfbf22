"""A run as a picture: one row per worker, one bar per attempt of a chunk (:meth:`Report.timeline`).

Drawn on a bare :class:`matplotlib.figure.Figure` (not pyplot's), so that it does not join pyplot's
list of open figures; Jupyter shows it when it is a cell's value, ``fig.savefig(...)`` writes it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from casa_executors.report import Phase

OUTCOME_COLORS = {"computed": "#4878d0", "failed": "#d65f5f"}
MAX_LABELLED_WORKERS = 40  # more rows than this: no worker names, only their count


def draw(phase: Phase, color: str = "outcome", ax: Axes | None = None, title: str | None = None) -> Figure:
    if color not in ("outcome", "dataset"):
        raise ValueError(f"color must be 'outcome' or 'dataset', got {color!r}")
    spans = phase.spans
    workers = _workers_in_order(spans)
    if ax is None:
        from matplotlib.figure import Figure

        height = 1.6 + 0.28 * min(len(workers), MAX_LABELLED_WORKERS) if workers else 2.0
        fig = Figure(figsize=(10, min(height, 12)), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    origin = phase.started
    row = {w: k for k, w in enumerate(workers)}
    datasets = [phase.rows[s.index].dataset for s in spans]
    groups: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for s, dataset in zip(spans, datasets):
        key = ("failed" if not s.ok else "computed") if color == "outcome" else (dataset or "(no dataset)")
        groups[(key, row[s.worker])].append((s.started - origin, max(s.ended - s.started, 0.0)))
    colors = _colors(color, sorted({key for key, _ in groups}))
    for (key, k), bars in groups.items():
        # thin white edges: back-to-back chunks of one worker stay apart
        ax.broken_barh(bars, (k - 0.4, 0.8), facecolors=colors[key], edgecolor="white", linewidth=0.4)
    from matplotlib.patches import Patch

    counts = defaultdict(int)
    for (key, _), bars in groups.items():
        counts[key] += len(bars)
    ax.legend(handles=[Patch(color=colors[k], label=f"{k} ({counts[k]})") for k in colors],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    if phase.ended:
        ax.axvline(phase.ended - origin, color="0.3", linestyle="--", linewidth=1)
    ax.set_ylim(len(workers) - 0.5, -0.5)  # the first worker to start on top
    if len(workers) <= MAX_LABELLED_WORKERS:
        ax.set_yticks(range(len(workers)), [_short(w) for w in workers], fontsize="small")
    else:
        ax.set_yticks([])
    ax.set_ylabel(f"{len(workers)} workers")
    ax.set_xlabel("seconds since processing began (dashed: the output was complete)")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title if title is not None else _title(phase), fontsize="medium")
    return fig


def _workers_in_order(spans: list[Any]) -> list[str]:
    first: dict[str, float] = {}
    for s in spans:
        if s.worker not in first or s.started < first[s.worker]:
            first[s.worker] = s.started
    return sorted(first, key=lambda w: (first[w], w))


def _colors(color: str, keys: list[str]) -> dict[str, str]:
    if color == "outcome":
        return {k: OUTCOME_COLORS[k] for k in ("computed", "failed") if k in keys}
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _short(worker: str) -> str:
    """A worker's name for a tick label: its engine address without the scheme, cut to 32 characters."""
    name = worker.split("://", 1)[-1]
    return name if len(name) <= 32 else "…" + name[-31:]


def _title(phase: Phase) -> str:
    rows = phase.ranges()
    done = sum(r.status in ("ok", "restored") for r in rows)
    events = sum(r.events for r in rows if r.status in ("ok", "restored"))
    span = f", {phase.ended - phase.started:.2f} s" if phase.ended else ""
    return f"{phase.backend}: {done}/{len(rows)} chunks, {events:,} events{span}"
