"""The output store: where workers put chunk outputs and merged tree nodes.

A :class:`Store` is a folder named by an fsspec URL — a local path, ``file://``
on a shared disk, ``root://host//path`` on an XRootD server (fsspec-xrootd) —
that the driver and every worker can reach. Only keys and sizes travel through
the engine; the bytes go worker -> store -> worker, and the driver reads one
file at the end (the root of the merge tree).

Every file is a small header and a payload::

    b"CASAOUT2" | payload length (8 bytes, little-endian) | HMAC-SHA256 tag | payload

The payload is a cloudpickled output, LZ4-framed unless compression is off.
The tag (:mod:`casa_executors.signing`) covers the file's key and payload under
the run's secret key, which every copy of the :class:`Store` carries (it is
pickled with the tasks) and no file holds. A write goes to
``<key>.tmp-<random>`` and is renamed onto ``<key>``, so a reader sees a whole
file or none. A file whose tag is missing or wrong — cut short, changed
afterwards (a full disk, a bad copy, bit rot, or someone else who can write
there), or moved from another key — is refused *before* it is unpickled with
:class:`NodeUntrusted`, naming the file; the driver recomputes what it stood for.
"""

from __future__ import annotations

import json
import logging
import pickle
import posixpath
import struct
import uuid
from typing import Any

import cloudpickle

from casa_executors import signing
from casa_executors.errors import UntrustedData

MAGIC = b"CASAOUT2"
UNSIGNED_MAGIC = b"CASAOUT1"  # casa_executors before signing: a checksum, no tag
HEADER = struct.Struct(f"<{len(MAGIC)}sQ{signing.TAG_BYTES}s")
log = logging.getLogger(__name__)
TMP = ".tmp-"
LZ4_MAGIC = b"\x04\x22\x4d\x18"


class NodeMissing(FileNotFoundError):
    """A key the driver expected is not in the store (deleted, or never finished writing)."""


class NodeCorrupt(ValueError):
    """A file in the store that cannot be taken (the driver recomputes what it stood for)."""


class NodeUntrusted(NodeCorrupt, UntrustedData):
    """A file whose authentication tag is missing or wrong: refused unread (never unpickled)."""


# -- outputs as bytes --------------------------------------------------------------------


def encode(output: Any, level: int | None) -> bytes:
    """cloudpickle, then LZ4 at ``level`` (``None``: no compression)."""
    data = cloudpickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)
    if level is None:
        return data
    import lz4.frame

    return lz4.frame.compress(data, compression_level=level)


def decode(payload: bytes) -> Any:
    """The output of an encoded payload. Unpickling runs code: store files reach it only through
    :meth:`Store.get`, which checks their tag first."""
    if payload[:4] == LZ4_MAGIC:
        import lz4.frame

        payload = lz4.frame.decompress(payload)
    return pickle.loads(payload)


def header(key: bytes, name: str, payload: bytes) -> bytes:
    """The header of the file ``name`` holding ``payload``, tagged with ``key``."""
    return HEADER.pack(MAGIC, len(payload), signing.tag(key, name, payload))


def unframe(data: bytes, key: bytes, name: str, what: str) -> bytes:
    """The payload of the stored file ``name``, authenticated; :class:`NodeUntrusted` (naming ``what``)
    says what is wrong. Nothing of an untrusted file is decoded."""
    refused = "refused unread"
    if len(data) < HEADER.size:
        raise NodeUntrusted(f"{what}: {len(data)} bytes, shorter than the {HEADER.size}-byte header with its "
                            f"authentication tag; {refused}")
    magic, length, tag = HEADER.unpack_from(data)
    if magic == UNSIGNED_MAGIC:
        raise NodeUntrusted(f"{what}: written without an authentication tag (an older casa_executors); {refused}")
    if magic != MAGIC:
        raise NodeUntrusted(f"{what}: not a casa_executors output file (header {magic!r}); {refused}")
    payload = data[HEADER.size:]
    if len(payload) != length:
        raise NodeUntrusted(f"{what}: truncated or padded ({len(payload)} payload bytes, header says {length}); "
                            f"{refused}")
    if not signing.valid(key, name, payload, tag):
        raise NodeUntrusted(f"{what}: its authentication tag does not match the run's key (changed since it was "
                            f"written, written elsewhere or by someone else, or under another key); {refused}")
    return payload


# -- the store ------------------------------------------------------------------------------


class Store:
    """A folder of output files under an fsspec URL; picklable (the file system is reopened per process).

    ``signing_key`` (32 bytes) tags every file written and checks every file read; None makes a new
    one, this run's: copies of this object (pickled with the tasks) carry it, files never do.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 signing_key: bytes | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.storage_options = dict(storage_options or {})
        self.signing_key = signing.new_key() if signing_key is None else signing.check_key(signing_key)
        self._fs: Any = None
        self._root = ""
        self._made: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options, "signing_key": self.signing_key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], state["signing_key"])

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def child(self, name: str) -> Store:
        """The store of a sub-folder (one run's scratch space)."""
        return Store(f"{self.url}/{name}", self.storage_options, self.signing_key)

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, self._root = fsspec.url_to_fs(self.url, **self.storage_options)
            self._root = self._root.rstrip("/")
        return self._fs

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, key: str) -> str:
        _ = self.fs
        return f"{self._root}/{key}"

    def create(self) -> Store:
        """Make the folder itself (the driver does, at the start of a run)."""
        self.fs.makedirs(self.path("").rstrip("/"), exist_ok=True)
        return self

    def _makedirs(self, directory: str) -> None:
        if directory not in self._made:
            # only below a folder the driver made: a task still running when its run ended (and
            # the folder was removed) fails here instead of leaving files behind
            if not self.fs.exists(self._root):
                raise NodeMissing(f"{self.url} is gone (the run it belonged to has ended)")
            self.fs.makedirs(directory, exist_ok=True)
            self._made.add(directory)

    # -- bytes ----------------------------------------------------------------
    def put(self, key: str, payload: bytes) -> int:
        """Write ``payload`` under ``key`` atomically, tagged; returns the file's size."""
        final = self.path(key)
        self._makedirs(posixpath.dirname(final))
        tmp = f"{final}{TMP}{uuid.uuid4().hex[:12]}"
        head = header(self.signing_key, key, payload)
        with self.fs.open(tmp, "wb") as f:
            f.write(head)
            f.write(payload)
        try:
            self.fs.mv(tmp, final)
        except OSError:
            # some servers refuse to rename onto an existing file: the same node written twice
            # (a re-sent task) holds the same output, so replace it
            if not self.fs.exists(final):
                raise
            self.fs.rm_file(final)
            self.fs.mv(tmp, final)
        return len(head) + len(payload)

    def get(self, key: str) -> bytes:
        """The authenticated payload under ``key`` (:class:`NodeUntrusted` if it is not)."""
        path = self.path(key)
        # listings cached earlier may not show the file (and fsspec-xrootd's info() then fails)
        self.fs.dircache.clear()
        try:
            with self.fs.open(path, "rb") as f:  # a fresh handle: a cached one may see an older file
                data = f.read()
        except FileNotFoundError:
            raise NodeMissing(f"{self.url}/{key} is missing") from None
        except OSError as exc:  # fsspec-xrootd says OSError for a missing file
            if not self.exists(key):
                raise NodeMissing(f"{self.url}/{key} is missing") from None
            raise exc
        return unframe(data, self.signing_key, key, f"{self.url}/{key}")

    def put_output(self, key: str, output: Any, level: int | None) -> int:
        return self.put(key, encode(output, level))

    def read_output(self, key: str) -> tuple[Any, int]:
        """The output under ``key`` and its payload's size: the one way store data is unpickled,
        after its tag is checked."""
        try:
            payload = self.get(key)
        except NodeUntrusted as exc:  # the caller recomputes it; someone may be planting files: say so
            log.warning("%s", exc)
            raise
        return decode(payload), len(payload)

    def get_output(self, key: str) -> Any:
        return self.read_output(key)[0]

    # -- keys -----------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def keys(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix`` (relative keys), temporary ones included."""
        base = self.path(prefix).rstrip("/")
        self.fs.invalidate_cache()  # listings are cached; other processes write here
        if not self.fs.exists(base):
            return []
        root = self._root + "/"
        return [p[len(root):] if p.startswith(root) else p for p in self.fs.find(base)]

    def remove(self, keys: list[str]) -> None:
        """Delete ``keys``; those already gone are fine."""
        for key in keys:
            try:
                self.fs.rm_file(self.path(key))
            except FileNotFoundError:
                pass
            except OSError:
                if self.exists(key):
                    raise

    def wipe(self) -> None:
        """Delete the whole folder: files, then folders from the deepest up."""
        root = self.path("").rstrip("/")
        self.remove(self.keys())
        if self.fs.exists(root):
            folders = [p for p, info in self.fs.find(root, withdirs=True, detail=True).items()
                       if info["type"] == "directory"]
            for folder in sorted(folders, key=lambda p: -p.count("/")):
                self.fs.rmdir(folder)
            if self.fs.exists(root):
                self.fs.rmdir(root)
        self.fs.invalidate_cache()
        self._made.clear()

    # -- small documents (the checkpoint manifest) ------------------------------------------
    def put_json(self, key: str, doc: dict[str, Any]) -> None:
        self.put(key, json.dumps(doc, indent=1, sort_keys=True).encode())

    def get_json(self, key: str) -> dict[str, Any] | None:
        """The document under ``key``; None if there is none."""
        try:
            return json.loads(self.get(key))
        except NodeMissing:
            return None


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
