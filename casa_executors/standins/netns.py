"""Named network namespaces (``ip netns``) for loopback-only servers.

xrootd 5.5 always binds the wildcard address (``XrdNetSocket::Open`` is called
with no host), so a server started in the host namespace listens on every
interface. Started inside a private namespace whose only interface is ``lo``
it is unreachable from outside; a relay (``relay.py``) publishes it on
127.0.0.1 of the host.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

from casa_executors import procs

PREFIX = "casa-xrd"
_counter = itertools.count()


def netns_available() -> bool:
    """True when we may create namespaces (root with ``ip`` and ``nsenter``)."""
    return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("nsenter"))


def run_ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")


def prune_stale() -> None:
    """Delete our namespaces left behind by processes that died."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return
    for name in names:
        parts = name.split("-")
        if name.startswith(PREFIX + "-") and len(parts) >= 4 and parts[2].isdigit():
            if not procs.alive(int(parts[2])):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)


class NetNS:
    """A named namespace with ``lo`` up; deleted by :meth:`delete`."""

    def __init__(self, tag: str = "lo") -> None:
        prune_stale()
        self.name = f"{PREFIX}-{os.getpid()}-{next(_counter)}-{tag}"
        run_ip("netns", "add", self.name)
        try:
            run_ip("-n", self.name, "link", "set", "lo", "up")
        except Exception:
            self.delete()
            raise
        self.deleted = False

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def prefix(self) -> list[str]:
        """argv prefix that execs a command inside (the PID is kept)."""
        return ["nsenter", f"--net={self.path}", "--"]

    def delete(self) -> None:
        # Processes still inside keep the namespace alive; only the name goes.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=15)
        self.deleted = True

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"
