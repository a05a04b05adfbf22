"""Small TCP relay, run as its own process (``python relay.py ...``).

It listens in the network namespace it was started in and connects to the
target from another one (``--netns``), so a server that cannot bind to one
address (xrootd 5.5 binds the wildcard) is reached through 127.0.0.1 only.
``--delay-ms`` adds a one-way delay per direction without limiting throughput
(this kernel has no netem). Self-contained: imports nothing from the package.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import signal
import socket
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
CHUNK = 256 * 1024


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_netns(path: str) -> None:
    """Move the calling thread (and threads it starts later) into ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """Exit when the starting process goes away (checked every second).

    Not PR_SET_PDEATHSIG: that fires when the forking *thread* ends.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


class _Pair:
    """Closes both sockets once both directions are done (or one failed)."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks, self.left, self.lock = (a, b), 2, threading.Lock()

    def done(self, failed: bool = False) -> None:
        with self.lock:
            self.left = 0 if failed else self.left - 1
            if self.left <= 0:
                _close(*self.socks)


def _pump(src: socket.socket, dst: socket.socket, pair: _Pair) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
        pair.done()
    except OSError:
        pair.done(failed=True)


def _pump_delayed(src: socket.socket, dst: socket.socket, pair: _Pair, delay: float) -> None:
    """Forward chunks ``delay`` seconds after their arrival (pipelined)."""
    q: collections.deque[tuple[float, bytes]] = collections.deque()
    cv = threading.Condition()

    def writer() -> None:
        try:
            while True:
                with cv:
                    while not q:
                        cv.wait()
                    due, data = q.popleft()
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    pair.done()
                    return
                dst.sendall(data)
        except OSError:
            pair.done(failed=True)

    threading.Thread(target=writer, daemon=True).start()
    try:
        while True:
            data = src.recv(CHUNK)
            with cv:
                q.append((time.monotonic() + delay, data))
                cv.notify()
            if not data:
                return
    except OSError:
        pair.done(failed=True)
        with cv:
            q.append((0.0, b""))  # wake the writer so it ends
            cv.notify()


def _handle(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        upstream = socket.create_connection(target, timeout=5)
    except OSError:
        _close(client)  # the target is down: the client sees a closed socket
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pair = _Pair(client, upstream)
    pump = _pump_delayed if delay > 0 else _pump
    extra = (delay,) if delay > 0 else ()
    for src, dst in ((client, upstream), (upstream, client)):
        threading.Thread(target=pump, args=(src, dst, pair, *extra), daemon=True).start()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", required=True, help="HOST:PORT (port 0: any)")
    ap.add_argument("--target", required=True, help="HOST:PORT (port 0: same as listen)")
    ap.add_argument("--netns", help="namespace file to connect from")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    opts = ap.parse_args(argv)

    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(_hostport(opts.listen))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    thost, tport = _hostport(opts.target)
    if opts.netns:
        enter_netns(opts.netns)  # only sockets created from now on live there
    print(f"PORT {port}", flush=True)
    target = (thost, tport or port)
    while True:
        client, _ = lsock.accept()
        _handle(client, target, opts.delay_ms / 1000.0)


if __name__ == "__main__":
    main()
