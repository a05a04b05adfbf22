"""Free TCP ports on 127.0.0.1 for the stand-ins' servers.

A stand-in checks a port is free, then writes it into a daemon's configuration,
and the daemon binds it a second or so later (slurmctld, the dask-gateway proxy,
xrootd, which also binds the same port again on a restart). A port from the
kernel's ephemeral range can be handed meanwhile to any process's outgoing
connection or ``bind(0)``; the ports given here lie below that range, where only
a process that names a port explicitly can take one.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
SPAN = 16_000  # how many ports below the ephemeral range to draw from
LOWEST = 10_000  # nor below this: the well-known services and the usual fixed choices


def _candidates() -> range:
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(max(LOWEST, low - SPAN), low)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports nobody listens on now, outside the ephemeral range (all bound at once, so they
    differ; drawn at random, so two stand-ins starting together rarely try the same)."""
    candidates = _candidates()
    socks: list[socket.socket] = []
    try:
        if len(candidates) < 10 * n:  # an unusual ephemeral range: leave the choice to the kernel
            for _ in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind((LOOPBACK, 0))
            return [s.getsockname()[1] for s in socks]
        for port in random.sample(candidates, len(candidates)):
            s = socket.socket()
            try:
                s.bind((LOOPBACK, port))
            except OSError:  # taken
                s.close()
                continue
            socks.append(s)
            if len(socks) == n:
                return [s.getsockname()[1] for s in socks]
        raise OSError(f"no {n} free ports on {LOOPBACK} in {candidates.start}-{candidates.stop - 1}")
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A port nobody listens on now (outside the ephemeral range)."""
    return free_ports(1)[0]
