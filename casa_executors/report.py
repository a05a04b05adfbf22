"""What happened to every chunk of a run: one row each, failures, summary.

A row ends ``ok`` (computed in this call), ``restored`` (its output came from
the checkpoint) or ``failed``. Rows are slotted and share empty
tuples, so 20,000 of them stay a few MB.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from casa_executors.task import ChunkResult


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


@dataclass
class Phase:
    """One executor call: Runner's preprocessing (files) or processing (chunks)."""

    name: str
    backend: str
    workers: int
    items: list[Any]
    rows: list[ChunkRow]
    started: float = field(default_factory=time.time)
    wall_s: float = 0.0
    merge: dict[str, Any] = field(default_factory=dict)  # where outputs lived and merged (outputs.py)
    checkpoint: dict[str, Any] | None = None  # location, run key, corrupt files found

    @classmethod
    def of(cls, name: str, backend: str, workers: int, items: list[Any]) -> Phase:
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
        return cls(name, backend, workers, list(items), rows)


DONE = ("ok", "restored")  # the chunk's output is in the result


class Report:
    """Shared by an executor and all its copies (coffea's Runner copies executors)."""

    def __init__(self) -> None:
        self.preprocessing: Phase | None = None
        self.processing: Phase | None = None
        self._fresh_preprocessing = False
        self._lock = threading.Lock()

    # -- driver side -------------------------------------------------------
    def begin(self, name: str, backend: str, workers: int, items: list[Any]) -> Phase:
        phase = Phase.of(name, backend, workers, items)
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
    def attempt(phase: Phase, result: ChunkResult) -> None:
        row = phase.rows[result.index]
        row.attempts += 1
        row.worker, row.host = result.worker, result.host
        row.wall_s += result.wall_s
        row.cpu_s += result.cpu_s
        row.bytes_read += result.bytes_read
        if result.endpoints:
            row.endpoints = tuple(result.endpoints)
        if result.failovers:
            row.failovers = (*row.failovers, *result.failovers)
        if result.ok:
            row.status, row.events = "ok", result.events
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
        """Rows whose output came from the checkpoint; returns their events."""
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
        return list(self.processing.rows) if self.processing else []

    def failures(self) -> list[ChunkRow]:
        phases = [p for p in (self.preprocessing, self.processing) if p is not None]
        return [r for p in phases for r in p.rows if r.status == "failed"]

    def failed_items(self) -> list[Any]:
        """The WorkItems that failed for good: pass them to ``Runner`` as the fileset."""
        p = self.processing
        return [] if p is None else [p.items[r.index] for r in p.rows if r.status not in DONE]

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
        rows = p.rows if p else []
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
            "failures": [
                {"file": r.filename, "entries": [r.entrystart, r.entrystop], "attempts": r.attempts,
                 "error_type": r.error_type, "error": r.error}
                for r in self.failures()
            ],
        }

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
