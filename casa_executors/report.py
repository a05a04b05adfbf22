"""What happened to every chunk of a run: one row each, failures, summary."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from casa_executors.task import ChunkResult


@dataclass
class ChunkRow:
    index: int
    dataset: str
    filename: str
    entrystart: int | None
    entrystop: int | None
    status: str = "pending"  # ok | failed | skipped
    attempts: int = 0
    worker: str = ""
    host: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    events: int = 0
    bytes_read: int = 0
    endpoints: list[str] = field(default_factory=list)
    failovers: list[str] = field(default_factory=list)
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
        row.endpoints = result.endpoints or row.endpoints
        row.failovers.extend(result.failovers)
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

    # -- user side ---------------------------------------------------------
    def rows(self) -> list[ChunkRow]:
        return list(self.processing.rows) if self.processing else []

    def failures(self) -> list[ChunkRow]:
        phases = [p for p in (self.preprocessing, self.processing) if p is not None]
        return [r for p in phases for r in p.rows if r.status in ("failed", "skipped")]

    def failed_items(self) -> list[Any]:
        """The WorkItems that failed for good: pass them to ``Runner`` as the fileset."""
        p = self.processing
        return [] if p is None else [p.items[r.index] for r in p.rows if r.status != "ok"]

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
        ok = [r for r in rows if r.status == "ok"]
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
        lines = [
            f"{s['backend']}: {s['processed']}/{s['chunks']} chunks, {s['events']} events "
            f"in {s['wall_s']:.2f} s ({s['events_per_s']:.0f} ev/s), {s['attempts']} attempts, "
            f"{s['bytes_read'] / 1e6:.1f} MB read"
        ]
        for f in s["failures"]:
            lines.append(f"  FAILED {f['file']} {f['entries']} after {f['attempts']} attempts: "
                         f"{f['error_type']}: {f['error'][:300]}")
        return "\n".join(lines)
