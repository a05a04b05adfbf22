"""The one place casa_executors reaches into coffea's and uproot's internals, each behind a check.

Nothing else in the package uses a private coffea or uproot name or replaces one of their functions.
Each use here is checked against what it expects (a signature via :mod:`inspect`, the attributes it
reads, a behaviour probe where one is cheap) before it is relied on. Where a check fails (a coffea or
uproot release changed it), the package warns once per process (:class:`InternalsWarning`, naming the
internal and the versions) and takes the plain path: coffea's and uproot's own code, the same output.

The internals, what each is for, and the plain path:

* uproot objects kept between chunks (:func:`with_uproot_options`): coffea Runner's
  ``_work_function`` and ``metadata_fetcher_root`` partials get an ``object_cache`` and an
  ``array_cache`` in their ``uproot_options`` (``source.keep_files_open``). Plain: coffea's options, the
  file's TTree read again for every chunk.
* NanoEvents' base form once per tree (:mod:`casa_executors.nanoforms`): wraps coffea's
  ``UprootSourceMapping._extract_base_form`` and uproot's ``HasBranches.typenames`` (coffea calls it
  for every chunk, without options); within a run, the schema's form too (coffea's ``BaseSchema`` and
  ``NanoAODSchema`` only), by wrapping ``NanoEventsFactory._from_mapping``. Plain: coffea builds all
  three for every chunk.
* a basket two chunks share read once (:mod:`casa_executors.baskets`): wraps uproot's
  ``TBranch.entries_to_ranges_or_baskets`` and ``Model_TBasket.read``. Plain: uproot reads it twice.
* the next chunk's baskets read and decompressed while a chunk computes (:mod:`casa_executors.prefetch`):
  the same wrapper of ``TBranch.entries_to_ranges_or_baskets`` hands them to uproot, and records the
  branches chunks read. Plain: each chunk reads its baskets when coffea asks for them.
* Runner's retry loop (:func:`unwrap_runner_retries`): the driver takes coffea's ``automatic_retries``
  off the work, to retry across workers (a chunk runs ``retries + 1`` times in all). Plain: coffea's
  loop runs inside each attempt.
* Runner raising what an executor returns (:func:`runner_raises_returned`, a behaviour probe): newer
  coffea raises a run-stopping exception an executor returns, with its ``partial_output`` set.
  Plain: the driver raises it itself.
* a dead server's file handles (:func:`drop_cached_handles`): uproot's ``FSSpecSource._fs``.
  Plain: the filesystem class's instance cache (fsspec's public API) is cleared, the handles go
  when the instance is collected.

The switch: ``Driver(internals=False)`` (``casa_executors.iterative(internals=False)``, ...) or the
environment variable ``CASA_EXECUTORS_INTERNALS=0`` (read by the driver and by every worker) turns the
four optimisations above off; they are coffea's and uproot's own code paths then. The last three are
not optimisations but how the driver fits coffea's executor contract; they stay, checked, whatever the
switch says. ``CASA_EXECUTORS_READ_AHEAD=0`` turns off the read-ahead alone.

Patches are in place only while a task of ours runs with the switch on (:func:`allowed`, entered per
task batch on the worker): outside, coffea and uproot are as they were installed, and a thread that is
not running such a task (coffea's own executors, a user's code) goes through the original even while
another thread's task has them in place.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

log = logging.getLogger(__name__)

ENV = "CASA_EXECUTORS_INTERNALS"
OFF = ("0", "false", "no", "off")
# the releases these checks were written against and run on (scripts/oldest.sh runs the oldest)
KNOWN = {"coffea": "2026.4.0 to 2026.9.0", "uproot": "5.7.0 to 5.7.7"}


class InternalsWarning(RuntimeWarning):
    """A coffea or uproot internal does not look as casa_executors expects: it takes the plain path."""


# -- the switch -------------------------------------------------------------------------------------------

_local = threading.local()  # .on: this thread runs a task of ours with the internals allowed


def env_allows() -> bool:
    """False when ``CASA_EXECUTORS_INTERNALS`` says off (0, false, no, off)."""
    return os.environ.get(ENV, "1").strip().lower() not in OFF


def active() -> bool:
    """Whether this thread runs a task of ours that may use the optimisations (:func:`allowed`)."""
    return getattr(_local, "on", False)


@contextlib.contextmanager
def allowed(option: bool = True) -> Iterator[bool]:
    """While inside, this thread's task may use the optimisations when both ``option`` (the executor's
    ``internals``) and the environment allow them; the patches are in place while any thread is inside
    with them on. Yields whether they are on."""
    on = bool(option) and env_allows()
    outer = active()
    if on:
        _acquire()
    _local.on = on
    try:
        yield on
    finally:
        _local.on = outer
        if on:
            _release()


# -- checks and the warning --------------------------------------------------------------------------------

_warned: set[str] = set()
_checked: dict[str, tuple[Any, str | None]] = {}  # internal -> (the object checked, what is wrong or None)
_check_lock = threading.Lock()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def unexpected(name: str, package: str, problem: str, plain: str) -> None:
    """Warn, once per process and internal, that ``name`` of ``package`` is not as expected."""
    with _check_lock:
        if name in _warned:
            return
        _warned.add(name)
    text = (f"casa_executors: {package} {_version(package)}'s {name} does not look as expected ({problem}); "
            f"{plain} (the same output). These checks know {package} {KNOWN.get(package, '?')}; "
            f"internals=False or {ENV}=0 turns off the optimisations that rest on such internals.")
    log.warning("%s", text)
    warnings.warn(text, InternalsWarning, stacklevel=3)


def _parameters(function: Any) -> list[str] | None:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def _signature_problem(function: Any, expected: list[str], prefix: bool = False) -> str | None:
    """None if ``function``'s parameters are ``expected`` (with ``prefix``: begin with them)."""
    if not callable(function):
        return f"{function!r} is not callable"
    names = _parameters(function)
    if names is None:
        return "its signature cannot be read"
    if (names[:len(expected)] if prefix else names) != expected:
        return f"parameters ({', '.join(names)}), expected ({', '.join(expected)}{', ...' if prefix else ''})"
    return None


def _attributes_problem(owner: type, names: tuple[str, ...]) -> str | None:
    missing = [n for n in names if inspect.getattr_static(owner, n, None) is None]
    return f"{owner.__name__} has no {', '.join(missing)}" if missing else None


def checked(name: str, found: Any, check: Callable[[Any], str | None]) -> str | None:
    """What is wrong with ``found`` (the internal ``name`` as it is now), None if nothing; checked once
    for each object (a release, or a test, that replaces it is checked again)."""
    with _check_lock:
        seen = _checked.get(name)
        if seen is not None and seen[0] is found:
            return seen[1]
    try:
        problem = check(found)
    except Exception as exc:
        problem = f"checking it raised {type(exc).__name__}: {exc}"
    with _check_lock:
        _checked[name] = (found, problem)
    return problem


# -- patches: in place while a task of ours runs with the switch on ----------------------------------------

_ABSENT = object()


@dataclass(frozen=True)
class Patch:
    """A function of coffea or uproot replaced by ours while tasks run."""

    name: str  # as the warning names it
    package: str
    locate: Callable[[], tuple[type, str]]  # the class and the attribute replaced
    check: Callable[[Any], str | None]  # the attribute as found (not bound) -> what is wrong, or None
    wrap: Callable[[Any], Any]  # the attribute as found -> ours (it calls the original when not active())
    plain: str  # what happens without it, for the warning


_patch_lock = threading.Lock()
_depth = 0
_installed: list[tuple[type, str, Any, Any]] = []  # owner, name, what its __dict__ had (or _ABSENT), ours


def _acquire() -> None:
    global _depth
    with _patch_lock:
        _depth += 1
        if _depth == 1:
            for patch in PATCHES:
                _install(patch)


def _release() -> None:
    global _depth
    with _patch_lock:
        _depth -= 1
        if _depth == 0:
            while _installed:
                owner, name, own, ours = _installed.pop()
                if owner.__dict__.get(name) is not ours:  # replaced over ours since: leave theirs
                    log.info("%s.%s was replaced while ours was in place; left as it is", owner.__name__, name)
                elif own is _ABSENT:
                    delattr(owner, name)
                else:
                    setattr(owner, name, own)


_located: dict[str, tuple[type, str]] = {}
_wrapped: dict[str, tuple[Any, Any]] = {}  # patch -> (the attribute wrapped, ours): made once for each


def _static(owner: type, name: str) -> Any:
    """``owner``'s attribute ``name`` as stored (a classmethod, not the bound method); its class's if inherited."""
    for klass in owner.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    raise AttributeError(f"{owner.__name__} has no attribute {name!r}")


def _install(patch: Patch) -> None:
    """Put ``patch`` in place if what it replaces looks as expected (the check runs once for each object)."""
    try:
        located = _located.get(patch.name)
        if located is None:
            located = _located[patch.name] = patch.locate()
        owner, name = located
        found = _static(owner, name)
    except Exception as exc:
        unexpected(patch.name, patch.package, f"not found: {type(exc).__name__}: {exc}", patch.plain)
        return
    problem = checked(patch.name, found, patch.check)
    if problem is not None:
        unexpected(patch.name, patch.package, problem, patch.plain)
        return
    wrapped = _wrapped.get(patch.name)
    if wrapped is None or wrapped[0] is not found:
        wrapped = _wrapped[patch.name] = (found, patch.wrap(found))
    ours = wrapped[1]
    own = owner.__dict__.get(name, _ABSENT)
    setattr(owner, name, ours)
    _installed.append((owner, name, own, ours))


def installed() -> list[str]:
    """``Class.attribute`` of the patches in place now."""
    with _patch_lock:
        return [f"{owner.__name__}.{name}" for owner, name, _, _ in _installed]


# coffea: NanoEvents' base form (nanoforms)

def _locate_base_form() -> tuple[type, str]:
    from coffea.nanoevents.mapping.uproot import UprootSourceMapping

    return UprootSourceMapping, "_extract_base_form"


def _check_base_form(found: Any) -> str | None:
    if not isinstance(found, classmethod):
        return f"a {type(found).__name__}, expected a classmethod"
    return _signature_problem(found.__func__, ["cls", "tree", "iteritems_options"])


def _wrap_base_form(found: classmethod) -> classmethod:
    from casa_executors import nanoforms

    original = found.__func__

    def _extract_base_form(cls, tree, iteritems_options={}):  # noqa: B006 (coffea's signature)
        if not active():
            return original(cls, tree, iteritems_options)
        return nanoforms.form(cls, tree, iteritems_options, original)

    return classmethod(_extract_base_form)


# coffea: the schema's form, once per tree and run (nanoforms)

def _locate_from_mapping() -> tuple[type, str]:
    from coffea.nanoevents.factory import NanoEventsFactory

    return NanoEventsFactory, "_from_mapping"


def _check_from_mapping(found: Any) -> str | None:
    from coffea.nanoevents.schemas import BaseSchema

    if not isinstance(found, classmethod):
        return f"a {type(found).__name__}, expected a classmethod"
    if not isinstance(inspect.getattr_static(BaseSchema, "form", None), property):
        return "BaseSchema.form is not a property"
    return _signature_problem(found.__func__, ["cls", "mapping", "partition_key", "base_form", "schemaclass",
                                               "metadata", "mode"])


def _wrap_from_mapping(found: classmethod) -> classmethod:
    from coffea.nanoevents.mapping.uproot import UprootSourceMapping

    from casa_executors import nanoforms, source

    original = found.__func__

    def _from_mapping(cls, mapping, partition_key, base_form, schemaclass, metadata, mode):
        # from_root's (a file's UUID and tree path lead its partition key), with coffea's own schema
        if (active() and isinstance(mapping, UprootSourceMapping) and nanoforms.keeps(schemaclass)
                and isinstance(partition_key, tuple) and len(partition_key) == 3):
            schemaclass = nanoforms.KeptSchema(schemaclass, source.open_files().schemas, partition_key[:2])
        return original(cls, mapping, partition_key, base_form, schemaclass, metadata, mode)

    return classmethod(_from_mapping)


# uproot: a tree's type names (nanoforms)

def _locate_typenames() -> tuple[type, str]:
    from uproot.behaviors.TBranch import HasBranches

    return HasBranches, "typenames"


def _check_typenames(found: Any) -> str | None:
    return _signature_problem(found, ["self", "filter_name", "filter_typename", "filter_branch", "recursive",
                                      "full_paths"])


def _wrap_typenames(original: Callable) -> Callable:
    from casa_executors import nanoforms

    @functools.wraps(original)
    def typenames(self, **options):
        if options or not active():  # coffea asks without options; a filtered call is uproot's own
            return original(self, **options)
        return nanoforms.typenames(self, original)

    return typenames


# uproot: baskets two chunks share (baskets)

def _locate_ranges() -> tuple[type, str]:
    from uproot.behaviors.TBranch import TBranch

    return TBranch, "entries_to_ranges_or_baskets"


def _check_ranges(found: Any) -> str | None:
    from uproot.behaviors.TBranch import TBranch
    from uproot.model import Model

    return (_signature_problem(found, ["self", "entry_start", "entry_stop"])
            or _attributes_problem(TBranch, ("entry_offsets", "cache_key"))
            or _attributes_problem(Model, ("file",)))


def _wrap_ranges(original: Callable) -> Callable:
    from casa_executors import baskets, prefetch

    def entries_to_ranges_or_baskets(self, entry_start, entry_stop):
        out = original(self, entry_start, entry_stop)
        if not active() or baskets.current() is None:
            return out
        prefetch.seen(self)
        # a list of (basket number, (byte start, byte stop) or a basket), which uproot means to be
        # updated in place with baskets read (its docstring): a kept basket is handed over as read
        offsets = self.entry_offsets
        for i, pair in enumerate(out):
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], tuple)):
                continue  # a basket embedded in the branch: no read
            num = pair[0]
            basket = baskets.kept(self, num, int(offsets[num]), int(offsets[num + 1]), entry_start, entry_stop)
            if basket is None:  # read ahead while the chunk before ran, if it was (prefetch)
                basket = prefetch.take(self, num)
                if basket is not None:
                    baskets.read(self, basket, None)  # kept for the next chunk if it has part of it
            if basket is not None:
                out[i] = (num, basket)
        return out

    return entries_to_ranges_or_baskets


def _locate_read() -> tuple[type, str]:
    from uproot.models.TBasket import Model_TBasket

    return Model_TBasket, "read"


def _check_read(found: Any) -> str | None:
    from uproot.models.TBasket import Model_TBasket

    if not isinstance(found, classmethod):
        return f"a {type(found).__name__}, expected a classmethod"
    return (_signature_problem(found.__func__, ["cls", "chunk", "cursor", "context", "file", "selffile", "parent",
                                                "concrete"])
            or _attributes_problem(Model_TBasket, ("basket_num", "byte_offsets", "member")))


def _wrap_read(found: classmethod) -> classmethod:
    from casa_executors import baskets

    original = found.__func__  # uproot.model.Model's, inherited

    def read(cls, chunk, cursor, context, file, selffile, parent, concrete=None):
        basket = original(cls, chunk, cursor, context, file, selffile, parent, concrete)
        if active():
            baskets.read(parent, basket, chunk)
        return basket

    return classmethod(read)


PATCHES: tuple[Patch, ...] = (
    Patch("UprootSourceMapping._extract_base_form", "coffea", _locate_base_form, _check_base_form,
          _wrap_base_form, "NanoEvents' base form is built for every chunk, as coffea does"),
    Patch("NanoEventsFactory._from_mapping", "coffea", _locate_from_mapping, _check_from_mapping,
          _wrap_from_mapping, "the schema builds NanoEvents' form for every chunk, as coffea does"),
    Patch("HasBranches.typenames", "uproot", _locate_typenames, _check_typenames, _wrap_typenames,
          "the branches' type names are listed for every chunk, as coffea does"),
    Patch("TBranch.entries_to_ranges_or_baskets", "uproot", _locate_ranges, _check_ranges, _wrap_ranges,
          "a basket two chunks share is read by each, as uproot does"),
    Patch("Model_TBasket.read", "uproot", _locate_read, _check_read, _wrap_read,
          "a basket two chunks share is read by each, as uproot does"),
)


# -- coffea Runner's partials -------------------------------------------------------------------------------

def _runner() -> Any:
    from coffea.processor.executor import Runner

    return Runner


def _runner_function(function: Any, attribute: str, expected: list[str], prefix: bool = False) -> Any | None:
    """``function`` bound to its arguments, if it is a partial of ``Runner.<attribute>`` as expected; None if
    it is not one. A partial of it that does not look as expected is warned about (once) and None."""
    if not isinstance(function, functools.partial):
        return None
    target = getattr(_runner(), attribute, None)
    if target is None or getattr(function.func, "__func__", function.func) is not target:
        return None  # (a bound method's __func__: Runner's are static methods today)
    name = f"Runner.{attribute}"
    problem = checked(name, function.func, lambda f: _signature_problem(f, expected, prefix))
    if problem is None:
        try:
            return _signature(function.func).bind_partial(*function.args, **function.keywords)
        except TypeError as exc:
            problem = f"its partial does not bind: {exc}"
    unexpected(name, "coffea", problem, _RUNNER_PLAIN.get(attribute, "coffea's function is used as it is"))
    return None


@functools.lru_cache(maxsize=16)
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


_RUNNER_PLAIN = {
    "automatic_retries": "coffea's retry loop runs inside each of the driver's attempts",
    "_work_function": "each chunk reads its file's TTree again, as coffea does, and a checkpoint's run key "
                      "holds the whole work function",
    "metadata_fetcher_root": "each chunk reads its file's TTree again, as coffea does",
}


def unwrap_runner_retries(function: Any) -> tuple[Any, Any, bool]:
    """Take coffea Runner's in-worker retry loop off ``function``.

    Runner wraps the work in ``partial(automatic_retries, retries, skipbadfiles, f, use_result_type=...)``;
    the driver retries across workers instead, so a chunk is attempted exactly ``retries + 1`` times.
    Returns ``(f, skipbadfiles, use_result_type)``; ``(function, False, False)`` for anything else.
    """
    bound = _runner_function(function, "automatic_retries", ["retries", "skipbadfiles", "func"], prefix=True)
    if bound is None:
        return function, False, False
    arguments = bound.arguments
    extra_args = arguments.get("args", ())
    extra = {k: v for k, v in arguments.get("kwargs", {}).items() if k != "use_result_type"}
    if "func" not in arguments or "skipbadfiles" not in arguments or extra_args or extra:
        unexpected("Runner.automatic_retries", "coffea", f"its partial holds {sorted(arguments)}",
                   _RUNNER_PLAIN["automatic_retries"])
        return function, False, False
    use_result_type = arguments.get("use_result_type", arguments.get("kwargs", {}).get("use_result_type", False))
    return arguments["func"], arguments["skipbadfiles"], bool(use_result_type)


_WORK_FUNCTION = ["format", "xrootdtimeout", "schema", "use_dataframes", "savemetrics", "item",
                  "processor_instance", "uproot_options"]
_METADATA_FUNCTION = ["xrootdtimeout", "align_clusters", "uproot_options", "item"]


def runner_work_arguments(work: Any) -> dict[str, Any] | None:
    """The arguments coffea Runner's chunk function (``Runner._work_function``) was given in ``work``, by
    name (the checkpoint's run key is made of them); None if ``work`` is not that function."""
    bound = _runner_function(work, "_work_function", _WORK_FUNCTION, prefix=True)
    return None if bound is None else dict(bound.arguments)


def with_uproot_options(function: Any, change: Callable[[Any], dict | None]) -> Any | None:
    """coffea Runner's chunk function (``_work_function``) or its file-metadata function
    (``metadata_fetcher_root``) with ``uproot_options`` replaced by ``change(options)``; None when
    ``function`` is neither, or ``change`` gives None (leave them)."""
    for attribute, expected in (("_work_function", _WORK_FUNCTION), ("metadata_fetcher_root", _METADATA_FUNCTION)):
        bound = _runner_function(function, attribute, expected, prefix=True)
        if bound is None:
            continue
        options = change(bound.arguments.get("uproot_options"))
        if options is None:
            return None
        bound.arguments["uproot_options"] = options
        return functools.partial(function.func, *bound.args, **bound.kwargs)
    return None


# -- coffea Runner raising what an executor returns (a behaviour probe) -----------------------------------

class _Probed(Exception):
    pass


@functools.cache
def runner_raises_returned() -> bool:
    """Whether coffea's Runner raises an exception its executor returns (``(output, exception)``) with
    ``partial_output`` set to the output (coffea >= 2026.9), rather than dropping it (older releases).

    Found by running a Runner on one work item with an executor that returns one (no file is read;
    well under a millisecond). If the probe itself fails, the driver raises such exceptions itself."""
    from dataclasses import dataclass as _dataclass

    from coffea.processor.executor import ExecutorBase, WorkItem

    @_dataclass
    class _ReturnsAnError(ExecutorBase):
        def __call__(self, items, function, accumulator):
            return {"out": {"probe": 1}}, _Probed()

    try:
        runner = _runner()(executor=_ReturnsAnError())
        runner([WorkItem("probe", "probe.root", "Events", 0, 1, "probe", None)], _probe_processor, treename="Events")
    except _Probed as exc:
        if getattr(exc, "partial_output", None) == {"probe": 1}:
            return True
        unexpected("Runner (raising an exception its executor returns)", "coffea",
                   "it raised it without partial_output", "the driver raises such exceptions itself")
        return False
    except Exception as exc:
        unexpected("Runner (raising an exception its executor returns)", "coffea",
                   f"the probe raised {type(exc).__name__}: {exc}", "the driver raises such exceptions itself")
        return False
    return False


def _probe_processor(events: Any) -> dict:
    return {}


# -- exceptions ---------------------------------------------------------------------------------------------

def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its ``__cause__``s, as coffea's (private) ``coffea.util._exception_chain`` lists them:
    Runner's retries judge ``skipbadfiles`` by it, and so does the driver. Written here, not imported."""
    chain = []
    while isinstance(exc, BaseException) and len(chain) < 64:
        chain.append(exc)
        exc = exc.__cause__
    return chain


# -- uproot's fsspec source ---------------------------------------------------------------------------------

def drop_cached_handles(source: Any) -> None:
    """Close what fsspec keeps open for a closed uproot ``FSSpecSource`` (fsspec-xrootd keeps a handle per
    URL; one to a server that died keeps failing after the server is back unless it is dropped)."""
    import fsspec

    fs = getattr(source, "_fs", None)
    if isinstance(fs, fsspec.AbstractFileSystem):
        with contextlib.suppress(Exception):
            fs.invalidate_cache()
        with contextlib.suppress(Exception):
            type(fs).clear_instance_cache()
        return
    from uproot.source.fsspec import FSSpecSource

    if isinstance(source, FSSpecSource):
        unexpected("FSSpecSource._fs", "uproot", f"it is {type(fs).__name__}, expected an fsspec filesystem",
                   "the filesystem class's instances are dropped, their handles close when collected")
        path = getattr(source, "file_path", None)
        with contextlib.suppress(Exception):
            protocol = fsspec.core.split_protocol(path)[0] or "file"
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
