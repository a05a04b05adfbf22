"""The slow-origin benchmark setup: tbf rate limit + relay delay, all in our namespaces."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from xrootd_fixtures import FILE, IN_CI, export_dir, require_xrootd

from casa_executors.standins.xrootd import XCache, XRootDOrigin


def _xrdcp(url: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["xrdcp", "-f", "-s", url, "/dev/null"], check=True, timeout=60)
    return time.monotonic() - t0


def _stat_ms(server, n: int = 3) -> float:
    t0 = time.monotonic()
    for _ in range(n):
        subprocess.run(["xrdfs", server.endpoint, "stat", FILE], check=True, capture_output=True, timeout=30)
    return (time.monotonic() - t0) / n * 1000


def test_slow_origin_rate_delay_and_cleanup(no_leftover_processes):
    require_xrootd()
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the slow origin needs root (network namespaces, tc)")
        pytest.skip("the slow origin needs root (network namespaces, tc)")
    from casa_executors.standins.slowlink import slow_origin

    with export_dir() as data:
        size_mbit = (data / FILE.lstrip("/")).stat().st_size * 8 / 1e6
        with XRootDOrigin(data) as fast:
            fast_ms = _stat_ms(fast)
        with slow_origin(data, rate="20mbit", rtt_ms=40) as origin, XCache(origin) as cache:
            names = (origin.netns.name, origin.slow_ns.name)
            assert _stat_ms(origin) - fast_ms > 80  # open+stat take >= 3 round trips of 40 ms
            assert _xrdcp(origin.url(FILE)) > 0.8 * size_mbit / 20
            assert _xrdcp(cache.url(FILE)) > 0.8 * size_mbit / 20  # miss: through the slow link
            assert _xrdcp(cache.url(FILE)) < 0.5 * size_mbit / 20  # hit: served locally
            assert "Sent" in origin.qdisc_stats()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in left for n in names)
