"""coffea's own executor tests, with each of our backends in place of coffea's executors.

The source distribution of the installed coffea is downloaded from PyPI once (cached in
.cache/), and its tests/test_local_executors.py, test_processor.py, test_checkpointing.py and
test_parsl.py run unmodified in a pytest subprocess per backend, through our plugin
(tests/coffea_suite/casa_coffea_plugin.py). Runs go two at a time (2 cores). A failure shows the
subprocess's summary.

What runs by default: on futures (chunks cross a process boundary: pickling, exceptions, partial
outputs) every test that runs an executor, with coffea's 144-case ``test_nanoevents_analysis`` matrix
cut to nine cases in which every pair of parameter values occurs (``MATRIX_PAIRS``); on iterative and
the remote engines a smaller slice (``REMOTE_SLICE``). Left out by default: coffea's tests of its own
parsl helpers (``test_parsl_start_stop``, ``test_timeout``: no executor of ours runs in them) and
``test_preprocessing[False-rntuple]`` (25-48 s here with our futures executor; with coffea's own
IterativeExecutor it did not finish in 300 s on this machine at load 12; the aligned RNTuple case and
the unaligned TTree and parquet cases stay).

``CASA_COFFEA_SUITE=full`` runs the whole of coffea's four files on every backend, e.g.
``CASA_COFFEA_SUITE=full .venv/bin/python -m pytest tests/test_coffea_suite.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from analysis import require_engine
from coffea_suite.sdist import FILES, coffea_source

import casa_executors
from casa_executors import procs

PLUGIN_DIR = Path(__file__).resolve().parent / "coffea_suite"
REPO = PLUGIN_DIR.parents[1]
TOKEN_VAR = "CASA_COFFEA_SUITE_RUN"  # every process of a run carries it: leftovers are found by it
TIMEOUT_S = 1500
# the remote engines: the cases of every kind of coffea test that runs an executor, on TTree and parquet
# input, one processor type / mode / compression (the full matrix runs on futures); the
# parsl test (which also starts coffea's own HTEX) on the parsl backend only
REMOTE_SLICE = (
    "(test_nanoevents_analysis and ProcessorABC-virtual and None-None and not rntuple)"
    " or test_use_result_type or test_recoverable_partial or test_issue1408"
    " or (test_checkpointing and parquet) or (test_preprocessing and False-ttree)"
)
# test_nanoevents_analysis: processor type x mode x compression x maxchunks x skipbadfiles x file type (144
# cases); these nine hold every pair of values of any two parameters (a pairwise covering array), and
# every skipbadfiles x file type combination
MATRIX_PAIRS = (
    "ProcessorABC-eager-IterativeExecutor-None-None-False-ttree",
    "Callable-virtual-IterativeExecutor-None-1000-False-rntuple",
    "ProcessorABC-eager-IterativeExecutor-0-1000-False-parquet",
    "Callable-eager-IterativeExecutor-0-None-True-ttree",
    "ProcessorABC-virtual-IterativeExecutor-0-None-True-rntuple",
    "ProcessorABC-virtual-IterativeExecutor-None-1000-True-parquet",
    "ProcessorABC-virtual-IterativeExecutor-None-1000-skipbadfiles2-ttree",
    "ProcessorABC-eager-IterativeExecutor-0-1000-skipbadfiles2-rntuple",
    "Callable-virtual-IterativeExecutor-None-None-skipbadfiles2-parquet",
)
FUTURES_SLICE = (
    "(not test_nanoevents_analysis and not test_parsl_start_stop and not test_timeout"
    " and not (test_preprocessing and False-rntuple))"
    f" or (test_nanoevents_analysis and ({' or '.join(MATRIX_PAIRS)}))"
)
SELECTION = {name: FUTURES_SLICE if name == "futures" else REMOTE_SLICE for name in casa_executors.BACKENDS}
SELECTION["parsl"] += " or test_parsl_htex_executor"


@dataclass
class SuiteRun:
    backend: str
    returncode: int
    output: str
    wall_s: float
    leftovers: list[str]
    timed_out: bool = False

    def counts(self) -> dict[str, int]:
        """pytest's final tally: passed, failed, errors, deselected, skipped..."""
        last = [line for line in self.output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", last[-1])} if last else {}

    def summary(self) -> str:
        """pytest's short summary; with errors (a collection error's traceback), its ERRORS section too."""
        lines = self.output.splitlines()
        start = next((i for i, line in enumerate(lines) if "short test summary info" in line), max(len(lines) - 60, 0))
        errors = next((i for i, line in enumerate(lines) if re.fullmatch(r"=+ ERRORS =+", line)), None)
        if errors is not None and errors < start:
            start = errors
        return "\n".join(lines[start:][-200:])


def _command(backend: str) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "casa_coffea_plugin", f"--casa-backend={backend}", "--casa-dedup",
           "-p", "no:cacheprovider", "-q", "--no-header", "-o", "addopts=", "-rfE", "-W", "ignore",
           "--durations=5", *FILES]
    if SELECTION[backend] is not None and os.environ.get("CASA_COFFEA_SUITE") != "full":
        cmd += ["-k", SELECTION[backend]]
    return cmd


def _run(backend: str, source: Path) -> SuiteRun:
    token = uuid.uuid4().hex
    env = dict(os.environ)
    env.update({
        TOKEN_VAR: token,
        "COLUMNS": "240",  # the short summary's lines are cut at the terminal's width
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),  # parsl's scripts
        "PYTHONPATH": os.pathsep.join(p for p in (str(PLUGIN_DIR), str(REPO), env.get("PYTHONPATH")) if p),
    })
    t0 = time.perf_counter()
    proc = subprocess.Popen(_command(backend), cwd=source, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        procs.terminate_tree(proc.pid)
        output, _ = proc.communicate()
        output += f"\n[killed: the run took longer than {TIMEOUT_S} s]"
    deadline = time.monotonic() + 10  # engines stopping on their own are given a few seconds
    while (left := procs.with_environ(TOKEN_VAR, token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = [f"{p.pid} {procs.cmdline(p.pid)[:120]}" for p in left]
    procs.terminate(left, grace=2.0)
    return SuiteRun(backend, proc.returncode, output, time.perf_counter() - t0, names, timed_out)


@pytest.fixture(scope="module")
def suite_runs(request) -> dict[str, Future]:
    """Starts the runs of the backends this session selected, two at a time."""
    wanted = [item.callspec.params["backend"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")]
    source = coffea_source()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="coffea-suite")
    runs = {b: pool.submit(_run, b, source) for b in dict.fromkeys(wanted) if not casa_executors.unavailable(b)}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


_lock = threading.Lock()


@pytest.mark.timeout(3 * TIMEOUT_S)  # the runs queue two at a time behind each other
@pytest.mark.parametrize("backend", casa_executors.BACKENDS)
def test_coffea_executor_suite(backend, suite_runs):
    require_engine(backend)
    run = suite_runs[backend].result()
    counts = run.counts()
    with _lock:  # the time each backend took, in the -s / CI log
        print(f"\ncoffea suite on {backend}: {counts} in {run.wall_s:.0f} s")
    assert not run.leftovers, f"processes left behind by the {backend} run: {run.leftovers}"
    assert not run.timed_out and run.returncode == 0 and counts.get("passed", 0) > 0, (
        f"coffea's executor tests on backend {backend} (exit {run.returncode}, {counts}, {run.wall_s:.0f} s):\n"
        + run.summary()
    )
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors")
