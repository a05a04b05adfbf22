"""Where the benchmark's input comes from: a given directory or URLs, or a
generated default dataset cached under ``~/.cache/casa_executors/adl``; and
how it is served: directly, or through a local XRootD origin + XCache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from casa_benchmarks.adl.generate import generate

# bump when the generator's output changes, so cached datasets are remade
GENERATOR_VERSION = 1
STORE_SUBDIR = "store/adl"


def cache_root() -> Path:
    """``$CASA_ADL_DATA``, else ``~/.cache/casa_executors/adl``; as root with a
    private home (xrootd, which runs as user xrootd, could not read it there)
    ``/var/tmp/casa_executors/adl``."""
    if os.environ.get("CASA_ADL_DATA"):
        return Path(os.environ["CASA_ADL_DATA"])
    home = Path.home()
    if os.geteuid() == 0 and not home.stat().st_mode & stat.S_IXOTH:
        return Path("/var/tmp/casa_executors/adl")
    base = os.environ.get("XDG_CACHE_HOME") or str(home / ".cache")
    return Path(base) / "casa_executors" / "adl"


def default_dataset(events: int, files: int, seed: int, log: bool = True) -> list[str]:
    """Generate (once) and return the default dataset's local files."""
    key = f"n{events}-f{files}-s{seed}-lz4-v{GENERATOR_VERSION}"
    root = cache_root() / key
    store = root / STORE_SUBDIR
    if not store.is_dir():
        if log:
            print(f"generating the default dataset ({events} events, {files} files) in {root}", file=sys.stderr)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root.parent))
        try:
            generate(tmp / STORE_SUBDIR, events, files, seed)
            tmp.chmod(0o755)
            try:
                tmp.rename(root)  # atomic: a concurrent run may have won the race
            except OSError:
                if not store.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(str(p) for p in store.glob("*.root"))


def resolve(data: str) -> list[str]:
    """``data`` is a directory (its ``*.root`` files, recursively), a file, or
    comma-separated files / URLs."""
    parts = [p for p in data.split(",") if p]
    out: list[str] = []
    for part in parts:
        path = Path(part)
        if "://" in part:
            out.append(part)
        elif path.is_dir():
            found = sorted(str(p) for p in path.rglob("*.root"))
            if not found:
                raise FileNotFoundError(f"no .root files under {part}")
            out.extend(found)
        elif path.is_file():
            out.append(str(path.resolve()))
        else:
            raise FileNotFoundError(part)
    return out


@dataclass
class Served:
    """Files as each reader should name them."""

    files: list[str]  # for casa_executors (origin URLs when served via XCache)
    peer_files: list[str]  # for coffea's executors (cache URLs or the same)
    rdf_files: list[str]  # for RDataFrame
    local_files: list[str] | None = None  # the same data on local disk, if any
    cache: str | None = None  # endpoint given to casa_executors.create
    mode: str = "direct"
    notes: list[str] = field(default_factory=list)


def _export_root(files: list[str]) -> Path | None:
    """The directory holding ``store/`` for local files below one."""
    roots = set()
    for f in files:
        p = Path(f).resolve()
        parts = p.parts
        if "store" not in parts[:-1]:
            return None
        i = len(parts) - 1 - parts[::-1].index("store")
        roots.add(Path(*parts[:i]))
    return roots.pop() if len(roots) == 1 else None


@contextlib.contextmanager
def serve(files: list[str], cache: str, fill: bool = True) -> Iterator[Served]:
    """``cache``: "none", "auto" (local origin + XCache when possible) or an
    XCache endpoint URL such as ``root://127.0.0.1:1094``. With ``fill``, the local XCache
    of "auto" reads every file once before anything is timed (``fill_cache``)."""
    local = all("://" not in f for f in files)
    if cache == "none":
        yield Served(files, files, files)
        return
    if cache != "auto":
        endpoint = cache.rstrip("/")
        if local:
            raise ValueError("--cache URL needs the data as root:// URLs of the cache's origin")
        peer = [f"{endpoint}/{_path_of(f)}" for f in files]
        yield Served(files, peer, peer, cache=endpoint, mode="xcache")
        return
    export = _export_root(files) if local else None
    if export is None:
        note = "--cache auto: data not under a local store/ directory; read directly"
        yield Served(files, files, files, notes=[note])
        return
    try:
        from casa_executors.standins.xrootd import ServerError, XCache, XRootDOrigin, xrootd_available
    except ImportError as exc:
        note = f"--cache auto: no casa_executors.standins.xrootd ({exc}); read directly"
        yield Served(files, files, files, notes=[note])
        return
    if not xrootd_available():
        yield Served(files, files, files, notes=["--cache auto: xrootd is not installed; read directly"])
        return
    paths = ["/" + str(Path(f).resolve().relative_to(export)) for f in files]
    stack = contextlib.ExitStack()
    try:
        origin = stack.enter_context(XRootDOrigin(export))
        xcache = stack.enter_context(XCache(origin, blocksize="128k"))  # 1m blocks over-fetch small baskets
    except ServerError as exc:
        stack.close()
        note = f"--cache auto: XRootD servers did not start ({str(exc).splitlines()[0]}); read directly"
        yield Served(files, files, files, notes=[note])
        return
    with stack:
        notes = [f"served by origin {origin.endpoint} through XCache {xcache.endpoint}"]
        if fill:
            notes.append(fill_cache([xcache.url(p) for p in paths], files))
        yield Served(
            [origin.url(p) for p in paths],
            [xcache.url(p) for p in paths],
            [xcache.url(p) for p in paths],
            cache=xcache.endpoint,
            local_files=files,
            mode="xcache",
            notes=notes,
        )


def fill_cache(urls: list[str], local: list[str]) -> str:
    """Read every file once through the cache (``xrdcp`` to /dev/null), so that no backend's timed
    runs pay for the cache's first fill from the origin: whichever ran first did, and its table
    compared a cold cache with warm ones (``casa_benchmarks.xcache_slow_origin`` measures cold
    against warm). Returns a note for the table."""
    t0 = time.perf_counter()
    for url in urls:
        subprocess.run(["xrdcp", "--nopbar", "--force", url, "/dev/null"], check=True, capture_output=True,
                       timeout=600)
    size = sum(os.path.getsize(f) for f in local)
    return f"XCache filled before timing: {size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s"


def _path_of(url: str) -> str:
    """``/store/x.root`` of ``root://host:port//store/x.root``."""
    rest = url.split("://", 1)[1]
    return "/" + rest.split("/", 1)[1].lstrip("/")
