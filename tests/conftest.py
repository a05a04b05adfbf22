"""Shared fixtures: real ROOT files from the real ADL sample; CI turns skips into failures."""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
SAMPLE_PARQUET = DATA / "Run2012B_SingleMu-1000.parquet"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CI set, a skipped component is a failure, never a silent pass."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true makes a skip a failure): {reason}"


# Under pytest-xdist (scripts/run.sh test runs two workers, --dist loadfile) each test module is run whole by one
# worker, so a module's fixtures (held engines) start once. The modules that take longest are handed out first,
# so that neither worker is left with a long one at the end; the facility modules (tests/facility.py: the
# session's Slurm, dask-gateway and token-checking XCache) come first, so that they mostly land on one worker.
# (xdist's --dist loadgroup would keep them on one worker, but with pytest 9.2 its groups are lost: xdist 3.8
# sets item._nodeid, which pytest 9.2's Node.nodeid no longer reads.)
FACILITY_MODULES = ["test_slurm_standin", "test_slurm_dask", "test_slurm_parsl", "test_slurm_workqueue",
                    "test_gateway", "test_gateway_slurm", "test_engine_lifetime", "test_credentials_at_rest"]
LONGEST_FIRST = [*FACILITY_MODULES, "test_coffea_suite", "test_backend_contract", "test_checkpoint", "test_examples",
                 "test_backend_spark", "test_user_install"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def module(item: pytest.Item) -> str:
        return item.nodeid.partition("::")[0].rpartition("/")[2].removesuffix(".py")

    items.sort(key=lambda it: rank.get(module(it), len(rank)))  # stable: the order within a module is kept


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The real 1000-event CMS sample as a NanoAOD-like ROOT file."""
    from casa_benchmarks.adl.sample import write_root

    out = tmp_path_factory.mktemp("sample") / "Run2012B_SingleMu-1000.root"
    write_root(str(SAMPLE_PARQUET), str(out))
    return out


@pytest.fixture(scope="session")
def sample_files(sample_root, tmp_path_factory) -> list[Path]:
    """Three distinct files of real events (copies of the sample under different names)."""
    d = tmp_path_factory.mktemp("files")
    files = []
    for name in ("a", "b", "c"):
        p = d / f"{name}.root"
        shutil.copy(sample_root, p)
        files.append(p)
    return files


@pytest.fixture
def no_leftover_processes():
    """Fails the test if it leaves child processes of this interpreter behind."""
    from analysis import descendants

    from casa_executors import procs

    before = descendants()
    yield
    deadline = time.time() + 10
    while (left := descendants() - before) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {[(p.pid, procs.cmdline(p.pid)[:120]) for p in left]}"


@pytest.fixture(scope="session")
def _reference_once(sample_files):
    from analysis import run

    import casa_executors

    return run(casa_executors.iterative(status=False), sample_files)


@pytest.fixture(scope="module")
def reference(_reference_once):
    """The iterative backend's output on ``sample_files``: what every backend must match (computed once a
    session; each module gets a copy of its own)."""
    return copy.deepcopy(_reference_once)


# one real Slurm, dask-gateway and token-checking XCache per session, shared by the facility tests (tests/facility.py)
from facility import gateway, served, slurm, slurm_gateway  # noqa: E402,F401


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory):
    """Checkpoint keys (signing.py) go under the user's cache folder: the suite's go to a folder of its own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()
