"""pytest plugin: coffea's own executor tests, with a casa_executors backend in place of coffea's executors.

Run from an unpacked coffea source distribution (its tests open ``tests/samples/...``)::

    python -m pytest -p casa_coffea_plugin --casa-backend=futures tests/test_local_executors.py ...

(``tests/test_coffea_suite.py`` downloads the sdist and does this for every backend.) With
``--casa-backend=B``, ``coffea.processor.IterativeExecutor``, ``FuturesExecutor`` and
``ParslExecutor``, and the test-local ``_RecoverableExecutor`` stand-in, become factories of
casa_executors executors that share one held engine of backend B for the whole session.
coffea's files are not modified. Cases that cannot apply to B are deselected, each with its
reason (``NOT_APPLICABLE``), and listed at the end of the run.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import warnings
from typing import Any

import cloudpickle
import pytest

import casa_executors
from casa_executors.driver import Driver

# coffea options our executors take as they are; the rest of coffea's options either choose
# the engine (the shared one is used instead) or have no counterpart (a test using them fails loudly)
DRIVER_OPTIONS = ("status", "unit", "desc", "compression", "function_name", "retries", "recoverable")
ENGINE_OPTIONS = ("workers", "pool", "config")
SUBSTITUTED = ("IterativeExecutor", "FuturesExecutor", "ParslExecutor")

LOCAL = ("iterative", "futures")
REMOTE = ("dask", "parsl", "spark", "workqueue")
PARALLEL = ("futures", *REMOTE)
SANDBOXED = ("workqueue",)  # tasks run in a directory of their own

# (test id pattern, backends it cannot apply to, why): docs/testing.md lists the same
NOT_APPLICABLE: list[tuple[str, tuple[str, ...], str]] = [
    ("tests/test_local_executors.py::test_futures_mergepool_forms*", casa_executors.BACKENDS,
     "tests FuturesExecutor's own merging/mergepool options (and that ex.mergepool is the object given); "
     "our executors merge in their own fixed tree (merge_fanin)"),
    ("tests/test_local_executors.py::test_tailtimeout_deprecation_warns_once", casa_executors.BACKENDS,
     "tests the deprecation warning of FuturesExecutor's tailtimeout argument, which our executors never had"),
    ("tests/test_local_executors.py::test_recoverable_partial_output_reachable_in_default_path", PARALLEL,
     "its stand-in executor runs chunks one after the other and stops at the first failure, so the partial "
     "output is exactly the 2 chunks before it; a parallel backend has also finished the chunk after it "
     "(tests/test_coffea_dropin.py checks the partial output on every backend)"),
    ("tests/test_processor.py::test_issue1408", SANDBOXED,
     "gives the file as a path relative to the test's working directory; Work Queue runs every task in a "
     "sandbox directory of its own, where it does not resolve"),
    *((f"tests/test_local_executors.py::test_preprocessing[[]{case}]", SANDBOXED,
       "gives the files as paths relative to the test's working directory; Work Queue runs every task in a "
       "sandbox directory of its own, where they do not resolve")
      for case in ("False-*", "True-ttree", "True-rntuple")),
    ("tests/test_local_executors.py::test_preprocessing_cache_smaller_than_fileset*", SANDBOXED,
     "gives the file as a path relative to the test's working directory; Work Queue runs every task in a "
     "sandbox directory of its own, where it does not resolve"),
]

_session: dict[str, Any] = {"backend": None, "name": None, "deselected": []}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("casa_executors")
    group.addoption("--casa-backend", choices=casa_executors.BACKENDS, default=None,
                    help="run coffea's executor tests with this casa_executors backend in place of coffea's executors")
    group.addoption("--casa-workers", type=int, default=2, help="workers of the shared engine (default 2)")
    group.addoption("--casa-dedup", action="store_true",
                    help="run a test parametrised over coffea's executors once, not once per executor "
                         "(they are all the same backend here)")


def _backend() -> casa_executors.Backend:
    """The session's engine, started on first use and held until the session ends."""
    if _session["backend"] is None:
        name = _session["name"]
        options = {} if name == "iterative" else {"workers": _session["workers"]}
        backend = casa_executors.create(name, status=False, **options).backend
        backend.hold()
        _session["backend"] = backend
    return _session["backend"]


def _factory(coffea_name: str):
    def make(**options: Any) -> Driver:
        unknown = set(options) - set(DRIVER_OPTIONS) - set(ENGINE_OPTIONS)
        if unknown:
            raise TypeError(f"casa_coffea_plugin: coffea's {coffea_name} option(s) {sorted(unknown)} "
                            "have no counterpart in casa_executors")
        return Driver(backend=_backend(), **{k: v for k, v in options.items() if k in DRIVER_OPTIONS})

    make.__name__ = make.__qualname__ = coffea_name  # test ids stay coffea's
    return make


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("casa_backend")
    if name is None:
        return
    why = casa_executors.unavailable(name)
    if why:
        raise pytest.UsageError(f"--casa-backend={name}: {why}")
    _session.update(name=name, workers=config.getoption("casa_workers"))
    from coffea import processor

    for coffea_name in SUBSTITUTED:  # before collection: the tests' parametrize lists read them at import
        setattr(processor, coffea_name, _factory(coffea_name))
    # worker processes need not import coffea's test modules: their functions travel by value
    config.pluginmanager.register(_ByValue(), "casa_by_value")


class _ByValue:
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        modules = {item.module for item in items if getattr(item, "module", None) is not None}
        for module in modules:
            cloudpickle.register_pickle_by_value(module)
            if hasattr(module, "_RecoverableExecutor"):  # the tests' stand-in for a coffea executor
                module._RecoverableExecutor = _factory("_RecoverableExecutor")
        name, keep, gone = _session["name"], [], []
        seen: set[tuple[str, str]] = set()
        for item in items:
            why = _not_applicable(item.nodeid, name)
            if why is None and config.getoption("casa_dedup"):
                why = _duplicate(item, seen)
            if why is None:
                keep.append(item)
            else:
                gone.append(item)
                _session["deselected"].append((item.nodeid, why))
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = keep


def _not_applicable(nodeid: str, backend: str) -> str | None:
    for pattern, backends, why in NOT_APPLICABLE:
        if backend in backends and fnmatch.fnmatchcase(nodeid, pattern):
            return why
    return None


def _duplicate(item: pytest.Item, seen: set[tuple[str, str]]) -> str | None:
    """With --casa-dedup, runs that are the same run here: the same test with another of coffea's
    executors (all are the one backend), and, in process, with another ``compression`` (outputs
    never leave this process, so it is ignored, as coffea's IterativeExecutor ignores it)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if not any(getattr(v, "__name__", None) in SUBSTITUTED for v in params.values()):
        return None
    in_process = _session["name"] == "iterative"

    def same(k: str, v: Any) -> Any:
        if getattr(v, "__name__", None) in SUBSTITUTED:
            return "executor"
        return "ignored" if k == "compression" and in_process else v

    key = (item.originalname or item.name, repr(sorted((k, same(k, v)) for k, v in params.items())))
    if key in seen:
        return ("the same run as another case here: coffea's executors are all the one backend"
                + (", and compression is ignored in process" if in_process else ""))
    seen.add(key)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With CI set, a skipped test is a failure here too (as in tests/conftest.py)."""
    outcome = yield
    report = outcome.get_result()
    if _session["name"] and os.environ.get("CI", "").lower() not in ("", "0", "false", "no") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true makes a skip a failure): {report.longrepr}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _session["name"]:
        return
    deselected = _session["deselected"]
    terminalreporter.section(f"casa_executors backend {_session['name']}: {len(deselected)} deselected")
    reasons: dict[str, list[str]] = {}
    for nodeid, why in deselected:
        reasons.setdefault(why, []).append(nodeid)
    for why, ids in reasons.items():
        terminalreporter.write_line(f"{len(ids)} x {ids[0]}{' ...' if len(ids) > 1 else ''}: {why}")


def pytest_unconfigure(config: pytest.Config) -> None:
    backend, _session["backend"] = _session["backend"], None
    if backend is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend.release()
    sys.stdout.flush()
