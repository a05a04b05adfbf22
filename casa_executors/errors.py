"""Exceptions raised by casa_executors, and how a worker's exception reaches the driver as itself.

A chunk that fails for good raises the exception its last attempt raised, the same object in this
process and the same type with the same arguments and attributes from any other, with the
worker's traceback (tblib). The driver adds the chunk's attributes (:data:`CHUNK_ATTRIBUTES`) and
a PEP 678 note naming the file, entry range, attempts and worker (:func:`annotate`). No exception
class is made at run time: when the original type cannot be rebuilt here, a :class:`RemoteError`
stands in for it; when it refuses attributes, a :class:`ChunkError` wraps it as its ``__cause__``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import pickle
import socket
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle
import tblib

from casa_executors.xcache.tokens import redact

log = logging.getLogger(__name__)

# what the driver sets on the exception a run raises (coffea's Runner reads partial_output)
CHUNK_ATTRIBUTES = ("partial_output", "item", "attempts", "worker", "host", "phase", "report")


class ExecutorOptionError(TypeError, ValueError):
    """A wrong executor option: raised when the executor is built, not when it runs."""


class BackendUnavailable(RuntimeError):
    """The backend's engine is not installed or cannot start here."""


class RemoteError(Exception):
    """Stands in for a worker's exception whose type cannot be rebuilt in this process.

    Its type is not importable here (defined inside a function, or in a module only the workers
    have), or its arguments and attributes could not be sent or did not rebuild it. It keeps the
    original's type name and path, its text (``str()`` reads ``ZeroDivisionError: division by
    zero``, not an engine's wrapper), the reason (``reason``) and the worker's traceback
    (``__traceback__``); its ``__cause__`` is the rest of the worker's chain.
    """

    def __init__(self, type_name: str, message: str, type_path: str = "", reason: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message, self.type_path, self.reason = type_name, message, type_path, reason

    def __reduce__(self):
        return (RemoteError, (self.type_name, self.message, self.type_path, self.reason), dict(vars(self)))


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
    """Wraps the exception of a chunk (or a file, in preprocessing) that failed for good, when that
    exception refuses the attributes below (a frozen ``__setattr__``); the original is its ``__cause__``.

    A run otherwise raises the original exception itself, with the same attributes set on it:
    ``partial_output`` (the processor's output of the chunks that did succeed, as Runner would
    return it), ``item`` (the WorkItem or FileMeta), ``attempts``, ``worker``, ``host``, ``phase``
    and ``report`` (the executor's report, whose ``failures()`` names every chunk that did not
    complete), and a PEP 678 note saying where it failed.
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
        return (ChunkError, self.args, dict(vars(self)))


class CheckpointMismatch(ValueError):
    """``checkpoint=`` names a location that holds another run (other items, processor or versions)."""


# -- naming an exception ----------------------------------------------------------------------------


def type_name(exc: BaseException) -> str:
    """The name of ``exc``'s type, or of the type a RemoteError stands in for."""
    return exc.type_name if isinstance(exc, RemoteError) else type(exc).__name__


def text(exc: BaseException) -> str:
    """``str(exc)``, never raising (a broken ``__str__`` must not hide the failure it reports)."""
    try:
        return str(exc)
    except Exception as err:
        return f"<str() of {type(exc).__name__} failed: {type(err).__name__}: {err}>"


def describe(exc: BaseException) -> str:
    """``TypeName: message``, as the last line of a traceback reads."""
    return text(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {text(exc)}"


def annotate(exc: BaseException, notes: Sequence[str] = (), **attrs: Any) -> BaseException:
    """``exc`` itself with ``attrs`` set and ``notes`` added (PEP 678); a :class:`ChunkError` with
    them, caused by ``exc``, when ``exc`` refuses them."""
    try:
        for name, value in attrs.items():
            setattr(exc, name, value)
        for note in notes:
            exc.add_note(note)
        return exc
    except Exception as refused:
        wrapper = ChunkError(describe(exc))
        wrapper.__cause__ = exc
        for name, value in attrs.items():
            setattr(wrapper, name, value)
        for note in notes:
            wrapper.add_note(note)
        wrapper.add_note(f"(the original {type(exc).__qualname__} is the __cause__: it refused the chunk's "
                         f"attributes: {type(refused).__name__}: {refused})")
        return wrapper


# -- an exception as data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedException:
    """One exception of a chain as data: what rebuilds it without calling its ``__init__``
    (its arguments and attribute dictionary), its worker traceback (tblib), and its text."""

    type_name: str
    type_path: str  # "module:qualname"
    message: str  # str() on the worker (redacted)
    payload: bytes | None  # pickle of (args, state); None when they could not be sent
    traceback: dict | None  # tblib.Traceback(...).as_dict()
    link: str = ""  # how the next element of the chain hangs from this one: "cause" or "context"
    dropped: tuple[str, ...] = ()  # attributes left behind: they did not pickle
    # its arguments and attributes went as they are: no resource stood in for by an Unsent, none left
    # behind (the object itself then pickles, whatever reducers are installed: ErrorInfo.capture)
    whole: bool = True


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
    with contextlib.suppress(Exception):  # BaseException.__new__ keeps them already; a refusing type keeps those
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


def chain_of(exc: BaseException, limit: int = 16) -> list[tuple[BaseException, str]]:
    """``exc`` and what it was raised from, outermost first, each with how the next hangs from it
    (``__cause__``, else ``__context__`` unless suppressed, as tracebacks show them)."""
    out: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(out) < limit:
        seen.add(id(current))
        if current.__cause__ is not None:
            nxt, link = current.__cause__, "cause"
        elif current.__context__ is not None and not current.__suppress_context__:
            nxt, link = current.__context__, "context"
        else:
            nxt, link = None, ""
        out.append((current, link))
        current = nxt
    if out:
        out[-1] = (out[-1][0], "")
    return out


def _scrub(obj: Any, secrets: Sequence[Any]) -> Any:
    """``obj`` with every string inside (plain containers only) redacted."""
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {_scrub(k, secrets): _scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_scrub(v, secrets) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _mentions(blob: bytes, secrets: Sequence[Any]) -> bool:
    """A secret (raw or URL-quoted, as :func:`~casa_executors.xcache.tokens.redact` knows them) in ``blob``."""
    as_text = blob.decode("latin-1")  # byte for byte: the ASCII forms of a token show as themselves
    return redact(as_text, secrets) != as_text


class Unsent:
    """Stands in, inside a worker exception's arguments and attributes, for a resource that is not
    sent to the driver (a lock, an open file or socket, an uproot file, tree, branch or source),
    with the names that describe it (an uproot ``TBasket``'s repr reads its branch's ``name``)."""

    NAMES = ("name", "title", "classname", "object_path", "file_path")

    def __init__(self, type_name: str, names: dict[str, Any] | None = None) -> None:
        self.type_name, self.names = type_name, dict(names or {})

    @classmethod
    def of(cls, obj: Any) -> Unsent:
        names = {}
        for name in cls.NAMES:
            with contextlib.suppress(Exception):
                value = getattr(obj, name)
                if isinstance(value, (str, int, float, bool)):
                    names[name] = value
        return cls(type(obj).__qualname__, names)

    def __getattr__(self, name: str) -> Any:
        names = self.__dict__.get("names", {})
        if name in names:
            return names[name]
        raise AttributeError(f"{name!r}: this {self.__dict__.get('type_name')} was left on the worker")

    def __repr__(self) -> str:
        return f"<{self.type_name}{''.join(f' {v!r}' for v in self.names.values())}, left on the worker>"


def _resources() -> tuple[type, ...]:
    """Types whose objects do not pickle, or should not be unpickled on the driver: an uproot source
    opens its file again when it is unpickled (the driver must not open the workers' files), and an
    uproot file, tree or branch carries the file's metadata (180-280 kB a failed attempt here)."""
    kinds: list[type] = [type(threading.Lock()), type(threading.RLock()), io.IOBase, socket.socket]
    for module, name in (("uproot.source.chunk", "Source"), ("uproot.reading", "ReadOnlyFile"),
                         ("uproot.behaviors.TBranch", "HasBranches")):
        kind = getattr(sys.modules.get(module), name, None)  # loaded if an exception can hold one
        if isinstance(kind, type):
            kinds.append(kind)
    return tuple(kinds)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle (a class the workers got by value is sent by value) with resources left behind."""

    def __init__(self, file: io.BytesIO, resources: tuple[type, ...]) -> None:
        super().__init__(file)
        self._resources = resources
        self.left = 0  # resources sent as an Unsent

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, self._resources):
            unsent = Unsent.of(obj)
            self.left += 1
            return (Unsent, (unsent.type_name, unsent.names))
        return super().reducer_override(obj)


def _dumps(obj: Any) -> bytes:
    return _dumps_counting(obj)[0]


def _dumps_counting(obj: Any) -> tuple[bytes, int]:
    """The pickle of ``obj``, and how many resources in it were sent as an :class:`Unsent`."""
    out = io.BytesIO()
    pickler = _Pickler(out, _resources())
    pickler.dump(obj)
    return out.getvalue(), pickler.left


def _payload(exc: BaseException, secrets: Sequence[Any]) -> tuple[bytes | None, tuple[str, ...], bool]:
    """The pickle of ``(args, state)``; an argument that does not pickle is sent as :class:`Unsent`,
    an attribute that does not is left out and named; and whether all went as they are."""
    args, state = exc.args, _state(exc)
    try:
        blob, left = _dumps_counting((args, state))
        dropped: tuple[str, ...] = ()
        whole = left == 0
    except Exception:
        whole = False
        args = tuple(_or_unsent(a) for a in args)
        kept: dict[str, Any] = {}
        refused: list[str] = []
        for name, value in state.items():
            try:
                _dumps(value)
                kept[name] = value
            except Exception:
                refused.append(name)
        try:
            blob, state, dropped = _dumps((args, kept)), kept, tuple(refused)
        except Exception:
            return None, (), False
    if secrets and _mentions(blob, secrets):
        try:
            blob = _dumps(_scrub((args, state), secrets))
        except Exception:
            return None, (), whole
        if _mentions(blob, secrets):  # inside an object: do not send it at all
            return None, (), whole
    return blob, dropped, whole


def _or_unsent(value: Any) -> Any:
    try:
        _dumps(value)
        return value
    except Exception:
        return Unsent.of(value)


def pack(exc: BaseException, secrets: Sequence[Any] = ()) -> list[PackedException]:
    """``exc`` and its chain as data; ``secrets`` are redacted from every text, and an element whose
    objects would still carry one is sent as text only."""
    out = []
    for element, link in chain_of(exc):
        kind = type(element)
        payload, dropped, whole = _payload(element, secrets)
        tb = None
        if element.__traceback__ is not None:
            with contextlib.suppress(Exception):
                tb = tblib.Traceback(element.__traceback__).as_dict()
                tb = _scrub(tb, secrets) if secrets else tb  # (file names, function names)
        out.append(PackedException(kind.__name__, type_path(kind), redact(text(element), secrets), payload, tb,
                                   link, dropped, whole))
    return out


def _traceback(data: dict | None) -> types.TracebackType | None:
    if data is None:
        return None
    try:
        return tblib.Traceback.from_dict(data).as_traceback()
    except Exception:
        return None


def rebuild(packed: PackedException) -> BaseException:
    """The exception ``packed`` describes, as its own type (made with ``__new__``, its ``args`` and
    attribute dictionary, no ``__init__``) when that type can be imported here and the result prints;
    else a :class:`RemoteError` naming it and saying why."""
    kind = _import_type(packed.type_path)
    if kind is None:
        reason = f"its type {packed.type_path} cannot be imported here"
    elif not issubclass(kind, BaseException):
        reason = f"{packed.type_path} is not an exception type here"
    elif packed.payload is None:
        reason = "its arguments could not be sent (they do not pickle, or hold a secret)"
    else:
        try:
            args, state = pickle.loads(packed.payload)
            exc = _instance(kind, tuple(args), state)
            str(exc), repr(exc)  # a __str__ reading what did not come along would break every report
        except Exception as err:
            reason = f"it could not be rebuilt here ({type(err).__name__}: {err})"
        else:
            exc.with_traceback(_traceback(packed.traceback))  # not through a __setattr__ of its type
            if packed.dropped:
                with contextlib.suppress(Exception):
                    exc.add_note(f"casa_executors: attributes that did not pickle were left on the worker: "
                                 f"{', '.join(packed.dropped)}")
            return exc
    log.debug("worker exception %s kept as RemoteError: %s", packed.type_path, reason)
    remote = RemoteError(packed.type_name, packed.message, packed.type_path, reason)
    remote.__traceback__ = _traceback(packed.traceback)
    remote.add_note(f"casa_executors: a {packed.type_name} on the worker, not rebuilt here: {reason}")
    return remote


def unpack(chain: Sequence[PackedException]) -> BaseException:
    """The exception :func:`pack` gave ``chain`` for, with its causes (or contexts) and tracebacks."""
    elements = [rebuild(p) for p in chain]
    for packed, outer, inner in zip(chain, elements, elements[1:]):
        # BaseException's own setter: a type whose __setattr__ refuses attributes still links
        BaseException.__setattr__(outer, "__context__" if packed.link == "context" else "__cause__", inner)
    return elements[0]


class UntrustedData(ValueError):
    """A file of an output store or checkpoint that its run's key does not vouch for (no tag, a wrong tag,
    cut short, or a key that is not private): refused before it is unpickled. The message names the file."""
