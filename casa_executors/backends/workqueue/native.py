"""Native shims around Work Queue's SWIG bindings: a wait that lets the GIL go (and wakes on a
submission), and bind() on one address.

* ``WorkQueue.wait`` holds the GIL for its whole timeout (the driver would
  freeze for a second at a time). :class:`Waiter` calls the C
  ``work_queue_wait`` through ctypes instead, which lets the GIL go; the
  backend makes every queue call from one thread, so this is safe. With a
  wake-up pipe it returns as soon as a task is submitted (see there).
* ``WorkQueue(port)`` listens on all interfaces and has no address option.
  Inside :func:`bound_to`, the extension's GOT entry for ``bind`` points to a
  shim that replaces the wildcard address with ``host``; ``host="0.0.0.0"``
  leaves it alone, for workers on other machines.

Either falls back to the plain bindings with a warning if the extension is not
what they expect (not a 64-bit little-endian ELF, no GOT entry, no symbol).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import struct
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

LOOPBACK = "127.0.0.1"
GOT_RELOCATIONS = {6, 7, 1025, 1026}  # GLOB_DAT and JUMP_SLOT on x86-64 and on aarch64


def _extension_path(wq: ModuleType) -> str:
    return os.path.realpath(wq._work_queue.__file__)


def _got_offsets(path: str, symbol: str) -> list[int]:
    """Where the ELF shared object ``path`` keeps the address of ``symbol`` (its GOT entries)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise OSError(f"{path} is not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = []
    for _, kind, _, _, offset, size, link, *_ in sections:
        if kind != 4 or link == 0:  # SHT_RELA against a symbol table
            continue
        symtab = sections[link]
        strtab = sections[symtab[6]]
        for at in range(offset, offset + size, 24):
            r_offset, r_info = struct.unpack_from("<QQ", data, at)
            if r_info & 0xFFFFFFFF not in GOT_RELOCATIONS:
                continue
            name_at = strtab[4] + struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * 24)[0]
            if data[name_at:data.index(b"\0", name_at)] == symbol.encode():
                found.append(r_offset)
    return found


def _maps() -> list[tuple[int, int, str, int, str]]:
    """This process's mappings: (start, end, permissions, file offset, path)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], int(parts[2], 16), parts[5].strip() if len(parts) > 5 else ""))
    return out


def _load_base(path: str) -> int:
    """Where the shared object ``path`` is loaded (its first page, file offset 0)."""
    starts = [lo for lo, _, _, offset, p in _maps() if p == path and offset == 0]
    if not starts:
        raise OSError(f"{path} is not mapped in this process")
    return min(starts)


_BIND = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, use_errno=True)
_bind_lock = threading.Lock()


def _bind_shim(real: Any, host: str) -> Any:
    """A C ``bind`` that puts ``host`` in place of the wildcard address."""
    v4 = socket.inet_aton(host)
    v6 = socket.inet_pton(socket.AF_INET6, "::1" if host == LOOPBACK else f"::ffff:{host}")

    def bind(fd: int, addr: int, length: int) -> int:
        buf = bytearray(ctypes.string_at(addr, length))
        family = int.from_bytes(buf[:2], sys.byteorder)
        if family == socket.AF_INET and length >= 8 and buf[4:8] == bytes(4):
            buf[4:8] = v4
        elif family == socket.AF_INET6 and length >= 24 and buf[8:24] == bytes(16):
            buf[8:24] = v6
        return real(fd, (ctypes.c_char * length).from_buffer(buf), length)

    return _BIND(bind)


@contextlib.contextmanager
def bound_to(wq: ModuleType, host: str) -> Iterator[None]:
    """While inside, the Work Queue extension's listening sockets bind to ``host``."""
    if host in ("0.0.0.0", ""):
        yield
        return
    with _bind_lock:
        patched = None
        try:
            path = _extension_path(wq)
            libc = ctypes.CDLL(None, use_errno=True)
            real = ctypes.cast(libc.bind, ctypes.c_void_p).value
            base = _load_base(path)
            slots = [base + off for off in _got_offsets(path, "bind")]
            if not slots or any(ctypes.c_void_p.from_address(s).value != real for s in slots):
                raise OSError("no resolved GOT entry for bind()")
            shim = _bind_shim(_BIND(real), host)
            patched = (slots, real, shim, _unprotect(slots))
            for s in slots:
                ctypes.c_void_p.from_address(s).value = ctypes.cast(shim, ctypes.c_void_p).value
        except (OSError, ValueError, AttributeError, struct.error) as exc:
            warnings.warn(f"workqueue: cannot make the manager listen on {host} only ({exc}); "
                          "it listens on all interfaces", stacklevel=3)
        try:
            yield
        finally:
            if patched is not None:
                slots, real, _, restore = patched
                for s in slots:
                    ctypes.c_void_p.from_address(s).value = real
                restore()


def _unprotect(slots: list[int]) -> Callable[[], None]:
    """Make the pages of ``slots`` writable (RELRO makes them read-only); return what undoes that."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, maps = mmap.PAGESIZE, _maps()
    changed = []
    for start in sorted({s - s % page for s in slots}):
        perms = next(p for lo, hi, p, _, _ in maps if lo <= start < hi)
        if "w" not in perms:
            prot = (1 if "r" in perms else 0) | (4 if "x" in perms else 0)  # PROT_READ, PROT_EXEC
            if libc.mprotect(start, page, prot | 2) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
            changed.append((start, prot))

    def restore() -> None:
        for start, prot in changed:
            libc.mprotect(start, page, prot)

    return restore


class Waiter:
    """``Waiter(wq, q)(timeout)`` -> address of a finished task or None, without holding the GIL while it waits
    (or, if the C function cannot be had, through the bindings, which hold it).

    ``work_queue_wait`` keeps going until a task finishes or its timeout (whole seconds, up to the next
    tick of ``time()``) runs out, so a task submitted meanwhile reaches Work Queue only then: up to a
    second with a worker idle. Given ``wake_fd`` (the read end of a pipe), it waits through
    ``work_queue_wait_internal`` instead, with that pipe as the "uplink" Work Queue polls for a foreman:
    the wait returns as soon as a byte arrives there (or when an iteration of its loop finds nothing to
    do), so whoever submits writes a byte and Work Queue sees the task at once. Without a project
    name only: with one, Work Queue reports the uplink's peer address to the catalog.
    """

    def __init__(self, wq: ModuleType, q: Any, wake_fd: int | None = None) -> None:
        self.wakes = False
        self._link: int | None = None
        self._close_link: Any = None
        try:
            lib = ctypes.CDLL(_extension_path(wq))
            handle = int(q._work_queue)
        except (OSError, AttributeError, TypeError) as exc:
            warnings.warn(f"workqueue: waiting through the Python bindings, which hold the GIL ({exc})",
                          stacklevel=3)
            self._wait: Callable[[int], int | None] = lambda timeout: (t := q.wait(timeout)) and task_address(t)
            return
        if wake_fd is not None:
            try:
                internal, attach = lib.work_queue_wait_internal, lib.link_attach_to_fd
                self._close_link = lib.link_close
            except AttributeError:
                internal = None
            if internal is not None:
                internal.restype = ctypes.c_void_p
                internal.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                     ctypes.c_char_p]
                attach.restype, attach.argtypes = ctypes.c_void_p, [ctypes.c_int]
                self._close_link.argtypes = [ctypes.c_void_p]
                self._link = attach(wake_fd)
                active = ctypes.c_int(0)
                # timeout 1: an idle wait ends within a second anyway (it returns after an iteration with
                # nothing to do, once its poll of up to a second ends), so stopping stays prompt
                self._wait = lambda timeout: internal(handle, 1, self._link, ctypes.byref(active), None)
                self.wakes = bool(self._link)
                if self.wakes:
                    return
        wait = lib.work_queue_wait
        wait.restype, wait.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]
        self._wait = lambda timeout: wait(handle, timeout)

    def __call__(self, timeout: int) -> int | None:
        return self._wait(timeout)

    def close(self) -> None:
        """Free the link (which closes ``wake_fd``)."""
        link, self._link = self._link, None
        if link:
            self._close_link(link)


def task_address(task: Any) -> int:
    """The address of the C task behind a bindings ``Task`` (what ``work_queue_wait`` returns)."""
    return int(task._task.this)
