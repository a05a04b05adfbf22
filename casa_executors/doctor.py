"""What can run here: every backend and facility engine, available or not, why, and how to get it.

    python -m casa_executors doctor          # a table
    python -m casa_executors doctor --json   # the same as JSON
    casa-executors doctor --require dask,xrootd   # exit status 1 unless those are available

A backend's verdict is its own ``casa_executors.unavailable(name)``, the check the executor makes
before it starts; the doctor adds what each one needs (Python modules, commands on ``PATH``), which
of those are missing, and where each comes from: a pip extra of this package, or something pip
cannot install (a system package, a site's ``module load``, a conda package, the facility's admin).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

PACKAGE = "casa_executors"


def pip_extra(extra: str) -> str:
    return f'pip install "{PACKAGE}[{extra}]"'


# Where each thing comes from, written once and shared by the checks that need it.
JAVA = ("Java 17 or newer, which pip cannot install: `module load java` (or the site's JDK module), "
        "`conda install -c conda-forge openjdk=17` in a conda environment, or the system package "
        "openjdk-17-jre-headless (admin); or point JAVA_HOME at a JDK")
WORK_QUEUE_MODULE = ("Work Queue's Python module is not on PyPI (PyPI's 'cctools' 7.0.17 of 2019 holds only a "
                     "configure script): `conda install -c conda-forge ndcctools` (module ndcctools.work_queue; "
                     "install this package with pip into that conda environment), or the system packages "
                     "python3-workqueue and coop-computing-tools (Debian/Ubuntu, admin), or cctools built from "
                     "source into your home (github.com/cooperative-computing-lab/cctools)")
WORK_QUEUE_TOOLS = ("work_queue_worker and work_queue_factory come with Work Queue: "
                    "`conda install -c conda-forge ndcctools` (then the environment's bin/ is on PATH), or the "
                    "system package coop-computing-tools (admin)")
SLURM = ("Slurm's commands (sbatch, squeue, scancel): run on the facility's login or submit node, where they are "
         "on PATH or come with `module load slurm`; pip cannot install them (system package slurm-client, admin)")
HTCONDOR = ("HTCondor's commands (condor_submit, condor_q, condor_rm): run on the facility's submit node "
            "(or `module load htcondor`); PyPI's 'htcondor' holds only Python bindings, not the commands")
TOKEN = ("a WLCG bearer token from your facility's issuer (e.g. `htgettoken`, or `oidc-token` with oidc-agent), "
         "found at $BEARER_TOKEN, $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid> or /tmp/bt_u<uid> "
         "(mode 600), or given as token= to the executor")


@dataclass(frozen=True)
class Need:
    """One thing a backend or engine needs: a Python module or a command on PATH."""

    kind: Literal["module", "command", "setting"]
    name: str
    found: str | None  # its version or path; None when missing
    how: str  # how to get it
    problem: str | None = None  # why it is missing, when more is known than its absence
    required: bool = True  # False: shown when found, never a reason nor a thing to get

    @property
    def missing(self) -> bool:
        return self.found is None


@dataclass
class Finding:
    """The doctor's verdict on one backend or facility engine."""

    name: str
    kind: Literal["backend", "facility"]
    label: str
    available: bool
    reason: str | None  # why it cannot run here (None when it can)
    needs: list[Need] = field(default_factory=list)

    @property
    def found(self) -> str:
        return ", ".join(f"{n.name} {n.found}" for n in self.needs if not n.missing)

    @property
    def how(self) -> list[str]:
        """How to get what is missing, each source once."""
        seen: list[str] = []
        for need in self.needs:
            if need.missing and need.required and need.how not in seen:
                seen.append(need.how)
        return seen

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["needs"] = [dict(dataclasses.asdict(n), missing=n.missing) for n in self.needs]
        out["how"] = self.how
        return out


# -- what is installed -----------------------------------------------------------------------------
def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def module(name: str, how: str, dist: str | None = None) -> Need:
    """A module importable without importing it (``find_spec``), with its distribution's version."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package missing, or a broken one
        spec = None
    if spec is None:
        return Need("module", name, None, how)
    return Need("module", name, _dist_version(dist or name) or "installed", how)


def command(name: str, how: str) -> Need:
    return Need("command", name, shutil.which(name), how)


def script(name: str, how: str) -> Need:
    """A command on PATH or beside this Python (an environment's bin/ that is not activated)."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return Need("command", name, shutil.which(name) or (beside if os.path.isfile(beside) else None), how)


def work_queue_module() -> Need:
    """Work Queue's module as the backend finds it (conda's ndcctools, or Debian's loaded alone)."""
    from casa_executors.backends.workqueue.discovery import import_work_queue

    try:
        wq = import_work_queue()
    except ImportError as exc:
        return Need("module", "work_queue", None, WORK_QUEUE_MODULE, str(exc))
    return Need("module", "work_queue", getattr(wq, "__file__", None) or "installed", WORK_QUEUE_MODULE)


# -- the checks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    kind: Literal["backend", "facility"]
    label: str
    needs: Callable[[], list[Need]]  # a facility engine is available when every required one is found

    def run(self) -> Finding:
        needs = self.needs()
        if self.kind == "backend":  # the backend's own verdict, as the executor checks before it starts
            import casa_executors

            why = casa_executors.unavailable(self.name)
        else:
            why = _missing(needs)
        return Finding(self.name, self.kind, self.label, why is None, why, needs)


def _missing(needs: Sequence[Need]) -> str | None:
    gone = [f"{n.kind} {n.name}" + (f" ({n.problem})" if n.problem else "") for n in needs
            if n.missing and n.required]
    return "missing: " + ", ".join(gone) if gone else None


def _htcondor() -> list[Need]:
    """Either engine will do (dask-jobqueue's HTCondorCluster, parsl's HTCondorProvider), and every command."""
    engines = [module("dask_jobqueue", pip_extra("dask"), "dask-jobqueue"), module("parsl", pip_extra("parsl"))]
    present = [n for n in engines if not n.missing]
    if not present:
        present = [Need("module", "dask_jobqueue or parsl", None, f"{pip_extra('dask')} or {pip_extra('parsl')}")]
    return [*present, *(command(c, HTCONDOR) for c in ("condor_submit", "condor_q", "condor_rm"))]


def _slurm_commands() -> list[Need]:
    return [command(c, SLURM) for c in ("sbatch", "squeue", "scancel")]


def _core() -> list[Need]:
    how = f"pip install {PACKAGE} (core dependencies)"
    return [module("coffea", how), module("uproot", how), module("awkward", how)]


def _gateway_address() -> Need:
    """The facility's gateway address from dask's configuration, as dask_gateway.Gateway() reads it."""
    how = ("the facility's gateway address: dask(gateway=\"https://...\"), or gateway.address in dask's "
           "configuration (DASK_GATEWAY__ADDRESS)")
    address = os.environ.get("DASK_GATEWAY__ADDRESS")
    if address is None and importlib.util.find_spec("dask") is not None:
        import dask.config

        address = dask.config.get("gateway.address", None)
    return Need("setting", "gateway.address", address, how, required=False)  # it can be given in the call


def _token() -> Need:
    from casa_executors.xcache.tokens import TokenError, discover_token

    try:
        token = discover_token()
    except (TokenError, OSError) as exc:  # configured but unusable: the message names the source only
        return Need("setting", "bearer token", None, TOKEN, str(exc))
    return Need("setting", "bearer token", f"from {token.source}" if token else None, TOKEN,
                None if token else "none found; needed only where storage asks for one")


CHECKS: list[Check] = [
    Check("iterative", "backend", "iterative: this thread", _core),
    Check("futures", "backend", "futures: local processes", lambda: [module("loky", "a core dependency")]),
    Check("dask", "backend", "Dask distributed", lambda: [module("distributed", pip_extra("dask"))]),
    Check("parsl", "backend", "Parsl", lambda: [
        module("parsl", pip_extra("parsl")),
        script("process_worker_pool.py", pip_extra("parsl")),  # lands in the environment's bin/
    ]),
    Check("spark", "backend", "Spark", lambda: [module("pyspark", pip_extra("spark")), command("java", JAVA)]),
    Check("workqueue", "backend", "Work Queue", lambda: [
        work_queue_module(), command("work_queue_worker", WORK_QUEUE_TOOLS)]),
    Check("slurm-dask", "facility", "Slurm: dask(cluster=SLURMCluster(...)) via dask-jobqueue", lambda: [
        module("dask_jobqueue", pip_extra("dask"), "dask-jobqueue"), *_slurm_commands()]),
    Check("slurm-parsl", "facility", "Slurm: parsl(provider=SlurmProvider(...))", lambda: [
        module("parsl", pip_extra("parsl")), *_slurm_commands()]),
    Check("slurm-workqueue", "facility", 'Slurm: workqueue(submit="slurm")', lambda: [
        work_queue_module(), command("work_queue_worker", WORK_QUEUE_TOOLS),
        command("work_queue_factory", WORK_QUEUE_TOOLS), *_slurm_commands()]),
    Check("dask-gateway", "facility", "dask-gateway: dask(gateway=...)", lambda: [
        module("dask_gateway", pip_extra("gateway"), "dask-gateway"), _gateway_address()]),
    Check("htcondor", "facility", "HTCondor: dask-jobqueue HTCondorCluster or parsl HTCondorProvider", _htcondor),
    Check("xrootd", "facility", "XCache / XRootD client (root:// reads)", lambda: [
        module("XRootD", pip_extra("xcache") + " (the wheel bundles the XRootD client libraries)", "xrootd"),
        module("fsspec_xrootd", pip_extra("xcache"), "fsspec-xrootd")]),
    Check("tokens", "facility", "WLCG bearer token for XCache/XRootD", lambda: [_token()]),
]


def diagnose() -> list[Finding]:
    """Every check; one that fails to run is reported as not available, with its error."""
    findings = []
    for check in CHECKS:
        try:
            findings.append(check.run())
        except Exception as exc:  # a broken install must not hide the other checks
            log.debug("doctor check %s failed", check.name, exc_info=True)
            findings.append(Finding(check.name, check.kind, check.label, False, f"the check itself failed: {exc!r}"))
    return findings


def environment() -> dict[str, Any]:
    return {
        "casa_executors": _dist_version(PACKAGE) or "not installed (run from a source tree)",
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "user": _user(),
    }


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


# -- output ----------------------------------------------------------------------------------------
def as_json(findings: list[Finding]) -> str:
    return json.dumps({"environment": environment(), "checks": [f.to_dict() for f in findings]}, indent=2)


def render(findings: list[Finding], file: Any = None) -> None:
    """A table per kind (rich), then how to get each thing that is missing."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file, soft_wrap=False, highlight=False)
    env = environment()
    console.print(f"casa_executors {env['casa_executors']} · Python {env['python']} ({escape(env['executable'])}) "
                  f"· user {escape(env['user'])}")
    for kind, title in (("backend", "Backends"), ("facility", "Facility engines")):
        table = Table(title=title, title_justify="left", expand=False)
        table.add_column("name", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("what it is · found / why not", overflow="fold")
        for f in (f for f in findings if f.kind == kind):
            status = "[green]available[/]" if f.available else "[red]not available[/]"
            table.add_row(f.name, status, f"[dim]{escape(f.label)}[/]\n"
                          + escape(f.found if f.available else (f.reason or "")))
        console.print(table)
    missing = [f for f in findings if not f.available]
    if missing:
        sources: dict[str, list[str]] = {}  # each way to get something once, with every check it serves
        for f in missing:
            for how in f.how:
                sources.setdefault(how, []).append(f.name)
        hows = Table(title="How to get what is missing", title_justify="left", box=None, show_header=False,
                     pad_edge=False)
        hows.add_column("for", no_wrap=True, style="bold")
        hows.add_column("how", overflow="fold")
        for how, names in sources.items():
            hows.add_row("\n".join(names), escape(how))
        console.print(hows)
    console.print(f"{len(findings) - len(missing)} of {len(findings)} available"
                  + (f"; not available: {', '.join(f.name for f in missing)}" if missing else ""))


def main(argv: Sequence[str] | None = None, prog: str = "casa-executors doctor") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--require", default="", metavar="NAMES",
                        help="comma-separated names (e.g. dask,xrootd): exit status 1 unless all are available")
    args = parser.parse_args(argv)
    findings = diagnose()
    names = {f.name for f in findings}
    required = [n for n in args.require.split(",") if n]
    unknown = [n for n in required if n not in names]
    if unknown:
        parser.error(f"--require: unknown name {unknown[0]!r}; choose from {', '.join(sorted(names))}")
    if args.json:
        print(as_json(findings))
    else:
        render(findings)
    unmet = [f.name for f in findings if f.name in required and not f.available]
    if unmet:
        print(f"required but not available: {', '.join(unmet)}", file=sys.stderr)
        return 1
    return 0
