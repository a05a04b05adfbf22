"""A slow origin for benchmarks: rate limit (tc tbf) plus delay (user-space relay).

This kernel has no ``netem`` qdisc, so the delay comes from ``relay.py``.
Layout (all in namespaces we create; nothing is routed off the machine)::

    host 127.0.0.1:P --relay--> [ns L] 127.0.0.1:P --delay relay-->
        veth 10.254.254.1/30 ==tbf==> [ns S] 10.254.254.2:P  xrootd origin

``L`` is the origin's loopback namespace, which an :class:`XCache` of this
origin shares, so ``root://127.0.0.1:P`` is the slow origin both for host
clients and for the cache. The /30 exists only between ``L`` and ``S``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .netns import NetNS, run_ip
from .xrootd import LOOPBACK, RELAY, ServerError, XRootDOrigin, _stop_proc

SUBNET = ("10.254.254.1", "10.254.254.2", 30)  # (L side, S side, prefix length)


class SlowOrigin(XRootDOrigin):
    """An origin behind a ``rate``-limited link with ``rtt_ms`` round-trip delay.

    ``rate`` is a tc rate (``"100mbit"``, ``"20mbit"``); ``rtt_ms`` is split
    evenly over both directions by the relay. Needs root (namespaces, tc).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        rate: str = "100mbit",
        rtt_ms: float = 20.0,
        burst: str = "64kb",
        **kw: Any,
    ) -> None:
        if os.geteuid() != 0:
            raise ServerError("SlowOrigin needs root (network namespaces, tc)")
        self.rate, self.rtt_ms, self.burst = rate, rtt_ms, burst
        self._delay: subprocess.Popen | None = None
        kw.setdefault("isolate", True)
        super().__init__(export_dir, **kw)
        self.slow_ns = NetNS("slow")
        try:
            self._make_link()
        except Exception:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The origin's, its relay's and the delay relay's."""
        delay = [self._delay.pid] if self._delay is not None and self._delay.poll() is None else []
        return [*super().pids, *delay]

    def _make_link(self) -> None:
        assert self.netns is not None
        tag = self.slow_ns.name.split("-")[3]
        left, right = f"cvl{os.getpid() % 100000}x{tag}", f"cvs{os.getpid() % 100000}x{tag}"
        run_ip("link", "add", left, "type", "veth", "peer", "name", right)
        run_ip("link", "set", left, "netns", self.netns.name)
        run_ip("link", "set", right, "netns", self.slow_ns.name)
        lip, sip, plen = SUBNET
        for ns, dev, ip in ((self.netns, left, lip), (self.slow_ns, right, sip)):
            run_ip("-n", ns.name, "addr", "add", f"{ip}/{plen}", "dev", dev)
            run_ip("-n", ns.name, "link", "set", dev, "up")
            # tbf on each egress: origin->cache carries the data, the other the requests
            tc = ["tc", "-n", ns.name, "qdisc", "add", "dev", dev, "root", "tbf"]
            tc += ["rate", self.rate, "burst", self.burst, "latency", "100ms"]
            res = subprocess.run(tc, capture_output=True, text=True, timeout=15)
            if res.returncode != 0:
                raise ServerError(f"`{' '.join(tc)}` failed: {res.stderr.strip()}")
        self.links = (left, right)

    def _server_prefix(self) -> list[str]:
        return self.slow_ns.prefix()

    def _after_ready(self) -> None:
        """Start the delaying relay in L: 127.0.0.1:P -> S side of the veth."""
        assert self.netns is not None
        argv = [*self.netns.prefix(), sys.executable, str(RELAY), "--listen", f"{LOOPBACK}:{self.port}"]
        argv += ["--target", f"{SUBNET[1]}:{self.port}", "--delay-ms", str(self.rtt_ms / 2)]
        log = self.workdir / "delay-relay.log"
        with open(log, "ab") as err:
            self._delay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        line = self._delay.stdout.readline() if self._delay.stdout else ""
        if not line.startswith("PORT "):
            raise ServerError(f"delay relay failed to start: {line}{log.read_text()}")
        self._record_pids()

    def _before_stop(self) -> None:
        _stop_proc(self._delay, grace=2.0)
        self._delay = None

    @property
    def pids(self) -> list[int]:
        extra = [self._delay.pid] if self._delay and self._delay.poll() is None else []
        return [*super().pids, *extra]

    def close(self) -> None:
        super().close()  # stops every process first
        if hasattr(self, "slow_ns") and not self.slow_ns.deleted:
            self.slow_ns.delete()  # the last user gone: the veth pair goes with it

    def bytes_sent(self) -> int:
        """Bytes the origin side of the link has sent so far (what ``tc`` counts: TCP/IP headers included)."""
        stats = self.qdisc_stats()
        m = re.search(r"Sent (\d+) bytes", stats)
        if m is None:
            raise ServerError(f"no byte count in tc's statistics:\n{stats}")
        return int(m.group(1))

    def qdisc_stats(self) -> str:
        """``tc -s qdisc`` of the origin side (bytes sent, drops, overlimits)."""
        dev = self.links[1]
        res = subprocess.run(
            ["tc", "-n", self.slow_ns.name, "-s", "qdisc", "show", "dev", dev],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return res.stdout


@contextmanager
def slow_origin(export_dir: str | Path, rate: str = "100mbit", rtt_ms: float = 20.0, **kw: Any) -> Iterator[SlowOrigin]:
    """``with slow_origin(dir, "50mbit", 20) as origin, XCache(origin) as cache: ...``"""
    with SlowOrigin(export_dir, rate=rate, rtt_ms=rtt_ms, **kw) as origin:
        yield origin  # type: ignore[misc]
