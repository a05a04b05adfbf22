"""Install as a user: the wheel built from this repository, in a fresh venv of a throwaway non-root user.

As an analyst without root would: ``python3.11 -m venv``, ``pip install "<wheel>[dask,xcache]"`` from the
package registries this machine's pip configuration names, then, from the user's home with no PYTHONPATH,
import the package, run the README's quick start on iterative, futures and dask (a small file the wheel's
own generator writes), and ask ``casa-executors doctor`` what is missing.

The user runs in a private mount namespace where the Debian packages a facility user would not have
(XRootD, Work Queue, Java, Slurm, munge) are hidden: their programs, libraries and Python modules are
covered by /dev/null, /usr/lib/jvm by an empty tmpfs, and so is this repository, so only the wheel can be
imported. Where a mount namespace cannot be made, the user gets a PATH of the venv's bin/ only (printed).
Needs root (useradd) and the network to the package registries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

import casa_executors

REPO = Path(__file__).resolve().parents[1]
# a system interpreter the new user may run (root's pyenv shims are not theirs)
PYTHON = next((p for p in ("/usr/bin/python3.11", "/usr/local/bin/python3.11") if os.path.exists(p)), None)
# Debian packages an analyst on a facility does not have; hidden from the user (see the module docstring)
HIDDEN_PACKAGES = re.compile(r"^(xrootd|libxrd|coop-computing-tools|python3-workqueue|slurm|munge|libmunge|openjdk)")
EVENTS = 2000


def _sbin(name: str) -> str | None:
    """A root tool, also when /usr/sbin is not on this process's PATH."""
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


RUNUSER, USERADD, USERDEL = _sbin("runuser"), _sbin("useradd"), _sbin("userdel")
# the first test's set-up builds the wheel and pip-installs coffea & co. from the registries: minutes on a busy machine
pytestmark = pytest.mark.timeout(1500)


QUICKSTART = '''\
"""The README's quick start on iterative, futures and dask, on a small file the wheel's generator writes."""

import json
import sys
import time
import warnings

import hist
from coffea import processor
from coffea.nanoevents import NanoAODSchema

import casa_executors
from casa_benchmarks.adl.generate import generate

warnings.filterwarnings("ignore", message="Missing cross-reference index")
warnings.filterwarnings("ignore", message="Branch .* already exists")


class MyProcessor(processor.ProcessorABC):
    def process(self, events):
        met = hist.Hist.new.Reg(50, 0, 200, name="met", label="MET [GeV]").Int64()
        met.fill(met=events.MET.pt)
        return {"met": met, "events": len(events)}

    def postprocess(self, accumulator):
        return accumulator


def main(data_dir, events):
    fileset = {"synthetic": generate(data_dir, events=events, files=1).files}
    runs = {}
    for name, ex in (("iterative", casa_executors.iterative(status=False)),
                     ("futures", casa_executors.futures(workers=2, status=False)),
                     ("dask", casa_executors.dask(workers=2, status=False))):
        t0 = time.perf_counter()
        out = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=events // 4)(
            fileset, MyProcessor(), treename="Events")
        summary = ex.report.summary()
        runs[name] = {"events": out["events"], "met": out["met"].values().tolist(), "backend": summary["backend"],
                      "processed": summary["processed"], "failed": summary["failed"], "report": str(ex.report),
                      "wall_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps({"casa_executors": casa_executors.__file__, "sys_path": sys.path, "runs": runs}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
'''

XROOTD_CLIENT = '''\
import json

from casa_executors.xcache import apply_client_env

apply_client_env()  # one connect attempt, timeouts checked every second: the dead port answers at once
import fsspec_xrootd
from XRootD import client

# a port nobody listens on: the client libraries load and answer with an error, no server needed
status, _ = client.FileSystem("root://127.0.0.1:1").stat("/", timeout=5)
libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libXrd" in line})
print(json.dumps({"ok": status.ok, "message": status.message, "libs": libs}))
'''


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once per session from the repository's files (tracked and new, not ignored), in a
    copy, so that a stale build/ in the tree cannot slip old files into it."""
    src = tmp_path_factory.mktemp("wheel-src")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)], check=True)
    print(f"wheel built in {time.perf_counter() - t0:.1f} s")
    (built,) = out.glob("casa_executors-*.whl")
    return built


def pip_environment() -> dict[str, str]:
    """This machine's pip configuration (root's, which the new user would not read) as PIP_* variables."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    env = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in ("global", "install", ":env:") and name:
            env["PIP_" + name.upper().replace("-", "_")] = value.strip().strip("'\"")
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return env


def hidden_files() -> list[str]:
    """Programs, libraries and Python modules of the Debian packages a facility user would not have."""
    try:
        names = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return []
    packages = [n.split()[0].split(":")[0] for n in names if n.endswith(" installed")]
    packages = [p for p in packages if HIDDEN_PACKAGES.match(p)]
    if not packages:
        return []
    listed = subprocess.run(["dpkg-query", "-L", *packages], capture_output=True, text=True).stdout.split("\n")
    return sorted({f for f in listed if f.startswith(("/usr/bin/", "/usr/sbin/", "/usr/lib/", "/bin/", "/sbin/"))
                   and os.path.isfile(f) and not os.path.islink(f)})


@dataclass
class User:
    name: str
    uid: int
    home: Path
    env: dict[str, str]
    hide: list[str] = field(default_factory=list)  # files covered by /dev/null
    hide_dirs: list[str] = field(default_factory=list)  # directories covered by an empty tmpfs
    isolated: bool = False  # a private mount namespace holds the hiding
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *cmd: str, step: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        """``cmd`` as this user, from its home, in its environment (and mount namespace when isolated)."""
        as_user = [RUNUSER, "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in self.env.items()), *cmd]
        if self.isolated:
            script = "\n".join([
                "set -e",
                'while IFS= read -r f; do mount --bind /dev/null "$f"; done < "$HIDE"',
                'for d in $HIDE_DIRS; do mount -t tmpfs -o ro,size=1k casa-hidden "$d"; done',
                'cd "$USER_HOME"',
                'exec "$@"',
            ])
            as_user = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *as_user]
        t0 = time.perf_counter()
        proc = subprocess.run(as_user, capture_output=True, text=True, timeout=timeout, cwd=self.home,
                              env={"PATH": os.environ["PATH"], "HIDE": str(self.home.parent / "hidden.txt"),
                                   "HIDE_DIRS": " ".join(self.hide_dirs), "USER_HOME": str(self.home)})
        self.timings[step] = round(time.perf_counter() - t0, 1)
        if check and proc.returncode:
            raise AssertionError(f"{step} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc


def _can_isolate() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def user(wheel) -> Iterator[User]:
    """A throwaway user with a home in a fresh folder; removed, with any process left of it, afterwards."""
    if os.geteuid() != 0 or not (RUNUSER and USERADD and USERDEL):
        pytest.skip("needs root, useradd and runuser to create a throwaway user")
    if PYTHON is None:
        pytest.skip("needs a system python3.11 (/usr/bin or /usr/local/bin) for the user's venv")
    top = Path(tempfile.mkdtemp(prefix="casa-user-install-"))
    # the user's home in memory when we may mount: its ~1 GB venv then goes with an unmount, not a slow rm
    in_memory = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,mode=755", "casa-user-install", str(top)],
                               capture_output=True).returncode == 0
    top.chmod(0o755)
    name = f"casa{os.getpid() % 100000}"
    try:
        subprocess.run([USERADD, "--create-home", "--home-dir", str(top / "home"), "--shell", "/bin/sh",
                        "--user-group", name], check=True)
        shutil.copy2(wheel, top / wheel.name)
        (top / wheel.name).chmod(0o644)
        home = top / "home"
        env = {"HOME": str(home), "USER": name, "LOGNAME": name, "LANG": "C.UTF-8", "TMPDIR": "/tmp",
               **pip_environment(), "PIP_NO_CACHE_DIR": "1"}  # a fresh user has no cache to reuse: write none
        u = User(name, int(subprocess.run(["id", "-u", name], capture_output=True, text=True).stdout), home, env)
        # this repository and the sources the test runner imports: only the wheel may be found
        sources = {REPO, Path(casa_executors.__file__).resolve().parents[1]}
        if (Path(sys.prefix).parent / "pyproject.toml").exists():
            sources.add(Path(sys.prefix).parent)
        if _can_isolate():
            u.isolated = True
            u.hide = hidden_files()
            u.hide_dirs = sorted(str(d) for d in {*sources, Path("/usr/lib/jvm")} if d.is_dir())
            u.env["PATH"] = f"{home}/venv/bin:/usr/local/bin:/usr/bin:/bin"
        else:
            print("no private mount namespace here: the user's PATH is the venv's bin/ only, system files stay")
            u.env["PATH"] = f"{home}/venv/bin"
        (top / "hidden.txt").write_text("".join(f + "\n" for f in u.hide))
        yield u
    finally:
        uid = _uid(name)
        mine = [p for p in psutil.process_iter(["uids", "name"]) if p.info["uids"] and p.info["uids"].real == uid]
        if mine:
            print(f"processes of {name} left after its runs: {[(p.pid, p.info['name']) for p in mine]}")
        for p in mine:  # anything the user's runs left behind, by PID
            p.kill()
        psutil.wait_procs(mine, timeout=10)
        t0 = time.perf_counter()
        subprocess.run([USERDEL, name] if in_memory else [USERDEL, "--remove", name], capture_output=True)
        if in_memory:
            subprocess.run(["umount", str(top)], check=True)
        shutil.rmtree(top, ignore_errors=True)
        print(f"user {name} and its venv removed in {time.perf_counter() - t0:.1f} s")


def _uid(name: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return -1


@pytest.fixture(scope="module")
def installed(user, wheel) -> User:
    """``python3.11 -m venv`` and ``pip install "<wheel>[dask,xcache]"`` as the user."""
    user.run(PYTHON, "-m", "venv", str(user.home / "venv"), step="venv")
    whl = user.home.parent / wheel.name
    user.run(f"{user.home}/venv/bin/pip", "install", "--no-input", "--progress-bar", "off", f"{whl}[dask,xcache]",
             step="pip install", timeout=900)
    return user


def test_user_cannot_see_the_hidden_system(installed):
    """What the user's runs see: none of the hidden Debian packages, nor this repository."""
    u = installed
    probe = ("import json, os, shutil, sys; print(json.dumps({'which': {c: shutil.which(c) for c in "
             "('xrdcp', 'xrootd', 'java', 'sbatch', 'work_queue_worker')}, 'repo': os.path.exists(sys.argv[1]) "
             "and os.listdir(sys.argv[1])}))")
    seen = json.loads(u.run(f"{u.home}/venv/bin/python", "-c", probe, str(REPO), step="probe").stdout)
    assert seen["which"] == dict.fromkeys(seen["which"]), seen  # no XRootD, Java, Slurm, Work Queue programs
    if u.isolated:
        assert not seen["repo"], f"the user sees this repository: {seen['repo'][:5]}"
        print(f"hidden from the user: {len(u.hide)} files of {_packages_note()}, and {', '.join(u.hide_dirs)}")


def test_import_and_quick_start(installed):
    """The README's quick start, from the user's home with no PYTHONPATH: the same histogram on each backend."""
    u = installed
    (u.home / "quickstart.py").write_text(QUICKSTART)
    proc = u.run(f"{u.home}/venv/bin/python", "quickstart.py", str(u.home / "data"), str(EVENTS), step="quick start")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    site = f"{u.home}/venv/lib/python3.11/site-packages/"
    assert result["casa_executors"].startswith(site), result["casa_executors"]
    assert not [p for p in result["sys_path"] if p.startswith(str(REPO))], result["sys_path"]
    runs = result["runs"]
    assert set(runs) == {"iterative", "futures", "dask"}
    for name, run in runs.items():
        assert run["events"] == EVENTS, (name, run)
        assert sum(run["met"]) > 0.9 * EVENTS, (name, run)  # MET below 200 GeV for nearly all events
        assert run["met"] == runs["iterative"]["met"], name  # bit-identical to iterative
        assert (run["backend"], run["processed"], run["failed"]) == (name, 4, 0), run
    print({name: run["wall_s"] for name, run in runs.items()})


def test_xrootd_client_from_the_wheel(installed):
    """The xcache extra's XRootD client works with the Debian XRootD libraries hidden: the wheel's own."""
    u = installed
    result = json.loads(u.run(f"{u.home}/venv/bin/python", "-c", XROOTD_CLIENT, step="xrootd client").stdout)
    assert not result["ok"], result  # nothing listens on port 1
    assert result["libs"] and all(lib.startswith(str(u.home / "venv")) for lib in result["libs"]), result["libs"]


def test_doctor(installed):
    """The doctor, as ``casa-executors doctor --json`` and ``python -m casa_executors doctor``: every backend
    and facility engine, what is missing in a [dask,xcache] venv and how to get it."""
    u = installed
    report = json.loads(u.run(f"{u.home}/venv/bin/casa-executors", "doctor", "--json", step="doctor --json").stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"iterative", "futures", "dask", "parsl", "spark", "workqueue", "slurm-dask",
                           "slurm-parsl", "slurm-workqueue", "dask-gateway", "htcondor", "xrootd", "tokens"}
    assert report["environment"]["user"] == u.name
    for name in ("iterative", "futures", "dask", "xrootd"):
        assert checks[name]["available"], checks[name]
    for name in ("parsl", "spark", "workqueue", "slurm-dask", "slurm-parsl", "slurm-workqueue", "dask-gateway",
                 "htcondor", "tokens"):
        assert not checks[name]["available"] and checks[name]["reason"] and checks[name]["how"], checks[name]

    def how(name: str) -> str:
        return " ".join(checks[name]["how"])

    assert 'casa_executors[spark]' in how("spark")
    assert 'casa_executors[parsl]' in how("parsl") and "casa_executors[parsl]" in how("slurm-parsl")
    assert 'casa_executors[gateway]' in how("dask-gateway")
    assert "ndcctools" in how("workqueue") and "conda" in how("workqueue")
    assert "sbatch" in checks["slurm-dask"]["reason"] and "module load slurm" in how("slurm-dask")
    assert "dask_jobqueue" not in checks["slurm-dask"]["reason"]  # the dask extra brought dask-jobqueue
    if u.isolated:  # Java and Work Queue's module are hidden too
        assert "java" in checks["spark"]["reason"] or "pyspark" in checks["spark"]["reason"]
        assert "Java 17" in how("spark")
        assert "work_queue" in checks["workqueue"]["reason"].lower()

    table = u.run(f"{u.home}/venv/bin/python", "-m", "casa_executors", "doctor", step="doctor").stdout
    print(table)
    for name in checks:
        assert name in table, name
    assert "not available" in table and "How to get what is missing" in table
    required = u.run(f"{u.home}/venv/bin/casa-executors", "doctor", "--require", "dask,spark", step="doctor --require",
                     check=False)
    assert required.returncode == 1 and "spark" in required.stderr, required.stderr
    print(f"timings (s): {u.timings}")


def _packages_note() -> str:
    return "the Debian packages matching " + HIDDEN_PACKAGES.pattern


# -- the doctor in this environment (no user, no install) -------------------------------------------
EXTRAS_PROVIDE = {  # what each backend or engine imports, by the extra that must install it
    "dask": ["distributed", "dask-jobqueue"],
    "gateway": ["dask-gateway"],
    "parsl": ["parsl"],
    "spark": ["pyspark"],
    "xcache": ["xrootd", "fsspec-xrootd"],
}


def _extras() -> dict[str, list[str]]:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {k: [re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in v] for k, v in extras.items()}


@pytest.fixture
def doctor_here(monkeypatch, capsys):
    """The doctor run in this process, as ``casa-executors doctor ARGS`` with ``env`` set: (status, out, err)."""
    from casa_executors import doctor

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        with monkeypatch.context() as m:
            for key in ("BEARER_TOKEN", "BEARER_TOKEN_FILE", "XDG_RUNTIME_DIR"):
                m.delenv(key, raising=False)
            for key, value in (env or {}).items():
                m.setenv(key, value)
            try:
                status = doctor.main(list(args))
            except SystemExit as exc:  # argparse refusing the arguments
                status = exc.code
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def test_extras_install_what_the_doctor_names():
    """Every extra the doctor sends users to exists and installs the packages its backend imports."""
    from casa_executors import doctor

    extras = _extras()
    for extra, dists in EXTRAS_PROVIDE.items():
        assert set(dists) <= set(extras[extra]), (extra, extras[extra])
    assert "casa_executors" in extras["gateway"]  # the gateway extra brings [dask] with it
    named = set()
    for check in doctor.CHECKS:
        for need in check.needs():
            named |= set(re.findall(r"casa_executors\[(\w+)\]", need.how))
    assert {"dask", "parsl", "spark", "gateway", "xcache"} <= named <= set(extras), named


def test_doctor_verdicts_are_the_backends_own(doctor_here):
    """Each backend's line is casa_executors.unavailable(name); with no Slurm or HTCondor commands on PATH
    the facility engines say so, and how to get them."""
    report = json.loads(doctor_here("--json", env={"PATH": os.path.dirname(sys.executable)})[1])
    checks = {c["name"]: c for c in report["checks"]}
    assert set(casa_executors.BACKENDS) <= set(checks)
    assert checks["iterative"]["available"] and checks["futures"]["available"]
    for name in ("slurm-dask", "slurm-parsl", "slurm-workqueue"):
        assert not checks[name]["available"] and "sbatch" in checks[name]["reason"] + str(checks[name]["needs"])
        assert any("module load slurm" in h for h in checks[name]["how"]), checks[name]
    assert not checks["htcondor"]["available"] and "condor_submit" in checks["htcondor"]["reason"]
    here = json.loads(doctor_here("--json")[1])
    for c in here["checks"]:
        if c["kind"] == "backend":
            assert c["available"] == (casa_executors.unavailable(c["name"]) is None), c


def test_doctor_tokens(tmp_path, doctor_here):
    """A token file others may read is refused with the reason; a private one is found; neither is printed."""
    secret = "eyJhbGciOiJFUzI1NiJ9.doctor-test-token.c2lnbmF0dXJl"
    path = tmp_path / "token"
    path.write_text(secret)
    path.chmod(0o644)
    refused = doctor_here("--json", env={"BEARER_TOKEN_FILE": str(path)})
    tokens = {c["name"]: c for c in json.loads(refused[1])["checks"]}["tokens"]
    assert not tokens["available"] and "readable by group/others" in tokens["reason"], tokens
    path.chmod(0o600)
    found = doctor_here("--json", env={"BEARER_TOKEN_FILE": str(path)})
    tokens = {c["name"]: c for c in json.loads(found[1])["checks"]}["tokens"]
    assert tokens["available"] and tokens["needs"][0]["found"], tokens
    table = doctor_here(env={"BEARER_TOKEN_FILE": str(path)})
    assert "tokens" in table[1]
    for out in (*refused[1:], *found[1:], *table[1:]):
        assert "doctor-test-token" not in out


def test_doctor_command_line(doctor_here):
    """Unknown names for --require and unknown commands are refused with the choices."""
    status, _, err = doctor_here("--require", "dask,sparc")
    assert status == 2 and "sparc" in err and "spark" in err
    status, out, _ = doctor_here("--require", "iterative,futures")
    assert status == 0 and "Backends" in out and "Facility engines" in out
    usage = subprocess.run([sys.executable, "-m", "casa_executors", "doctr"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert usage.returncode == 2 and "doctor" in usage.stderr
