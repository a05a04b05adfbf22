"""Switching casa_executors' log records on: one call (:func:`log_to_stderr`)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_FLAG = "_casa_executors_stderr"  # marks the handler this module added, so a second call replaces it


def log_to_stderr(level: int | str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Print casa_executors' log records (logger ``casa_executors`` and all below it) to stderr.

    ``level``: ``"DEBUG"``, ``"INFO"`` (engines starting and stopping, workers joining, retries, lost
    outputs), ``"WARNING"`` or a :mod:`logging` number. ``stream``: another file-like object (default:
    ``sys.stderr`` as it is at each record, so Jupyter shows them under the cell).

    Calling it again replaces the handler it added (no duplicate lines); the application's own logging
    set-up is left alone, and records still propagate to the root logger. Returns the handler
    (``logging.getLogger("casa_executors").removeHandler(handler)`` switches it off)::

        import casa_executors
        casa_executors.log_to_stderr("INFO")
    """
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"unknown logging level {level!r}; use DEBUG, INFO, WARNING, ERROR or a number")
        level = number
    logger = logging.getLogger("casa_executors")
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_FLAG, False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrNow()
    setattr(handler, _HANDLER_FLAG, True)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


class _StderrNow(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (Jupyter and pytest replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass
