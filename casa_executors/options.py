"""The executors' options, written once: their documentation, their types, and their checks.

Every factory (``casa_executors.dask(...)`` and the others) takes its backend's own keyword arguments,
written out in its signature, and the driver's options, which every backend takes: those are
:class:`DriverOptions` (typed ``**options: Unpack[DriverOptions]`` for type checkers) and
:data:`DRIVER_DOCS`. :func:`factory` formats the driver's documentation into each factory's docstring
(as dask-jobqueue formats its common job parameters into each cluster class) and lists the driver's
options in the factory's run-time signature, so ``help()``, ``inspect.signature`` and Jupyter's
Shift-Tab show every option. A new driver option is a field of ``Driver`` plus an entry here in
``DriverOptions`` and ``DRIVER_DOCS`` (tests/test_api.py fails until both are there).

An option a factory does not take fails when the executor is built, with a hint among the public
options only: coffea's own option names say what to use instead (:data:`COFFEA_ADVICE`), an option of
another backend says which, a typo gets difflib's nearest public name.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import textwrap
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ForwardRef, Literal, TypedDict, TypeVar

from casa_executors.errors import ExecutorOptionError

if TYPE_CHECKING:
    from casa_executors.live import ProgressCallback
    from casa_executors.xcache.router import CacheRouter
    from casa_executors.xcache.tokens import Token

F = TypeVar("F", bound=Callable[..., Any])


class DriverOptions(TypedDict, total=False):
    """The options every backend takes (``Driver``'s public fields); documented in :data:`DRIVER_DOCS`."""

    retries: int
    recoverable: bool
    status: bool
    compression: int | None
    merge_fanin: int | None
    chunks_per_task: int | None
    target_task_s: float | None
    merge: Literal["auto", "workers", "driver"]
    store: str | os.PathLike[str] | None
    checkpoint: str | os.PathLike[str] | None
    checkpoint_restart: bool
    cache: str | list[str] | None
    cache_mode: Literal["plain", "forward"]
    cache_spares: int
    token: Token | str | os.PathLike[str] | Literal[False] | None
    internals: bool
    on_progress: ProgressCallback | None
    progress_interval: float
    idle_timeout: float
    speculate: bool


# name -> (type as the docs show it, what it does). The order is the docstrings'.
DRIVER_DOCS: dict[str, tuple[str, str]] = {
    "retries": ("int, default 3",
                "A chunk that keeps failing is attempted exactly ``retries + 1`` times (coffea Runner's own retry "
                "loop is taken off, so attempts are not multiplied)."),
    "recoverable": ("bool, default False",
                    "Chunks that fail for good go to the report, and the output of the others is returned (with a "
                    "warning). Otherwise the first chunk that fails for good stops the run with the exception its "
                    "last attempt raised, carrying ``partial_output``."),
    "status": ("bool, default True", "The progress bar (chunks, events/s, retries, failures); False prints nothing."),
    "compression": ("int or None, default 1",
                    "LZ4 level (0-16) of the outputs that travel between workers and this process; None: off."),
    "merge_fanin": ("int, optional",
                    "Outputs merge in a fixed tree in chunk order, this many at a node (default 8; 2 with "
                    "``target_task_s``), so the result depends neither on which worker finished first nor on "
                    "where a merge ran. coffea's ``treereduction``."),
    "chunks_per_task": ("int, optional",
                        "Chunks one task carries. By default a task takes about 1/(2 x workers) of the chunks "
                        "still waiting (1/workers on Spark), at most 32, and tasks shrink to one chunk towards the "
                        "end of a long run; iterative runs one chunk at a time."),
    "target_task_s": ("float, optional",
                      "Adaptive chunking: the driver joins adjacent chunks of a file into one task, or cuts long "
                      "ones, aiming at tasks of this many seconds. The output is the fixed-chunk run's."),
    "merge": ('{"auto", "workers", "driver"}, default "auto"',
              '"driver": outputs come back and merge in this process; "workers": merge on the engine, or refuse '
              'to run; "auto": on the engine where it can, the last few in this process.'),
    "store": ("str or os.PathLike, optional",
              "Where workers put outputs to merge them, when their engine's workers may be on other machines: a "
              "folder they all reach, or an fsspec URL (``root://...``, ``file://...``)."),
    "checkpoint": ("str or os.PathLike, optional",
                   "A folder or fsspec URL the workers can write: the run keeps its merge tree there, and the same "
                   "call resumes from it after a kill. Not with ``store``."),
    "checkpoint_restart": ("bool, default False",
                           "A checkpoint of another run (another fileset, processor or versions) at ``checkpoint`` "
                           "is deleted instead of refused."),
    "cache": ("str or list of str, optional",
              'XCache endpoint(s) to read ``root://`` files through: ``"root://host:port"`` (or ``roots://``, '
              '``xroot://``, ``xroots://``) or ``"host:port"``. With several, each file goes to one chosen by '
              "consistent hashing. The fileset keeps the origin URLs; a read that fails on the cache falls over "
              "to the origin. A malformed endpoint fails when the executor is built."),
    "cache_mode": ('{"plain", "forward"}, default "plain"',
                   '"plain": ``root://cache//path`` (the cache has a fixed origin); "forward": '
                   "``root://cache//root://origin//path``."),
    "cache_spares": ("int, default 0",
                     "Further caches (the next ones on the hash ring) tried before the origin when a cache fails."),
    "token": ("str, Token, os.PathLike, False or None",
              "Bearer token sent (as XRootD ``authz``) with reads through ``cache``, never printed: the token "
              "itself (a str or ``casa_executors.xcache.Token``), a path (``pathlib.Path``) of a file holding it, "
              "readable by you only, or False for none. None (default): WLCG discovery (``BEARER_TOKEN``, "
              "``BEARER_TOKEN_FILE``, ``$XDG_RUNTIME_DIR/bt_u$UID``, ``/tmp/bt_u$UID``). Only with ``cache``; "
              "a token file that cannot be read fails when the executor is built."),
    "internals": ("bool, default True",
                  "False: none of the speed-ups that rest on coffea's or uproot's internals (kept TTrees, "
                  "NanoEvents forms, kept baskets); the same output. ``CASA_EXECUTORS_INTERNALS=0`` in the "
                  "environment of this process or of a worker does the same."),
    "on_progress": ("callable, optional",
                    "Called with a ``casa_executors.Progress`` while the processing runs: ``output`` (the "
                    "processor's output merged over the chunks that have arrived), the counts, and ``final`` on "
                    "the last call. From the driver's thread, so keep it short; an exception in it is logged and "
                    "warned about, and the callback is not called again. The run's output is the same with or "
                    "without it."),
    "progress_interval": ("float, default 1.0", "At most this many seconds between two ``on_progress`` calls."),
    "speculate": ("bool, default False",
                  "Start a copy of a task that runs much longer than its chunks should take (a straggler) on another "
                  "worker while chunks still wait, as MapReduce and Spark do; the first copy back wins and the "
                  "others are cancelled, so every chunk is in the output once. Only on engines outside this "
                  "process, with outputs not in a store or checkpoint."),
    "idle_timeout": ("float, default 60",
                     "Seconds an engine started for coffea's preprocessing call stays up for the processing call of "
                     "the same Runner call, which takes it over and stops it when it ends; with no processing call, "
                     "it stops after this idle time. 0: stop it after each call. An engine you pass in "
                     "(``client=``, ``cluster=``, ``session=``) is never stopped."),
}

# Driver's fields that are not options: what the factories fill in, what coffea's Runner sets per call, state
DRIVER_INTERNAL: dict[str, str] = {
    "backend": "the factory builds it from its own parameters",
    "report": "the executor's report (executor.report), made with it",
    "router": "built from cache=, cache_mode=, token= and cache_spares=",
    "desc": "the progress bar's label, set by coffea's Runner for each call",
    "unit": "the progress bar's unit, set by coffea's Runner for each call",
    "function_name": "coffea's, unused here",
    "_file_runs": "state Runner's copies of the executor share",
}

# parameters several backends share, formatted into their docstrings
SCALING_DOCS: dict[str, tuple[str, str]] = {
    "adapt": ("tuple of (int, int), optional",
              "Workers asked for as work arrives, never fewer than ``min`` nor more than ``max`` of ``(min, max)``, "
              "and given back when the run ends or they idle. Not with ``workers``."),
    "worker_timeout": ("float, default 300",
                       "Seconds a run waits for its first worker; then a ``BackendUnavailable`` that says what is "
                       "missing (jobs still pending in the batch queue, a gateway cluster with no worker...)."),
}

# coffea's option names (its executors' and Runner's) that no factory takes: what to use instead
_RUNNER = "a processor.Runner option: give it to Runner(...), which passes what the executor needs"
_TASKVINE = ("an option of coffea's TaskVineExecutor; TaskVine is not a backend here (workqueue() is the nearest: "
             "Work Queue workers, help(casa_executors.workqueue))")
_NOT_TAKEN_LABELS = "the progress bar's label, which coffea's Runner sets for each call; not an option here"
COFFEA_ADVICE: dict[str, str] = {
    "treereduction": "outputs merge in a fixed tree in chunk order: use merge_fanin=N (its fan-in, default 8)",
    "merging": "merges are planned by the driver in a fixed tree: merge_fanin= sets its fan-in, merge='workers' "
               "runs them on the engine, merge='driver' in this process",
    "mergepool": "merges run on the engine's own workers (merge='workers') or in this process (merge='driver'); "
                 "there is no separate merge pool",
    "pool": "the backend runs its own pool of workers: give workers=N (dask(client=...) to use a Dask cluster "
            "of yours)",
    "tailtimeout": "it never had an effect in coffea (deprecated there): drop it; the driver shrinks tasks towards "
                   "the end of a run so that no worker waits on a long last task",
    "heavy_input": "keep large inputs on your processor object (it travels once per task batch, pickled once per "
                   "run)",
    "priority": "the driver orders the tasks itself (chunks in order, merges as soon as they are ready): drop it",
    "use_dataframes": "not supported: outputs are coffea accumulators merged in a fixed tree, not a distributed "
                      "Dask DataFrame",
    "worker_affinity": "not needed: a worker keeps the files of a run open between its chunks whichever it gets",
    "function_name": "not taken: tasks carry no name of yours",
    "desc": _NOT_TAKEN_LABELS,
    "unit": _NOT_TAKEN_LABELS,
    "jobs_executors": "the driver runs chunk tasks and merge tasks on your Config's executors: give "
                      "parsl(config=...) the executors to use (merge='driver' merges in this process)",
    "merges_executors": "merges run where the chunk tasks run (merge='workers') or in this process "
                        "(merge='driver')",
    "chunks_per_file": "coffea's Runner cuts files into chunks (Runner(chunksize=..., maxchunks=...)); "
                       "chunks_per_task= sets how many chunks one task carries",
    "manager_name": "workqueue(name=...) names the Work Queue manager",
    "cores": "each worker runs one task at a time: give workers=N (or adapt=), and cores in the batch options "
             "(workqueue(batch_options=...), your cluster or provider)",
    "memory": "ask for memory where the workers are made: workqueue(batch_options=...), your dask cluster= or "
              "parsl provider=",
    "checkpointer": "checkpoint= (a folder or fsspec URL) keeps the run's merge tree and resumes the same call "
                    "after a kill; coffea's Runner(checkpointer=...) also works with these executors",
    "skipbadfiles": "a processor.Runner option: Runner(..., skipbadfiles=True) (or a tuple of exception types); "
                    "the driver honours it",
}
for _name in ("executor", "pre_executor", "chunksize", "maxchunks", "metadata_cache", "xrootdtimeout",
              "align_clusters", "savemetrics", "use_result_type", "schema", "processor_compression", "format",
              "cachestrategy"):
    COFFEA_ADVICE.setdefault(_name, _RUNNER)
for _name in ("status_display_interval", "ssl", "filepath", "extra_input_files", "x509_proxy", "environment_file",
              "verbose", "print_stdout", "disk", "gpus", "replicas", "disable_worker_transfers", "resource_monitor",
              "resources_mode", "fast_terminate_workers", "split_on_exhaustion", "checkpoint_proportion",
              "concurrent_reads", "custom_init"):
    COFFEA_ADVICE.setdefault(_name, _TASKVINE)
del _name

FACTORIES: dict[str, Callable[..., Any]] = {}  # backend name -> its factory (casa_executors.dask...), as registered


def _block(docs: Mapping[str, tuple[str, str]], names: list[str] | None = None) -> str:
    """numpydoc parameter entries, indented as a function's docstring is."""
    out = []
    for name in names or list(docs):
        kind, text = docs[name]
        out.append(f"    {name} : {kind}\n" + textwrap.fill(text, 100, initial_indent=" " * 8,
                                                          subsequent_indent=" " * 8))
    return "\n".join(out)


def format_doc(template: str) -> str:
    """A factory's docstring: ``{driver}`` becomes the driver's options, ``{adapt}`` and ``{worker_timeout}``
    the shared entries."""
    return template.format(driver=_block(DRIVER_DOCS), adapt=_block(SCALING_DOCS, ["adapt"]),
                           worker_timeout=_block(SCALING_DOCS, ["worker_timeout"]))


def _annotation(value: Any) -> Any:
    return value.__forward_arg__ if isinstance(value, ForwardRef) else value


def _driver_defaults() -> dict[str, Any]:
    from casa_executors.driver import Driver

    defaults = {}
    for f in dataclasses.fields(Driver):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def full_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature with its ``**options`` spelled out as the driver's options (keyword-only, with
    ``Driver``'s defaults): what ``help()`` and ``inspect.signature`` show."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    defaults = _driver_defaults()
    hints = DriverOptions.__annotations__
    driver = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name],
                                annotation=_annotation(hints[name])) for name in DRIVER_DOCS]
    return sig.replace(parameters=own + driver)


def factory(backend: str, doc: str) -> Callable[[F], F]:
    """Register ``fn`` as ``backend``'s factory: its docstring is ``doc`` formatted (:func:`format_doc`), its
    run-time signature :func:`full_signature`."""

    def register(fn: F) -> F:
        fn.__doc__ = format_doc(doc)
        fn.__signature__ = full_signature(fn)  # type: ignore[attr-defined]
        FACTORIES[backend] = fn
        return fn

    return register


def public_options(backend: str) -> list[str]:
    """Every option ``backend``'s factory takes, in its signature's order."""
    return list(inspect.signature(FACTORIES[backend]).parameters)


def check_driver_options(backend: str, options: Mapping[str, Any]) -> None:
    """Raise ``ExecutorOptionError`` for the ``options`` (what a factory's own parameters did not take) that
    are not driver options, each with what to use instead."""
    unknown = [name for name in options if name not in DRIVER_DOCS]
    if unknown:
        raise ExecutorOptionError("; ".join(unknown_option(backend, name) for name in unknown))


def unknown_option(backend: str, name: str) -> str:
    """Why ``backend``'s factory does not take ``name``, and what to use instead; public names only."""
    valid = public_options(backend)
    head = f"{backend}(): unknown option {name!r}"
    if name in COFFEA_ADVICE:
        return f"{backend}(): {name!r} is coffea's option, not one of ours: {COFFEA_ADVICE[name]}"
    elsewhere = [other for other in FACTORIES if other != backend and name in public_options(other)]
    if elsewhere:
        return f"{head}: it is an option of {', '.join(f'{other}()' for other in elsewhere)}"
    hint = difflib.get_close_matches(name, valid, n=1)
    if hint:
        return f"{head} (did you mean {hint[0]!r}?)"
    return f"{head}; its options are: {', '.join(valid)} (help(casa_executors.{backend}) describes them)"


# -- cache= and token=: checked when the executor is built ------------------------------------------------


def make_router(cache: Any, cache_mode: Any, token: Any, cache_spares: Any) -> CacheRouter | None:
    """The reads' router for the driver's ``cache``/``cache_mode``/``token``/``cache_spares``, or None
    without ``cache``. Raises ``ExecutorOptionError`` naming the option that is wrong: a malformed endpoint,
    a token file that cannot be read."""
    if cache is None:
        if token not in (None, False):
            raise ExecutorOptionError("token= is only used with cache=; give cache= too")
        return None
    from casa_executors.xcache.router import CacheRouter, check_endpoint

    endpoints = [cache] if isinstance(cache, str) else cache
    if not isinstance(endpoints, (list, tuple)) or not endpoints:
        raise ExecutorOptionError(f"cache= must be an XCache endpoint (root://host:port) or a list of them, "
                                  f"got {cache!r}")
    for endpoint in endpoints:
        why = check_endpoint(endpoint)
        if why is not None:
            raise ExecutorOptionError(f"cache=: {endpoint!r} is not an XCache endpoint: {why}")
    if cache_mode not in ("plain", "forward"):
        raise ExecutorOptionError(f"cache_mode must be 'plain' or 'forward', got {cache_mode!r}")
    secret = None if token is False else resolve_token(token)
    try:
        return CacheRouter(list(endpoints), mode=cache_mode, token=secret, spares=cache_spares)
    except ValueError as exc:
        raise ExecutorOptionError(str(exc)) from None


def resolve_token(token: Any) -> Token | None:
    """``token=`` as a Token (None: WLCG discovery found none). A file that cannot be read, one others can
    read, an empty token: ``ExecutorOptionError`` naming ``token=`` (and the file, never the token)."""
    from casa_executors.xcache.tokens import Token, TokenError, discover_token, read_token_file

    try:
        if isinstance(token, os.PathLike):
            return read_token_file(os.fspath(token))
        if isinstance(token, str) and token.startswith(("/", "~", "./", "../")):
            raise ExecutorOptionError(
                f"token= is the token itself, and this looks like a file's path ({token}): give "
                "pathlib.Path(...) to read the token from a file")
        if token is not None and not isinstance(token, (str, Token)):
            raise ExecutorOptionError(f"token= must be a token (str or Token), a pathlib.Path of a token file, "
                                      f"False or None, got {type(token).__name__}")
        return discover_token(token)
    except (TokenError, OSError) as exc:
        found = "" if token is not None else " (found by WLCG token discovery)"
        raise ExecutorOptionError(f"token=: {exc}{found}") from exc
