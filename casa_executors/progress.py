"""The progress bar: chunks, events/s, retries and failures; silent when off.

In a terminal it is rich's live display. In a Jupyter kernel rich would draw it
inside an ipywidgets ``Output`` that a saved notebook (and GitHub) cannot show
and that misses the final state; there the bar is one notebook output updated in
place (``display_id``), so the last state stays in the notebook as text/HTML.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from IPython.display import DisplayHandle

NOTEBOOK_REFRESH_S = 0.2  # at most this often a notebook output is redrawn


class ProgressBar:
    def __init__(self, enabled: bool, desc: str, unit: str, total: int, backend: str) -> None:
        self.enabled = enabled
        self.events = 0
        self.retries = 0
        self.failures = 0
        self._t0 = time.perf_counter()
        self._progress: Progress | None = None
        self._notebook: DisplayHandle | None = None
        self._shown = 0.0
        if not enabled:
            return
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[trouble]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            auto_refresh=not console.is_jupyter,
        )
        self._task = self._progress.add_task(
            # escaped: "[dask(...)]" would otherwise be read as a markup tag and vanish
            escape(f"{desc} [{backend}]"), total=total, unit=unit, rate="", trouble=""
        )
        if console.is_jupyter:
            from IPython.display import display

            self._notebook = display(self._progress, display_id=True)
        else:
            self._progress.start()

    def advance(self, events: int = 0, chunks: int = 1) -> None:
        self.events += events
        self.refresh(advance=chunks)

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
        now = time.perf_counter()
        if self._notebook is not None and now - self._shown >= NOTEBOOK_REFRESH_S:
            self._shown = now
            self._notebook.update(self._progress)

    def close(self) -> None:
        if self._progress is not None:
            self._shown = 0.0  # the final state is always shown
            self.refresh()
            if self._notebook is None:
                self._progress.stop()
            self._progress = self._notebook = None
