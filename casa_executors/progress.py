"""The progress bar: chunks, events/s, retries and failures; silent when off."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    def __init__(self, enabled: bool, desc: str, unit: str, total: int, backend: str) -> None:
        self.enabled = enabled
        self.events = 0
        self.retries = 0
        self.failures = 0
        self._t0 = time.perf_counter()
        self._progress: Progress | None = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[trouble]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(
            f"{desc} [{backend}]", total=total, unit=unit, rate="", trouble=""
        )
        self._progress.start()

    def advance(self, events: int = 0) -> None:
        self.events += events
        self.refresh(advance=1)

    def refresh(self, advance: int = 0) -> None:
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = f"{self.events / elapsed:,.0f} ev/s" if self.events else ""
        trouble = []
        if self.retries:
            trouble.append(f"{self.retries} retried")
        if self.failures:
            trouble.append(f"[red]{self.failures} failed")
        self._progress.update(self._task, advance=advance, rate=rate, trouble=" ".join(trouble))

    def close(self) -> None:
        if self._progress is not None:
            self.refresh()
            self._progress.stop()
            self._progress = None
