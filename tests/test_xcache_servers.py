"""Real xrootd origin + XCache on loopback: reads, cache contents, outages, fail-over."""

from __future__ import annotations

import logging
import time

import psutil
import pytest
from xrootd_fixtures import (
    FILE,
    assert_same,
    export_dir,
    read_events,
    read_routed,
    read_when_back,
    require_xrootd,
)

from casa_executors.errors import AllEndpointsFailed
from casa_executors.standins.ports import free_port
from casa_executors.standins.xrootd import ServerError, XCache, XRootDOrigin
from casa_executors.xcache.router import CacheRouter


@pytest.fixture(scope="module")
def data():
    require_xrootd()
    with export_dir() as d:
        yield d


@pytest.fixture(scope="module")
def servers(data):
    with XRootDOrigin(data) as origin, XCache(origin) as cache:
        yield origin, cache


@pytest.fixture(scope="module")
def direct(servers):
    return read_events(servers[0].url(FILE))


def test_read_through_cache_is_identical_and_cached(servers, direct):
    origin, cache = servers
    assert origin.url(FILE) == f"root://127.0.0.1:{origin.port}//store/f.root"
    assert_same(read_events(cache.url(FILE)), direct)
    assert cache.cached_path(FILE).is_file()
    assert cache.cached_path(FILE).with_name("f.root.cinfo").is_file()
    info = cache.cache_info(FILE)
    assert info == {"file_size_kb": info["file_size_kb"], "n_blocks": 3, "n_downloaded": 3, "state": "complete"}
    assert cache.cached_path(FILE).read_bytes() == (origin.export_dir / "store/f.root").read_bytes()


def test_servers_listen_on_loopback_only(servers):
    origin, _ = servers
    if origin.netns is None:
        pytest.skip("no network namespace (not root): xrootd 5.5 binds the wildcard")
    for srv in servers:
        listeners = [
            c.laddr.ip
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == srv.port
        ]
        assert listeners == ["127.0.0.1"], (srv, listeners)


def test_forwarding_form(servers, direct):
    origin, _ = servers
    with XCache(origin, forwarding=True) as fwd:
        url = fwd.url(FILE)
        assert url == f"{fwd.endpoint}//{origin.endpoint}//store/f.root"
        assert_same(read_events(url), direct)
        assert fwd.cache_info(FILE)["state"] == "complete"  # the key is the path only
        router = CacheRouter(fwd.endpoint, mode="forward")
        arrays, io = read_routed(router, origin.url(FILE))
        assert io.endpoints == [f"xcache:{fwd.endpoint}"] and io.failovers == []
        assert_same(arrays, direct)


def test_missing_file_error_names_original_url(servers):
    origin, cache = servers
    url = origin.url("/store/missing.root")
    with pytest.raises(AllEndpointsFailed) as info:
        read_routed(CacheRouter(cache.endpoint), url)
    msg = str(info.value)
    assert url in msg
    assert f"xcache:{cache.endpoint}" in msg and f"origin:{origin.endpoint}" in msg
    assert "no such file" in msg.lower()


def test_failover_from_a_dead_cache_to_the_origin(servers, direct, caplog):
    origin, _ = servers
    dead = f"root://127.0.0.1:{free_port()}"  # nobody listens there
    with caplog.at_level(logging.INFO, logger="casa_executors.source"):
        arrays, io = read_routed(CacheRouter(dead, token="aaa.bbb.ccc"), origin.url(FILE))
    assert io.endpoints == [f"origin:{origin.endpoint}"]  # served by the origin ...
    assert io.failovers == [f"xcache:{dead}: OSError"]  # ... after exactly one failed endpoint
    assert_same(arrays, direct)
    # the fail-over is logged, token-free
    messages = [r.getMessage().split(" failed")[0] for r in caplog.records]
    assert messages == [f"reading {origin.url(FILE)}: xcache:{dead}"]
    assert f"trying origin:{origin.endpoint}" in caplog.text and "aaa.bbb.ccc" not in caplog.text


def test_outages_and_restart(data, direct, no_leftover_processes):
    """Origin down: cached file still served; uncached ones fail fast. Cache down: fail-over."""
    with XRootDOrigin(data) as origin, XCache(origin) as cache:
        assert_same(read_events(cache.url(FILE)), direct)  # fills the cache
        port = origin.port
        origin.stop()
        assert not origin.running and origin.pids == []
        assert_same(read_events(cache.url(FILE)), direct)

        t0 = time.monotonic()
        with pytest.raises(OSError):
            read_events(cache.url("/store/not-cached.root"))
        assert time.monotonic() - t0 < 5, "cache must not hang on a dead origin"
        t0 = time.monotonic()
        with pytest.raises(OSError):
            read_events(origin.url(FILE))
        assert time.monotonic() - t0 < 5

        origin.start()
        assert origin.port == port
        arrays, took = read_when_back(origin.url(FILE))  # XrdCl shuns it for XRD_STREAMERRORWINDOW
        assert_same(arrays, direct)
        assert took < 8

        cache.stop()
        t0 = time.monotonic()
        arrays, io = read_routed(CacheRouter(cache.endpoint), origin.url(FILE))
        assert io.endpoints == [f"origin:{origin.endpoint}"]
        assert io.failovers == [f"xcache:{cache.endpoint}: OSError"]
        assert time.monotonic() - t0 < 5, "fail-over from a dead cache must be quick"
        assert_same(arrays, direct)
        pids = origin.pids
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_startup_failure_reports_log_tail(servers, no_leftover_processes):
    origin, _ = servers
    bad = XCache(origin, ram="64m")  # XCache refuses pfc.ram below 1g
    try:
        with pytest.raises(ServerError) as info:
            bad.start()
        assert "initialization failed" in str(info.value)
        assert str(bad.log_path) in str(info.value)
        assert bad.pids == []
    finally:
        bad.close()


def test_unreadable_export_dir_is_refused(tmp_path):
    require_xrootd()
    import os

    if os.geteuid() != 0:
        pytest.skip("only root hands the server to user xrootd")
    (tmp_path / "store").mkdir()
    tmp_path.parent.chmod(0o700)  # like pytest's own base dir
    with pytest.raises(ServerError, match="not reachable by user xrootd"):
        XRootDOrigin(tmp_path)


def test_a_cold_cache_fetches_only_the_blocks_read(tmp_path):
    """A query reads a few branches of a file: the cache fetches their blocks and no others (``pfc.prefetch 0``;
    XCache's own default reads on through the file in order, on the slow link twice the bytes: docs/reading.md)."""
    import uproot

    from casa_benchmarks.adl.generate import generate

    require_xrootd()
    (path,) = generate(tmp_path, 20_000, files=1, seed=5).files  # 86 branches, ~14 MB
    with export_dir({"adl.root": path}) as d, XRootDOrigin(d) as origin, XCache(origin, blocksize="64k") as cache:
        assert cache.prefetch == 0 and "pfc.prefetch 0" in cache._config_lines()
        with uproot.open(cache.url("/store/adl.root")) as f:
            assert len(f["Events"]["MET_pt"].array()) == 20_000  # one branch of 86
        time.sleep(1.0)  # a prefetch would go on after the reads (there is nothing to wait on when there is none)
        info = cache.cache_info("/store/adl.root")
        assert info is not None and info["state"] != "complete", info
        assert info["n_downloaded"] < info["n_blocks"] / 10, info
