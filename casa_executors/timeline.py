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

    from casa_executors.report import Phase, Span

OUTCOME_COLORS = {"computed": "#4878d0", "failed": "#d65f5f"}
MAX_LABELLED_WORKERS = 40  # more rows than this: no worker names, only their count


def draw(phase: Phase, color: str = "outcome", ax: Axes | None = None, title: str | None = None) -> Figure:
    """One run (:meth:`Report.timeline`): bars coloured by ``color``, ``"outcome"`` or ``"dataset"``."""
    if color not in ("outcome", "dataset"):
        raise ValueError(f"color must be 'outcome' or 'dataset', got {color!r}")
    spans = phase.spans()
    if color == "outcome":
        keyed = [("computed" if s.ok else "failed", s) for s in spans]
    else:
        rows = phase.ranges()
        keyed = [(rows[s.index].dataset or "(no dataset)", s) for s in spans]
    return _draw(keyed, phase.started, [phase.ended] if phase.ended else [], color == "outcome", ax,
                 title if title is not None else _title(phase),
                 "seconds since processing began (dashed: the output was complete)")


def draw_runs(runs: dict[str, Phase], ax: Axes | None = None, title: str | None = None) -> Figure:
    """Several runs of one executor on one time axis (e.g. a benchmark's queries), a colour per run
    (its key in ``runs``); failed attempts are hatched. A dashed line marks the end of each run."""
    phases = [p for p in runs.values() if p is not None]
    if not phases:
        raise ValueError("no run to draw")
    keyed = [(label, s) for label, p in runs.items() if p is not None for s in p.spans()]
    origin = min(p.started for p in phases)
    backends = ", ".join(dict.fromkeys(p.backend for p in phases))
    return _draw(keyed, origin, [p.ended for p in phases if p.ended], False, ax,
                 title if title is not None else f"{backends}: {len(phases)} runs, {len(keyed):,} chunk attempts",
                 "seconds since the first run's processing began (dashed: a run's output was complete)")


def _draw(keyed: list[tuple[str, Span]], origin: float, ends: list[float], by_outcome: bool, ax: Axes | None,
          title: str, xlabel: str) -> Figure:
    workers = _workers_in_order([s for _, s in keyed])
    if ax is None:
        from matplotlib.figure import Figure

        height = 1.6 + 0.28 * min(len(workers), MAX_LABELLED_WORKERS) if workers else 2.0
        fig = Figure(figsize=(10, min(height, 12)), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    row = {w: k for k, w in enumerate(workers)}
    groups: dict[tuple[str, bool, int], list[tuple[float, float]]] = defaultdict(list)
    for key, s in keyed:
        groups[(key, s.ok, row[s.worker])].append((s.started - origin, max(s.ended - s.started, 0.0)))
    keys = list(dict.fromkeys(key for key, _ in keyed))
    colors = _colors(by_outcome, keys)
    counts: dict[str, int] = defaultdict(int)
    for (key, ok, k), bars in groups.items():
        counts[key] += len(bars)
        # thin white edges: back-to-back chunks of one worker stay apart; a failed attempt of a run is hatched
        ax.broken_barh(bars, (k - 0.4, 0.8), facecolors=colors[key], edgecolor="white", linewidth=0.4,
                       hatch=None if ok or by_outcome else "////")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colors[k], label=f"{k} ({counts[k]})") for k in colors]
    if not by_outcome and any(not s.ok for _, s in keyed):
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="////", label="failed attempt"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    for end in ends:
        ax.axvline(end - origin, color="0.3", linestyle="--", linewidth=1)
    ax.set_ylim(len(workers) - 0.5, -0.5)  # the first worker to start on top
    if len(workers) <= MAX_LABELLED_WORKERS:
        ax.set_yticks(range(len(workers)), [_short(w) for w in workers], fontsize="small")
    else:
        ax.set_yticks([])
    ax.set_ylabel(f"{len(workers)} workers")
    ax.set_xlabel(xlabel)
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize="medium")
    return fig


def _workers_in_order(spans: list[Any]) -> list[str]:
    first: dict[str, float] = {}
    for s in spans:
        if s.worker not in first or s.started < first[s.worker]:
            first[s.worker] = s.started
    return sorted(first, key=lambda w: (first[w], w))


def _colors(by_outcome: bool, keys: list[str]) -> dict[str, Any]:
    if by_outcome:
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
