"""Parsl: a user ``Config``, a local HighThroughputExecutor with ``workers=N``, or blocks on a batch
system with ``provider=`` (``workers=N`` or ``adapt=(min, max)``; see ``parsl_provider.py``).

Each start builds a DataFlowKernel from a fresh copy of the configuration
(parsl executors cannot be started twice, and coffea's Runner calls the
executor twice), made with pickle's per-pickler hooks (``fresh_copy``: new
locks, nothing process-wide changed); each stop cleans it up, which ends the
interchange and the worker pools. Parsl must not retry (the driver does): retries are forced to 0.
A lost worker pool shows up as ``ManagerLost`` once the interchange misses its
heartbeats; one failed block does not disable the executor (three in a row do).
Parsl's strategy starts a new block when a pool died; with ``strategy='none'``
parsl launches only ``init_blocks`` (from its poller thread, up to ``strategy_period``
after start) and the backend replaces them, one block, when tasks come and every block
has ended (with ``init_blocks=0``: when tasks come and there is none).
A killed pool leaves helpers behind (its multiprocessing manager and resource
tracker, children of init) that parsl never stops: local workers carry a token
in their environment, and stop() ends whatever still has it, by PID.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import pickle
import shlex
import shutil
import sys
import tempfile
import threading
import types
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from casa_executors import procs
from casa_executors.backends.base import REPO, Backend, default_workers, plural
from casa_executors.backends.parsl_provider import PREFETCH_PER_WORKER, FirstWorker, from_provider
from casa_executors.backends.scaling import DEFAULT_WORKER_TIMEOUT, check_adapt, check_worker_timeout
from casa_executors.errors import BackendUnavailable, ExecutorOptionError

if TYPE_CHECKING:
    from parsl.config import Config
    from parsl.dataflow.dflow import DataFlowKernel

BIN = os.path.dirname(sys.executable)
HEARTBEAT_PERIOD = 2  # s; a dead pool's tasks come back as ManagerLost after HEARTBEAT_THRESHOLD
HEARTBEAT_THRESHOLD = 10
TOKEN_VAR = "CASA_PARSL_RUN"
log = logging.getLogger(__name__)


def _script(name: str) -> str | None:
    """A parsl script (interchange.py, process_worker_pool.py) on PATH or beside this Python."""
    found = shutil.which(name) or os.path.join(BIN, name)
    return found if os.path.isfile(found) else None


def _worker_env(token: str) -> str:
    """Shell lines giving local workers this environment's scripts, this package and our token."""
    return (f"export PATH={shlex.quote(BIN)}:$PATH\n"
            f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
            f"export {TOKEN_VAR}={token}\n")


def _end_leftovers(token: str) -> None:
    """Stop, by PID, whatever still carries our token (helpers a lost pool left behind)."""
    left = procs.with_environ(TOKEN_VAR, token) if token else []
    if left:
        log.info("parsl: stopping %d leftover worker processes %s", len(left), [p.pid for p in left])
        procs.terminate(left, grace=2.0)


# deep-copied by reference, as copy.deepcopy does: functions, classes and modules
_SHARED = (types.FunctionType, type, types.ModuleType)
_FRESH = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


class _Copier(pickle.Pickler):
    """Pickles a not-yet-started parsl object for ``fresh_copy``, through pickle's per-pickler hooks
    (``persistent_id``, ``reducer_override``): nothing global changes."""

    def __init__(self, file: io.BytesIO, shared: list[Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.shared = shared

    def persistent_id(self, obj: Any) -> int | None:
        plain_builtin = isinstance(obj, types.BuiltinFunctionType) and (
            obj.__self__ is None or isinstance(obj.__self__, types.ModuleType))  # not a bound method
        if isinstance(obj, _SHARED) or plain_builtin:
            self.shared.append(obj)
            return len(self.shared) - 1
        return None

    def reducer_override(self, obj: Any) -> Any:
        fresh = _FRESH.get(type(obj))
        return (fresh, ()) if fresh is not None else NotImplemented


class _Restorer(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, shared: list[Any]) -> None:
        super().__init__(file)
        self.shared = shared

    def persistent_load(self, pid: int) -> Any:
        return self.shared[pid]


def fresh_copy(obj: Any) -> Any:
    """A deep copy of a not-yet-started parsl Config (parsl executors start once) whose locks are new,
    unlocked ones: events and conditions come with them, and a lock shared by several objects stays
    shared in the copy. Functions, classes and modules are the same objects, as ``copy.deepcopy`` keeps
    them. Within this process only: the bytes never leave it."""
    shared: list[Any] = []
    buf = io.BytesIO()
    _Copier(buf, shared).dump(obj)
    buf.seek(0)
    return _Restorer(buf, shared).load()


def _chained(app_future: Future) -> Future:
    """A plain Future that follows a parsl AppFuture (whose cancel() raises NotImplementedError)."""
    out: Future = Future()

    def copy_over(f: Future) -> None:
        try:
            exc = f.exception()
            if exc is None:
                out.set_result(f.result())
            else:
                out.set_exception(exc)
        except InvalidStateError:  # cancelled by the driver meanwhile
            pass
        except BaseException as err:
            if not out.done():
                out.set_exception(err)

    app_future.add_done_callback(copy_over)
    return out


def prioritised(fn: Callable[[Any], Any], arg: Any, parsl_resource_specification: dict | None = None) -> Any:
    """``fn(arg)`` as an app that takes a resource specification (parsl passes it to the function too)."""
    return fn(arg)


class ParslBackend(Backend):
    name = "parsl"
    # HighThroughputExecutor's interchange hands out the tasks of lowest resource_specification 'priority'
    # first, first in, first out among equals, and those without one last (parsl 2026.10.26, interchange.py
    # process_task_incoming); a pool's prefetched task (PREFETCH_PER_WORKER) still goes first. A Config with
    # another executor (ThreadPoolExecutor refuses any resource specification) does not get it.
    honours_priority = True

    def __init__(self, config: Config | None = None, workers: int | None = None, provider: Any = None,
                 adapt: tuple[int, int] | None = None, host: str | None = None,
                 worker_timeout: float = DEFAULT_WORKER_TIMEOUT) -> None:
        super().__init__(workers)
        adapt = check_adapt("parsl", adapt)
        self._first_worker = FirstWorker(provider, workers, adapt, check_worker_timeout("parsl", worker_timeout))
        self._provider = provider
        if provider is not None or adapt is not None or host is not None:
            config, workers = from_provider(config, provider, workers, adapt, host), None
        if config is not None and workers is not None:
            raise ExecutorOptionError("parsl: give config= or workers=, not both")
        self._template: Config | None = None
        if config is not None:
            from parsl.config import Config

            if not isinstance(config, Config):
                raise ExecutorOptionError(f"parsl: config must be a parsl.config.Config, got {config!r}")
            try:  # copied now, before anyone starts it: every start then gets a fresh copy
                self._template = fresh_copy(config)
            except Exception as exc:
                raise ExecutorOptionError(
                    f"parsl: cannot copy this Config ({type(exc).__name__}: {exc}); pass one that was never loaded"
                ) from None
            self._adapt(self._template)
        elif workers is None:
            self._workers = default_workers()
        self._dfk: DataFlowKernel | None = None
        self._apps: dict[Callable[[Any], Any], Any] = {}
        self._run_dir: str | None = None
        self._token = ""
        self._no_strategy = False
        self._priorities = False  # every executor is a HighThroughputExecutor: tasks carry their priority
        self._block_lock = threading.Lock()

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import parsl  # noqa: F401
        except ImportError as exc:
            return f"the parsl backend needs the 'parsl' package ({exc})"
        missing = [s for s in ("interchange.py", "process_worker_pool.py") if _script(s) is None]
        if missing:
            return f"parsl is installed but {', '.join(missing)} is neither on PATH nor in {BIN}"
        return None

    # -- configuration -------------------------------------------------------------
    @staticmethod
    def _adapt(config: Config) -> None:
        """Make a user's Config safe for the driver: no parsl retries, a lost block is not fatal."""
        from parsl.executors import HighThroughputExecutor
        from parsl.jobs.error_handlers import simple_error_handler, windowed_error_handler

        if config.retries or config.retry_handler is not None:
            warnings.warn(
                f"parsl: config.retries={config.retries} is ignored: parsl's retries would hide failures "
                "from the executor, which retries itself (use its retries= option)",
                stacklevel=5,  # the user's ce.parsl(config=...) call
            )
            config.retries, config.retry_handler = 0, None
        for ex in config.executors:
            if not isinstance(ex, HighThroughputExecutor):
                continue
            if ex.block_error_handler is simple_error_handler:  # the default would fail every task on one lost block
                ex.block_error_handler = windowed_error_handler
            if list(ex.interchange_launch_cmd) == ["interchange.py"] and shutil.which("interchange.py") is None:
                script = _script("interchange.py")
                if script:
                    ex.interchange_launch_cmd = [sys.executable, script]

    @staticmethod
    def _localize(config: Config, token: str) -> Config:
        """Local workers get this environment, this package and our token."""
        from parsl.providers import LocalProvider

        for ex in config.executors:
            provider = getattr(ex, "provider", None)
            if isinstance(provider, LocalProvider):
                provider.worker_init = _worker_env(token) + (provider.worker_init or "")
        return config

    def _local_config(self, run_dir: str) -> Config:
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.jobs.error_handlers import windowed_error_handler
        from parsl.providers import LocalProvider

        n = self.workers
        interchange = _script("interchange.py")
        htex = HighThroughputExecutor(
            label="casa_htex",
            address="127.0.0.1",
            loopback_address="127.0.0.1",
            max_workers_per_node=n,
            cores_per_worker=min(1.0, (os.cpu_count() or 1) / n),  # n workers even on fewer cores
            prefetch_capacity=PREFETCH_PER_WORKER * n,
            heartbeat_period=HEARTBEAT_PERIOD,
            heartbeat_threshold=HEARTBEAT_THRESHOLD,
            interchange_launch_cmd=[sys.executable, interchange] if interchange else None,
            # min_blocks=1: the strategy replaces a block whose pool died
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            block_error_handler=windowed_error_handler,
        )
        return Config(executors=[htex], strategy_period=0.5, retries=0, run_dir=run_dir,
                      usage_tracking=0, initialize_logging=True)

    # -- lifetime ----------------------------------------------------------------
    def _start(self) -> None:
        from parsl.dataflow.dflow import DataFlowKernel

        self._token = uuid.uuid4().hex
        if self._template is not None:
            config = fresh_copy(self._template)
            if self._provider is not None:  # a private run directory (parsl's default: ./runinfo)
                self._run_dir = config.run_dir = tempfile.mkdtemp(prefix="casa-parsl-")
                self._first_worker.seen, self._first_worker.failed = False, None
        else:
            self._run_dir = tempfile.mkdtemp(prefix="casa-parsl-")
            config = self._local_config(self._run_dir)
        self._localize(config, self._token)
        self._no_strategy = config.strategy in (None, "none")
        from parsl.executors import HighThroughputExecutor

        self._priorities = all(isinstance(ex, HighThroughputExecutor) for ex in config.executors)
        try:
            self._dfk = DataFlowKernel(config)
        except BaseException:
            for ex in config.executors:  # whatever started before the failure
                with contextlib.suppress(Exception):
                    ex.shutdown()
            _end_leftovers(self._token)
            self._remove_run_dir()
            raise
        atexit.register(self.stop)  # a held engine still ends with the interpreter
        if self._provider is not None and self._first_worker.at_start:
            try:
                self._first_worker.wait(self._dfk)
            except BaseException:
                self._stop()  # cancels the blocks
                raise

    def _stop(self) -> None:
        import parsl
        from parsl.errors import NoDataFlowKernelError

        atexit.unregister(self.stop)
        dfk, self._dfk = self._dfk, None
        self._apps.clear()
        try:
            if dfk is not None:
                dfk.cleanup()  # shuts the executors down: interchange and worker pools end
        finally:
            with contextlib.suppress(NoDataFlowKernelError):
                if dfk is not None and parsl.dfk() is dfk:  # someone loaded ours as parsl's current one
                    parsl.clear()
            _end_leftovers(self._token)  # what a lost pool left behind
            self._remove_run_dir()

    def _remove_run_dir(self) -> None:
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    # -- what the driver uses ------------------------------------------------------
    def submit(self, fn: Callable[[Any], Any], arg: Any, priority: int = 0) -> Future:
        from parsl.app.python import PythonApp

        if self._dfk is None:
            raise BackendUnavailable("parsl: the backend is not started")
        if self._no_strategy:
            self._ensure_block(self._dfk)
        if priority and self._priorities:  # the interchange's 'priority': lower first, none after all
            app = self._apps.get(prioritised)
            if app is None:
                app = self._apps[prioritised] = PythonApp(prioritised, data_flow_kernel=self._dfk)
            future = _chained(app(fn, arg, parsl_resource_specification={"priority": -priority}))
        else:
            app = self._apps.get(fn)
            if app is None:
                app = self._apps[fn] = PythonApp(fn, data_flow_kernel=self._dfk)
            future = _chained(app(arg))
        if self._provider is not None:
            self._first_worker.wait(self._dfk)  # adapt=(0, n): the work asks for the first block
        return future

    def _ensure_block(self, dfk: DataFlowKernel) -> None:
        """Without a scaling strategy nobody replaces a dead block: launch one once every block has ended.

        Parsl's poller launches ``init_blocks`` up to ``strategy_period`` after start: until then no block is
        known, and launching one here would add a block to those (two pools for one asked for). A block in
        ``blocks_to_job_id`` but not in ``status_facade`` was just launched: the poller's ``poll_facade``
        replaces the whole status with one read before that launch, which can drop it for a poll interval.
        """
        from parsl.executors.status_handling import BlockProviderExecutor
        from parsl.jobs.states import TERMINAL_STATES, JobState, JobStatus

        with self._block_lock:  # two submitting threads launch one block, not two
            for ex in dfk.executors.values():
                if not isinstance(ex, BlockProviderExecutor) or ex.provider is None or ex.bad_state_is_set:
                    continue
                known = dict.fromkeys(list(ex.blocks_to_job_id), JobStatus(JobState.PENDING))
                known.update(dict(ex.status_facade))
                if not known:
                    if getattr(ex.provider, "init_blocks", 0):
                        continue  # parsl's poller launches them
                elif any(s.state not in TERMINAL_STATES for s in known.values()):
                    continue
                log.info("parsl: strategy='none' and no block left for %s: launching one", ex.label)
                ex.scale_out_facade(1)

    @property
    def dfk(self) -> DataFlowKernel | None:
        return self._dfk

    @property
    def run_dir(self) -> str | None:
        """The run directory we made (local workers, provider=), while started."""
        return self._run_dir

    @property
    def workers(self) -> int:
        if self._template is None:
            return self._workers or 1
        return sum(_capacity(ex) for ex in self._template.executors) or 1

    @property
    def workers_local(self) -> bool:
        """Our local HighThroughputExecutor, or a Config whose executors all use a LocalProvider."""
        if self._template is None:
            return True
        from parsl.providers import LocalProvider

        return all(isinstance(getattr(ex, "provider", None), LocalProvider) for ex in self._template.executors)

    def describe(self) -> str:
        """``parsl(2 workers, local HighThroughputExecutor)``, ``parsl(up to 2 workers, HighThroughputExecutor
        on SlurmProvider, adapt=(0, 2))``, ``parsl(4 workers, config: ...)``."""
        if self._template is None:
            return f"parsl({plural(self.workers, 'worker')}, local HighThroughputExecutor)"
        adapt = self._first_worker.adapt
        size = plural(self.workers, "worker")
        executors = ", ".join(
            type(ex).__name__ + (f" on {type(ex.provider).__name__}" if getattr(ex, "provider", None) else "")
            for ex in self._template.executors)
        source = "" if self._provider is not None else "config: "
        return f"parsl({'up to ' if adapt else ''}{size}, {source}{executors}{f', adapt={adapt}' if adapt else ''})"


def _capacity(executor: Any) -> int:
    """How many tasks an executor of a Config can run at once, at most."""
    per_node = getattr(executor, "workers_per_node", None) or getattr(executor, "max_threads", None) or 1
    provider = getattr(executor, "provider", None)
    blocks = max(getattr(provider, "max_blocks", 1) or 1, getattr(provider, "init_blocks", 1) or 1)
    nodes = getattr(provider, "nodes_per_block", 1) or 1
    per_node = 1 if per_node == float("inf") else int(per_node)
    return per_node * (blocks * nodes if provider is not None else 1)
