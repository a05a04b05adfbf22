"""Helpers for the test_xcache_* modules: data, readers, skip rules (no mocks)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import awkward as ak
import numpy as np
import pytest

from casa_executors.xcache.client_env import apply_client_env

apply_client_env()  # before the first XRootD use in this process

import uproot  # noqa: E402
from fsspec_xrootd import XRootDFileSystem  # noqa: E402

from casa_executors.source import ChunkIO, MeteredSource, metering  # noqa: E402
from casa_executors.standins.xrootd import xrootd_available  # noqa: E402
from casa_executors.xcache.router import CacheRouter  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
FILE = "/store/f.root"
N_ENTRIES = 10_000


def require_xrootd() -> None:
    """Skip without xrootd, except in CI where that is a failure."""
    if xrootd_available():
        return
    msg = (
        "xrootd not installed (apt-get install xrootd-server xrootd-server-plugins "
        "xrootd-client xrootd-scitokens-plugins)"
    )
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def write_events(path: Path, n: int = N_ENTRIES, seed: int = 1) -> None:
    """A ROOT file with flat and jagged branches, ~2.4 MB (3 cache blocks of 1 MB)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(30, n)
    with uproot.recreate(path) as f:
        f["Events"] = {
            "x": rng.normal(size=n),
            "run": np.arange(n, dtype=np.int32),
            "pt": ak.unflatten(rng.exponential(20.0, int(counts.sum())), counts),
        }
    path.chmod(0o644)


@contextmanager
def export_dir(files: Mapping[str, Path] | None = None) -> Iterator[Path]:
    """A directory the xrootd user can read, for ``XRootDOrigin(DIR)``: ``files`` (name -> a file to
    copy) as ``DIR/store/<name>``, or by default a synthetic ``DIR/store/f.root`` (:data:`FILE`)."""
    d = Path(tempfile.mkdtemp(prefix="casa-test-data-"))
    try:
        d.chmod(0o755)
        (d / "store").mkdir(mode=0o755)
        if files is None:
            write_events(d / FILE.lstrip("/"))
        for name, src in (files or {}).items():
            shutil.copy(src, d / "store" / name)
            (d / "store" / name).chmod(0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def read_events(url: str) -> ak.Array:
    try:
        with uproot.open(url, timeout=10) as f:
            return f["Events"].arrays()
    except OSError:
        # fsspec-xrootd caches open handles (30 s, per URL): a handle to a dead
        # server keeps failing after the server is back unless dropped.
        XRootDFileSystem.clear_instance_cache()
        raise


def read_when_back(url: str, within: float = 15.0) -> tuple[ak.Array, float]:
    """Read a URL whose server just came back; returns (arrays, seconds taken)."""
    t0 = time.monotonic()
    while True:
        try:
            return read_events(url), time.monotonic() - t0
        except OSError:
            if time.monotonic() - t0 > within:
                raise
            time.sleep(0.2)


def read_routed(router: CacheRouter, url: str) -> tuple[ak.Array, ChunkIO]:
    """Read ``url`` as a worker does: ``MeteredSource`` inside a metered chunk (fail-over included).

    Returns the arrays and the chunk's record (``endpoints`` that served it, ``failovers``).
    """
    with metering(ChunkIO(router)) as io:
        try:
            with uproot.open(url, handler=MeteredSource, timeout=10) as f:
                return f["Events"].arrays(), io
        except OSError:
            XRootDFileSystem.clear_instance_cache()  # as in read_events
            raise


def assert_same(a: ak.Array, b: ak.Array) -> None:
    assert a.fields == b.fields and {"x", "run", "pt"} <= set(a.fields)
    assert len(a) == len(b) == N_ENTRIES
    assert ak.array_equal(a, b)
