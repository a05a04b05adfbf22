"""Messages between the driver and its Work Queue manager process: pickles, each prefixed by its length,
over one end of a ``socket.socketpair()``.

Stdlib only: the manager process runs ``manager.py`` by path and imports this module beside it, not
through the ``casa_executors`` package (whose import costs over a second). The socket pair is private to
the two processes (no address, nothing to authenticate), and every message is written whole with
``sendall`` (a sender lock makes that true across threads).
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
import threading
from typing import Any

HEADER = struct.Struct("!I")


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, *message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.sock.sendall(HEADER.pack(len(data)) + data)

    def poll(self, timeout: float) -> bool:
        """Is a message (or the end) waiting, within ``timeout`` s?"""
        return bool(select.select([self.sock], [], [], max(timeout, 0.0))[0])

    def recv(self) -> tuple[Any, ...]:
        """The next message; ``EOFError`` once the other side has gone."""
        (size,) = HEADER.unpack(self._exactly(HEADER.size))
        return pickle.loads(self._exactly(size))

    def _exactly(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the other end of the channel has closed")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()
