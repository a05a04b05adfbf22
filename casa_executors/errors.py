"""Exceptions raised by casa_executors."""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any


class ExecutorOptionError(TypeError, ValueError):
    """A wrong executor option: raised when the executor is built, not when it runs."""


class BackendUnavailable(RuntimeError):
    """The backend's engine is not installed or cannot start here."""


class RemoteError(Exception):
    """Stands in for a worker exception that could not be sent back as itself.

    It keeps the original type name and message, so the user sees
    ``ZeroDivisionError: division by zero`` and not an engine's wrapper. When the
    original type can be imported here, :func:`rebuild` turns it into an instance of
    that type (and of ``RemoteError``), so ``except OriginalType`` still catches it.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "", type_path: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = traceback
        self.type_path = type_path  # "module:qualname" of the original type, when known

    def __reduce__(self):  # rebuilt as the original type wherever it is unpickled, when importable there
        return (_remote, (self.type_name, self.message, self.remote_traceback, self.type_path))


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


class ChunkError(Exception):
    """A chunk (or a file, in preprocessing) failed for good, after all its attempts.

    A run never raises a bare ``ChunkError`` when it knows the original type:
    what it raises is an instance of both ``ChunkError`` and the exception's own
    type (``FileNotFoundError``, ``UprootMissTreeError``, the processor's
    ``ZeroDivisionError``...), see :func:`chunk_error`. Attributes (and PEP 678
    notes saying the same): ``partial_output`` (the processor's output of the
    chunks that did succeed, as Runner would return it), ``item`` (the WorkItem
    or FileMeta), ``attempts``, ``worker``, ``host``, ``phase`` and ``report``
    (the executor's report, whose ``failures()`` names every chunk that did not
    complete).
    """

    partial_output: Any = None
    item: Any = None
    attempts: int = 0
    worker: str = ""
    host: str = ""
    phase: str = ""
    report: Any = None

    def __init__(self, message: str, partial_output: Any = None) -> None:
        super().__init__(message)
        self.partial_output = partial_output

    def __reduce__(self):
        state = _state(self)
        state.pop("report", None)  # the executor's, with its lock: not sent along
        bases = type(self).__dict__.get("_casa_bases")
        if bases is None:  # a plain ChunkError
            return (type(self), self.args, state)
        bases = tuple(("remote", b._casa_remote_of) if "_casa_remote_of" in b.__dict__ else b for b in bases)
        return (_unpickle_combined, (bases, self.args, state))


# -- keeping the original type ------------------------------------------------------

_COMBINED: dict[tuple[type, ...], type] = {}
_REMOTE: dict[type, type] = {}
# BaseException's own slots, copied explicitly (or deliberately not: args is given to __new__)
_SKIP = {"__dict__", "__weakref__", "args", "__traceback__", "__cause__", "__context__",
         "__suppress_context__", "__notes__"}


def _c_members(kind: type) -> list[str]:
    """Attributes of built-in exception types kept in C slots (OSError.errno, StopIteration.value...)."""
    names = []
    for klass in kind.__mro__:
        if klass.__module__ != "builtins" or not issubclass(klass, BaseException):
            continue
        for name, d in vars(klass).items():
            if name not in _SKIP and isinstance(d, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                names.append(name)
    return names


def _state(exc: BaseException) -> dict[str, Any]:
    state = dict(vars(exc))
    if "__notes__" in state:
        state["__notes__"] = list(state["__notes__"])  # notes added to the copy stay off the original
    for name in _c_members(type(exc)):
        with contextlib.suppress(Exception):
            state[name] = getattr(exc, name)
    return state


def _instance(cls: type, args: tuple, state: dict[str, Any]) -> BaseException:
    """An instance of ``cls`` with ``args`` and ``state``, without calling any ``__init__``
    (a user's exception may take arguments its ``args`` cannot give back)."""
    new = cls.__new__(cls, *args)
    new.args = args
    members = set(_c_members(cls))
    for name, value in state.items():
        if value is None and name in members:  # unset C slot (OSError.filename2): keep it unset
            continue
        try:
            setattr(new, name, value)
        except Exception:
            with contextlib.suppress(Exception):
                vars(new)[name] = value
    return new


def _unpickle_combined(bases: tuple, args: tuple, state: dict[str, Any]) -> BaseException:
    kinds = tuple(remote_type(b[1]) or RemoteError if isinstance(b, tuple) else b for b in bases)
    return _instance(combined_type(*kinds), args, state)


def _remote(type_name: str, message: str, traceback: str, type_path: str) -> BaseException:
    return rebuild(RemoteError(type_name, message, traceback, type_path))


def _is_chunk_error(kind: type) -> bool:
    return issubclass(kind, ChunkError)


def combined_type(*kinds: type[BaseException]) -> type[ChunkError]:
    """A subclass of ``ChunkError`` and of ``kinds`` (cached, named like the first of them).

    Raises TypeError when Python cannot combine them (instance lay-out conflict).
    """
    kinds = tuple(k for k in kinds if not _is_chunk_error(k)) or (Exception,)
    cls = _COMBINED.get(kinds)
    if cls is None:
        first = kinds[0]
        cls = type(first.__name__, (*kinds, ChunkError), {
            "__module__": first.__module__,  # tracebacks read "FileNotFoundError: ...", as coffea's would
            "__qualname__": first.__qualname__,
            "__reduce__": ChunkError.__reduce__,
            "_casa_bases": kinds,
        })
        _COMBINED[kinds] = cls
    return cls


def _bases_for(exc: BaseException) -> list[tuple[type, ...]]:
    """Types to combine with ChunkError, most informative first: the raised exception's
    own type plus its root cause's (coffea wraps a processor's ZeroDivisionError in a
    bare ``Exception``; the result is both), then the raised type alone."""
    chain = [exc]
    while isinstance(chain[-1].__cause__, BaseException) and len(chain) < 32:
        chain.append(chain[-1].__cause__)
    top, root = type(exc), type(chain[-1])
    if issubclass(root, top) or _is_chunk_error(root):
        return [(root,) if not _is_chunk_error(root) else (top,), (top,)]
    if issubclass(top, root):
        return [(top,)]
    return [(top, root), (top,)]


def chunk_error(exc: BaseException, notes: list[str] = (), **attrs: Any) -> ChunkError:
    """``exc`` as a ``ChunkError`` that is still an instance of its own type.

    The new exception has ``exc``'s message, arguments, attributes, cause and
    traceback; ``notes`` are added as PEP 678 notes and ``attrs`` set on it. If the
    types cannot be combined, a plain ``ChunkError`` caused by ``exc`` is returned.
    """
    if isinstance(exc, ChunkError):
        new = exc
    else:
        new = None
        for kinds in _bases_for(exc):
            try:
                new = _instance(combined_type(*kinds), exc.args, _state(exc))
                break
            except TypeError:
                continue
        if new is None:
            new = ChunkError(f"{type(exc).__name__}: {exc}")
            new.add_note(f"(its type {type(exc).__qualname__} could not be kept: see __cause__)")
            new.__cause__ = exc
        else:
            new.__cause__ = exc.__cause__
            new.__context__ = exc.__context__
            new.__suppress_context__ = exc.__suppress_context__
            new.__traceback__ = exc.__traceback__
    for name, value in attrs.items():
        setattr(new, name, value)
    if notes:  # ours first: a worker's traceback note, if any, reads best last
        new.__notes__ = [*notes, *getattr(new, "__notes__", ())]
    return new


def remote_type(kind: type[BaseException]) -> type | None:
    """A subclass of ``kind`` and ``RemoteError`` (cached); None if Python cannot combine them."""
    cls = _REMOTE.get(kind)
    if cls is None:
        try:
            cls = type(kind.__name__, (kind, RemoteError), {
                "__module__": kind.__module__,
                "__qualname__": kind.__qualname__,
                # the original __str__ may read attributes only its __init__ sets
                "__str__": _remote_str,
                "__repr__": lambda self: f"{type(self).__qualname__}({_remote_str(self)!r})",
                "__reduce__": RemoteError.__reduce__,
                "_casa_remote_of": kind,
            })
        except TypeError:  # instance lay-out conflict
            return None
        _REMOTE[kind] = cls
    return cls


def _remote_str(self: BaseException) -> str:
    message = vars(self).get("message")  # absent when the type is a base of another exception's copy
    return message if isinstance(message, str) else BaseException.__str__(self)


def rebuild(remote: RemoteError) -> BaseException:
    """``remote`` as an instance of the original type when that type can be imported here
    (also a RemoteError: its message is the worker's text); else ``remote`` itself."""
    kind = _import_type(remote.type_path)
    if kind is None or not issubclass(kind, BaseException) or isinstance(remote, kind):
        return remote
    cls = remote_type(kind)
    if cls is None:
        return remote
    try:
        new = _instance(cls, (remote.message,), dict(vars(remote)))
    except Exception:
        return remote
    new.__cause__, new.__traceback__ = remote.__cause__, remote.__traceback__
    return new


def type_path(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def _import_type(path: str) -> type | None:
    if ":" not in path:
        return None
    module, qualname = path.split(":", 1)
    if "<locals>" in qualname:
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj if isinstance(obj, type) else None


class CheckpointMismatch(ValueError):
    """``checkpoint=`` names a location that holds another run (other items, processor or versions)."""


class UntrustedData(ValueError):
    """A file of an output store or checkpoint that its run's key does not vouch for (no tag, a wrong tag,
    cut short, or a key that is not private): refused before it is unpickled. The message names the file."""
