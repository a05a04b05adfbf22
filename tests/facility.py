"""One real Slurm and one real dask-gateway per test session (imported by conftest.py), and their checks.

Starting them costs about 1.5 s each; the test modules share them. After each
test that uses them, ``facility_clean`` checks that no Slurm job, no job
process and no gateway scheduler/worker is left.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _require(reason: str | None) -> None:
    if reason:
        (pytest.fail if IN_CI else pytest.skip)(reason)


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm, ``SLURM_CONF`` exported for this process and what it starts."""
    from casa_executors.standins.slurm import LocalSlurm, slurm_unavailable

    _require(slurm_unavailable())
    cluster = LocalSlurm()
    cluster.start()
    cluster.export()
    yield cluster
    cluster.stop()


def _gateway(backend: str, slurm=None):
    from casa_executors.standins.gateway import LocalGateway, gateway_unavailable

    _require(gateway_unavailable())
    gw = LocalGateway({"alice": "alice-pw", "bob": "bob-pw"}, backend=backend, slurm=slurm)
    gw.start()
    return gw


@pytest.fixture(scope="session")
def gateway():
    """dask-gateway-server with the local backend; users alice and bob."""
    gw = _gateway("local")
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def slurm_gateway(slurm):
    """dask-gateway-server whose schedulers and workers are Slurm jobs."""
    gw = _gateway("slurm", slurm)
    yield gw
    gw.stop()


def wait_until(check, timeout: float = 30, step: float = 0.2):
    """``check()`` once it is truthy, else its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(step)
    return value


def assert_no_jobs(slurm, timeout: float = 30) -> None:
    """``squeue`` empty (within ``timeout``) and no process of a job left."""
    left = wait_until(lambda: not slurm.jobs(), timeout)
    assert left, f"Slurm jobs left: {slurm.jobs()}"
    procs = wait_until(lambda: not slurm.leftovers(), 10)
    assert procs, f"job processes left: {[(p.pid, p.name()) for p in slurm.leftovers()]}"


def exposed(path: Path) -> bool:
    """Could another local user (not the owner, not in its group) read ``path``?

    Yes if it is other-readable and every directory above it is other-searchable.
    """
    st = path.stat()
    if not st.st_mode & stat.S_IROTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


def files_holding(secret: bytes, roots: Iterable[Path]) -> Iterator[Path]:
    """Every regular file below ``roots`` whose bytes contain ``secret``."""
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = Path(dirpath, name)
                try:
                    if p.is_file() and not p.is_symlink() and secret in p.read_bytes():
                        yield p
                except OSError:
                    continue


def assert_private(secret: bytes, roots: Iterable[Path]) -> list[Path]:
    """The files under ``roots`` that hold ``secret``; fails if another user could read one."""
    found = list(files_holding(secret, roots))
    readable = [(str(p), stat.filemode(p.stat().st_mode)) for p in found if exposed(p)]
    assert not readable, f"a secret at rest where other users can read it: {readable}"
    return found


class SecretWatch:
    """Looks, every ``period`` s while a run goes on, for files holding ``secret`` below ``roots()``
    (sandboxes come and go with their tasks), and remembers each with its mode and exposure."""

    def __init__(self, secret: bytes, roots, period: float = 0.2) -> None:
        import threading

        self.secret, self.roots, self.period = secret, roots, period
        self.seen: dict[str, tuple[str, bool]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            time.sleep(self.period)

    def scan(self) -> None:
        for p in files_holding(self.secret, [Path(r) for r in self.roots() if Path(r).exists()]):
            try:
                self.seen.setdefault(str(p), (stat.filemode(p.stat().st_mode), exposed(p)))
            except OSError:
                continue

    def __enter__(self) -> SecretWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def exposed(self) -> dict[str, str]:
        return {p: mode for p, (mode, open_to_others) in self.seen.items() if open_to_others}


def new_temp_entries(before: set[str]) -> list[Path]:
    """What appeared in the temporary directory since ``before`` (``set(os.listdir(tempdir))``)."""
    import tempfile

    base = Path(tempfile.gettempdir())
    return [base / n for n in os.listdir(base) if n not in before]


class Served:
    """The three sample files behind a token-checking XRootD origin and an XCache (both real)."""

    def __init__(self, urls: list[str], cache: str, token: str) -> None:
        self.urls, self.cache, self.token = urls, cache, token

    def driver_options(self) -> dict:
        return {"cache": self.cache, "token": self.token}


@pytest.fixture(scope="session")
def served(sample_files, tmp_path_factory):
    """Reads that succeed only with the bearer token: what a worker gets, it got from the executor."""
    import shutil
    import tempfile

    from xrootd_fixtures import require_xrootd

    from casa_executors.standins.issuer import LocalIssuer
    from casa_executors.standins.xrootd import XCache, XRootDOrigin

    require_xrootd()
    export = Path(tempfile.mkdtemp(prefix="casa-served-"))
    export.chmod(0o755)
    (export / "store").mkdir(mode=0o755)
    for src in sample_files:
        shutil.copy(src, export / "store" / src.name)
        (export / "store" / src.name).chmod(0o644)
    issuer = LocalIssuer()
    try:
        with XRootDOrigin(export, token_issuer=issuer) as origin, XCache(origin) as cache:
            urls = [origin.url(f"/store/{f.name}") for f in sample_files]
            yield Served(urls, cache.endpoint, issuer.mint(lifetime=3600))
    finally:
        shutil.rmtree(export, ignore_errors=True)


def same_physics(out: dict, reference: dict) -> bool:
    """``Analysis`` outputs equal bit for bit, file names aside (URLs against local paths)."""
    import numpy as np

    return (
        out["events"].value == reference["events"].value
        and np.array_equal(out["met"].values(flow=True), reference["met"].values(flow=True))
        and np.array_equal(out["jetpt"].values(flow=True), reference["jetpt"].values(flow=True))
        and np.array_equal(out["jetpt"].variances(flow=True), reference["jetpt"].variances(flow=True))
        and sorted(out["met_column"].value) == sorted(reference["met_column"].value)
    )
