"""Exceptions raised by casa_executors."""

from __future__ import annotations


class ExecutorOptionError(TypeError, ValueError):
    """A wrong executor option: raised when the executor is built, not when it runs."""


class BackendUnavailable(RuntimeError):
    """The backend's engine is not installed or cannot start here."""


class RemoteError(Exception):
    """Stands in for a worker exception that could not be sent back as itself.

    It keeps the original type name and message, so the user sees
    ``ZeroDivisionError: division by zero`` and not an engine's wrapper.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = traceback

    def __reduce__(self):
        return (RemoteError, (self.type_name, self.message, self.remote_traceback))


class WorkerLost(RuntimeError):
    """The engine lost the worker (or the task) that was running a chunk."""


class AllEndpointsFailed(OSError):
    """Every endpoint of a file (its caches, then its origin) failed.

    The message names the user's URL and each endpoint's error, never a token.
    """

    def __init__(self, url: str, errors: list[str]) -> None:
        self.url, self.errors = url, errors
        super().__init__(f"could not read {url}: " + "; ".join(errors))

    def __reduce__(self):
        return (AllEndpointsFailed, (self.url, self.errors))


class ChunkError(RuntimeError):
    """A chunk failed for good (after all its attempts).

    ``partial_output`` holds the merged output of the chunks that did succeed;
    the executor's ``report`` names every chunk that did not.
    """

    def __init__(self, message: str, partial_output=None) -> None:
        super().__init__(message)
        self.partial_output = partial_output


class CheckpointMismatch(ValueError):
    """``checkpoint=`` names a location that holds another run (other items, processor or versions)."""
