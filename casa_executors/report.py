"""What happened to every chunk of a run: one row each, failures, summary.

A row ends ``ok`` (computed in this call), ``restored`` (its output came from
the checkpoint) or ``failed``. Rows are slotted and share empty
tuples, so 20,000 of them stay a few MB.

With adaptive chunking (:mod:`casa_executors.adaptive`) the driver keeps a row
per leaf of the merge tree (a grain), and what users see is one row per range
that ran as one task (or was restored as one node, or did not run, per item):
:meth:`Phase.ranges`, built from the leaves' rows when asked.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from casa_executors.adaptive import cover
from casa_executors.task import ChunkResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from casa_executors.adaptive import Grains


@dataclass(slots=True)
class ChunkRow:
    index: int
    dataset: str
    filename: str
    entrystart: int | None
    entrystop: int | None
    status: str = "pending"  # ok | restored | failed
    attempts: int = 0
    worker: str = ""
    host: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    events: int = 0
    bytes_read: int = 0
    endpoints: tuple[str, ...] = ()
    failovers: tuple[str, ...] = ()
    error_type: str = ""
    error: str = ""
    # its last attempt (the one whose output is in the result, when it is ok): wall clock on the worker
    # (time.time()) when it began and ended, the worker process's peak resident memory (bytes) when it
    # ended (task.peak_rss), and how much the attempt raised it (> 0: this chunk set a new high)
    started: float = 0.0
    ended: float = 0.0
    peak_rss: int = 0
    peak_rss_rise: int = 0


@dataclass(slots=True)
class Span:
    """One attempt of a chunk (a range, with adaptive chunking), as it ran on a worker: what
    :meth:`Report.timeline` draws. Kept for failed attempts (:attr:`Phase.failed`); a row has its
    last attempt's (:meth:`Phase.spans`)."""

    index: int  # the row (Phase.ranges)
    attempt: int
    worker: str
    host: str
    started: float
    ended: float
    ok: bool
    events: int = 0
    peak_rss: int = 0


@dataclass
class Phase:
    """One executor call: Runner's preprocessing (files) or processing (chunks)."""

    name: str
    backend: str
    workers: int
    items: list[Any]
    rows: list[ChunkRow]
    started: float = field(default_factory=time.time)  # wall clock, once the engine is up
    ended: float = 0.0  # wall clock, when the driver had the output (or gave up)
    wall_s: float = 0.0
    merge: dict[str, Any] = field(default_factory=dict)  # where outputs lived and merged (outputs.py)
    checkpoint: dict[str, Any] | None = None  # location, run key, corrupt files found
    # adaptive chunking: leaf -> the run (task, restored node, or item not run) it belongs to, and
    # leaf -> its stretch of one file; None: every leaf is its own row
    runs: list[int] | None = None
    segment: list[int] | None = None
    _next_run: int = 0
    # failed attempts (few): the row of a chunk keeps only its last attempt's times; index: its first leaf
    failed: list[Span] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)  # on_progress: calls and their cost (live.py)

    @classmethod
    def of(cls, name: str, backend: str, workers: int, items: list[Any], grains: Grains | None = None) -> Phase:
        rows = [
            ChunkRow(
                i,
                getattr(it, "dataset", ""),
                getattr(it, "filename", str(it)),
                getattr(it, "entrystart", None),
                getattr(it, "entrystop", None),
            )
            for i, it in enumerate(items)
        ]
        phase = cls(name, backend, workers, list(items), rows)
        if grains is not None:  # until they run, the grains of an item are one row
            phase.runs, phase.segment, phase._next_run = list(grains.owner), grains.segment, len(grains.items)
        return phase

    def mark(self, leaves: range | list[int]) -> None:
        """``leaves`` just ran (or were restored) as one range: they are one row from now on."""
        if self.runs is None:
            return
        for i in leaves:
            self.runs[i] = self._next_run
        self._next_run += 1

    def groups(self) -> list[range]:
        """The leaves of each row, in order."""
        n = len(self.rows)
        if self.runs is None or self.segment is None:
            return [range(i, i + 1) for i in range(n)]
        runs, rows, segment = self.runs, self.rows, self.segment
        out, start = [], 0
        for i in range(1, n + 1):
            if i == n or (runs[i], rows[i].status, segment[i]) != (runs[start], rows[start].status, segment[start]):
                out.append(range(start, i))
                start = i
        return out

    def ranges(self) -> list[ChunkRow]:
        """One row per range that ran as one task (leaf rows as they are without adaptive chunking)."""
        if self.runs is None:
            return list(self.rows)
        return [self._joined(k, leaves) for k, leaves in enumerate(self.groups())]

    def range_of(self, leaf: int) -> tuple[range, ChunkRow]:
        """The row ``leaf`` is in, and its leaves."""
        if self.runs is None:
            return range(leaf, leaf + 1), self.rows[leaf]
        for k, leaves in enumerate(self.groups()):
            if leaf in leaves:
                return leaves, self._joined(k, leaves)
        raise IndexError(leaf)

    def spans(self) -> list[Span]:
        """Every attempt that ran, by start: each computed row's last (successful) one, and the failed ones."""
        rows = self.ranges()
        out = [Span(r.index, r.attempts, r.worker, r.host, r.started, r.ended, True, r.events, r.peak_rss)
               for r in rows if r.status == "ok" and r.started]
        if self.failed:
            row_of = {leaf: k for k, leaves in enumerate(self.groups()) for leaf in leaves}
            out += [dataclasses.replace(s, index=row_of[s.index]) for s in self.failed]
        return sorted(out, key=lambda s: (s.started, s.index))

    def range_item(self, leaves: range) -> Any:
        """The work item of a row: what to run again to compute it."""
        return cover(self.items, leaves)

    def _joined(self, k: int, leaves: range) -> ChunkRow:
        rows = [self.rows[i] for i in leaves]
        first = rows[0]
        if len(rows) == 1:
            return dataclasses.replace(first, index=k)
        return ChunkRow(
            k, first.dataset, first.filename, first.entrystart, rows[-1].entrystop, first.status,
            attempts=max(r.attempts for r in rows), worker=first.worker, host=first.host,
            wall_s=sum(r.wall_s for r in rows), cpu_s=sum(r.cpu_s for r in rows),
            events=sum(r.events for r in rows), bytes_read=sum(r.bytes_read for r in rows),
            endpoints=next((r.endpoints for r in rows if r.endpoints), ()),
            failovers=tuple(f for r in rows for f in r.failovers), error_type=first.error_type, error=first.error,
            started=min((r.started for r in rows if r.started), default=0.0), ended=max(r.ended for r in rows),
            peak_rss=max(r.peak_rss for r in rows), peak_rss_rise=max(r.peak_rss_rise for r in rows),
        )


DONE = ("ok", "restored")  # the chunk's output is in the result


class Report:
    """Shared by an executor and all its copies (coffea's Runner copies executors)."""

    def __init__(self) -> None:
        self.preprocessing: Phase | None = None
        self.processing: Phase | None = None
        self._fresh_preprocessing = False
        self._lock = threading.Lock()

    # the exception a failed run raises carries its report: a copy of it pickles (without the lock)
    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._lock = threading.Lock()

    # -- driver side -------------------------------------------------------
    def begin(self, name: str, backend: str, workers: int, items: list[Any], grains: Grains | None = None) -> Phase:
        phase = Phase.of(name, backend, workers, items, grains)
        with self._lock:
            if name == "preprocessing":
                self.preprocessing, self.processing = phase, None
                self._fresh_preprocessing = True
            else:
                if not self._fresh_preprocessing:
                    self.preprocessing = None  # a run on ready-made chunks
                self.processing, self._fresh_preprocessing = phase, False
        return phase

    @staticmethod
    def attempt(phase: Phase, result: ChunkResult, leaves: range | None = None) -> None:
        """An attempt of chunk ``result.index``, or of the consecutive ``leaves`` as one task (adaptive
        chunking): each counts it; its times and bytes go to the first, so that a row's sum is exact."""
        if leaves is None:
            leaves = range(result.index, result.index + 1)
        phase.mark(leaves)
        if result.started and not result.ok:  # (no start: the engine lost the task, nothing was measured)
            phase.failed.append(Span(leaves.start, result.attempt, result.worker, result.host, result.started,
                                     result.ended, False, 0, result.peak_rss))
        for n, i in enumerate(leaves):
            row = phase.rows[i]
            row.attempts += 1
            row.worker, row.host = result.worker, result.host
            row.started, row.ended = result.started, result.ended
            row.peak_rss, row.peak_rss_rise = result.peak_rss, result.peak_rss_rise
            if n == 0:
                row.wall_s += result.wall_s
                row.cpu_s += result.cpu_s
                row.bytes_read += result.bytes_read
                if result.endpoints:
                    row.endpoints = tuple(result.endpoints)
                if result.failovers:
                    row.failovers = (*row.failovers, *result.failovers)
            if result.error is None:
                row.status = "ok"
                # more than one leaf: chunks of a file joined, which have entry ranges
                row.events = result.events if len(leaves) == 1 else (row.entrystop or 0) - (row.entrystart or 0)
                row.error_type = row.error = ""
            else:
                row.error_type, row.error = result.error.type_name, result.error.message

    @staticmethod
    def give_up(phase: Phase, index: int, status: str, error_type: str = "", error: str = "") -> None:
        row = phase.rows[index]
        row.status = status
        if error_type:
            row.error_type, row.error = error_type, error

    @staticmethod
    def restore(phase: Phase, indices: range | list[int]) -> int:
        """Rows whose output came from the checkpoint (one node: ``indices`` is its span); returns their events."""
        phase.mark(indices)
        events = 0
        for i in indices:
            row = phase.rows[i]
            row.status = "restored"
            if row.entrystart is not None and row.entrystop is not None:
                row.events = row.entrystop - row.entrystart
            events += row.events
        return events

    @staticmethod
    def requeue(phase: Phase, index: int) -> None:
        """A chunk whose output was lost (or found corrupt) after it was done: it runs again."""
        phase.rows[index].status = "pending"

    # -- user side ---------------------------------------------------------
    def rows(self) -> list[ChunkRow]:
        """One row per chunk; with adaptive chunking, per range that ran as one task."""
        return self.processing.ranges() if self.processing else []

    def failures(self) -> list[ChunkRow]:
        pre = self.preprocessing.rows if self.preprocessing else []
        return [r for r in [*pre, *self.rows()] if r.status == "failed"]

    def failed_items(self) -> list[Any]:
        """The WorkItems that failed for good (with adaptive chunking: the ranges that did): pass
        them to ``Runner`` as the fileset."""
        p = self.processing
        if p is None:
            return []
        return [p.range_item(leaves) for leaves in p.groups() if p.rows[leaves.start].status not in DONE]

    def failed_files(self) -> dict[str, list[str]]:
        """Files that could not even be opened in preprocessing, as a fileset."""
        out: dict[str, list[str]] = {}
        if self.preprocessing is not None:
            for r in self.preprocessing.rows:
                if r.status != "ok":
                    out.setdefault(r.dataset, []).append(r.filename)
        return out

    def summary(self) -> dict[str, Any]:
        p = self.processing
        rows = self.rows()
        ok = [r for r in rows if r.status in DONE]
        events = sum(r.events for r in ok)
        wall = p.wall_s if p else 0.0
        cpu = sum(r.cpu_s for r in rows)
        workers = p.workers if p else 0
        served: dict[str, int] = {}
        for r in ok:
            for e in r.endpoints[-1:]:
                served[e] = served.get(e, 0) + 1
        return {
            "backend": p.backend if p else "",
            "workers": workers,
            "chunks": len(rows),
            "processed": len(ok),
            "computed": sum(1 for r in ok if r.status == "ok"),
            "restored": sum(1 for r in ok if r.status == "restored"),
            "failed": len(rows) - len(ok),
            "files_failed": sum(len(v) for v in self.failed_files().values()),
            "events": events,
            "wall_s": wall,
            "events_per_s": events / wall if wall > 0 else 0.0,
            "cpu_s": cpu,
            "cpu_efficiency": cpu / (wall * workers) if wall > 0 and workers else 0.0,
            "bytes_read": sum(r.bytes_read for r in rows),
            "attempts": sum(r.attempts for r in rows),
            "retries": sum(max(r.attempts - 1, 0) for r in rows),
            "failovers": sum(len(r.failovers) for r in rows),
            "served_by": served,
            "merge": dict(p.merge) if p else {},
            "checkpoint": dict(p.checkpoint) if p and p.checkpoint else None,
            "progress": dict(p.progress) if p and p.progress else None,  # on_progress: calls and their cost
            "failures": [
                {"file": r.filename, "entries": [r.entrystart, r.entrystop], "attempts": r.attempts,
                 "error_type": r.error_type, "error": r.error}
                for r in self.failures()
            ],
        }

    def to_pandas(self, attempts: bool = False) -> pd.DataFrame:
        """The processing rows as a DataFrame, one row per chunk (with adaptive chunking: per range that ran
        as one task), with every :class:`ChunkRow` field as a column. ``started``/``ended`` are UTC
        timestamps (``NaT`` for a chunk that never ran), taken on the worker with ``time.time()``: they are
        comparable across hosts as far as their clocks agree (NTP: milliseconds). ``peak_rss`` is the
        worker process's peak resident memory in bytes (``getrusage`` ``ru_maxrss``) when the chunk ended;
        ``peak_rss_rise`` how much the chunk raised it. These are of the chunk's last attempt (the one
        whose output is in the result, when it succeeded).

        ``attempts=True``: one row per attempt that ran instead (row index, worker, host, start, end, ok,
        events, peak_rss), failed attempts included: what :meth:`timeline` draws."""
        import pandas as pd

        if attempts:
            spans = self.processing.spans() if self.processing else []
            frame = pd.DataFrame([asdict(s) for s in spans], columns=[f.name for f in dataclasses.fields(Span)])
        else:
            frame = pd.DataFrame([asdict(r) for r in self.rows()],
                                 columns=[f.name for f in dataclasses.fields(ChunkRow)])
        for column in ("started", "ended"):
            frame[column] = pd.to_datetime(frame[column].where(frame[column] > 0), unit="s", utc=True)
        return frame

    def timeline(self, color: str = "outcome", ax: Any = None, title: str | None = None) -> Figure:
        """A matplotlib figure of the processing run: one row per worker, one bar per attempt of a chunk
        from its start to its end, as Dask's task stream shows tasks. ``color``: ``"outcome"`` (computed,
        failed) or ``"dataset"``. ``ax``: draw into this Axes instead of a new figure. The x axis is seconds
        from the start of the run's processing; a dashed line marks when the driver had the output.
        See :func:`casa_executors.timeline.draw`."""
        from casa_executors.timeline import draw

        if self.processing is None:
            raise ValueError("the report has no processing run to draw yet")
        return draw(self.processing, color=color, ax=ax, title=title)

    def to_json(self, path: str | None = None) -> str:
        data = {
            "summary": self.summary(),
            "preprocessing": [asdict(r) for r in self.preprocessing.rows] if self.preprocessing else [],
            "chunks": [asdict(r) for r in self.rows()],
        }
        text = json.dumps(data, indent=1, default=str)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        s = self.summary()
        restored = f" ({s['restored']} restored from the checkpoint)" if s["restored"] else ""
        lines = [
            f"{s['backend']}: {s['processed']}/{s['chunks']} chunks{restored}, {s['events']} events "
            f"in {s['wall_s']:.2f} s ({s['events_per_s']:.0f} ev/s), {s['attempts']} attempts, "
            f"{s['bytes_read'] / 1e6:.1f} MB read"
        ]
        for f in s["failures"]:
            lines.append(f"  FAILED {f['file']} {f['entries']} after {f['attempts']} attempts: "
                         f"{f['error_type']}: {f['error'][:300]}")
        return "\n".join(lines)
