"""coffea's own tests: the source distribution of the installed coffea, from PyPI, cached under .cache/."""

from __future__ import annotations

import fcntl
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "coffea-sdist"  # git-ignored
FILES = ("tests/test_local_executors.py", "tests/test_processor.py", "tests/test_checkpointing.py",
         "tests/test_parsl.py")


def coffea_source(cache: Path = CACHE) -> Path:
    """The unpacked sdist of the installed coffea (downloaded once; ~30 MB, about 40 s). Processes that ask
    at once (pytest-xdist workers) take turns: the first unpacks, the others find it there."""
    version = importlib.metadata.version("coffea")
    root = cache / f"coffea-{version}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _unpacked(cache, version, root)


def _unpacked(cache: Path, version: str, root: Path) -> Path:
    if all((root / f).is_file() for f in FILES):
        return root
    tarball = cache / f"coffea-{version}.tar.gz"
    if not tarball.is_file():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
             f"coffea=={version}", "-d", str(cache)],
            capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0 or not tarball.is_file():
            raise RuntimeError(f"pip could not download the coffea {version} source distribution:\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # unpacked beside, then renamed: never half there
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(root, ignore_errors=True)
        (Path(tmp) / root.name).rename(root)
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise RuntimeError(f"the coffea {version} source distribution has no {', '.join(missing)}")
    return root
