"""Checkpoints: a run that was killed resumes where it stopped.

``checkpoint=URL`` (any :class:`~casa_executors.store.Store` URL the workers
can write) keeps the merge tree of one run: chunk outputs and merged nodes
under ``nodes/<level>/<index>``, each written atomically with an authentication
tag (:mod:`casa_executors.signing`), and a node written only when every chunk
below it succeeded. A merged node stands
for all the chunks below it, so its children are deleted once it is written.

The run key is derived from what determines the result, and is written down in
``manifest.json``:

* the work items in order: dataset, file name, tree, entry range, file UUID,
  user metadata;
* the processor: its class's qualified name, the *source text* of that class
  and of its bases outside coffea, and its instance attributes (encoded
  canonically: sets and dicts sorted, arrays by dtype, shape and bytes). The
  same code and settings give the same key in any interpreter; cloudpickle
  bytes would not (they hold per-process class ids). Functions are taken by
  source (or byte code when there is no source), their defaults and closures.
  Modules the processor imports are not followed: change a helper module and
  the key stays the same (the versions below excepted);
* Runner options that change the output: schema, format, ``savemetrics``,
  ``use_dataframes``, uproot and iteritems options (not timeouts, not coffea's
  ``checkpointer``, not caches);
* the versions of coffea, awkward, uproot and casa_executors;
* the merge fan-in (the shape of the tree).

A location holds one run. Another key there is refused with
:class:`~casa_executors.errors.CheckpointMismatch`, naming what differs,
unless ``checkpoint_restart=True`` (the old run is deleted first).

On resume the driver lists the store once and walks the tree from the root:
a node that is there is restored (its chunks are not run, their report rows
say ``restored``); otherwise its children are looked at, down to the chunks,
which are run. Files below a restored node, temporary files and partial merges
are leftovers of the kill and are deleted. A restored file's tag is checked
when it is read, before it is unpickled; a bad one (cut short, changed, planted
by someone else, moved from another node) is deleted, reported
(``summary()["checkpoint"]["corrupt"]``) and its chunks are computed again.

The key is made when the checkpoint is, kept in a file of the user's own
(mode 0600 in a 0700 folder of the user's cache directory, named by a hash of
the location and the run key), and shipped to the workers with the tasks. The
manifest is tagged too: one that does not authenticate — the key file was
deleted, or the checkpoint was written from another account or machine — is
refused with :class:`~casa_executors.errors.UntrustedData` naming it (nothing
there is read), unless ``checkpoint_restart=True``. Resuming on another machine
takes copying the key file along.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import pickle
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cloudpickle

from casa_executors import signing
from casa_executors.errors import CheckpointMismatch, UntrustedData
from casa_executors.internals import runner_work_arguments
from casa_executors.merge import MergeTree, node_key
from casa_executors.store import HEADER, TMP, NodeCorrupt, Store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "casa_executors checkpoint 1"
VERSIONED = ("coffea", "awkward", "uproot", "casa_executors")
# Runner._work_function arguments that do not change the output
NOT_RESULT = {"xrootdtimeout", "checkpointer", "cache_function"}
LIBRARY_MARKERS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


# -- a stable fingerprint of Python objects ------------------------------------------------------


def _library(module: str | None) -> bool:
    """Code of the standard library or of an installed package: named, not read."""
    if not module:
        return False
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ("builtins", *VERSIONED):
        return True
    mod = sys.modules.get(module) or sys.modules.get(top)
    return any(m in (getattr(mod, "__file__", None) or "") for m in LIBRARY_MARKERS)


class Fingerprint:
    """blake2b over a canonical walk of an object: the same value gives the same digest in any process."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=20)
        self._seen: set[int] = set()

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def _w(self, tag: str, data: bytes | str = b"") -> None:
        if isinstance(data, str):
            data = data.encode()
        self._h.update(f"{tag}:{len(data)}:".encode())
        self._h.update(data)

    def add(self, obj: Any, depth: int = 0) -> None:  # one switch over kinds of object
        if depth > 60:
            self._w("deep")
            return
        d = depth + 1
        if obj is None or isinstance(obj, (bool, int, float, complex, str)):
            self._w(type(obj).__name__, repr(obj))
            return
        if isinstance(obj, (bytes, bytearray, memoryview)):
            self._w("bytes", bytes(obj))
            return
        if id(obj) in self._seen:
            self._w("cycle", type(obj).__qualname__)
            return
        self._seen.add(id(obj))
        try:
            self._add_container(obj, d)
        finally:
            self._seen.discard(id(obj))

    def _sorted_digests(self, items: Any) -> list[str]:
        out = []
        for x in items:
            sub = Fingerprint()
            sub._seen = self._seen
            sub.add(x)
            out.append(sub.hexdigest())
        return sorted(out)

    def _add_container(self, obj: Any, d: int) -> None:
        import numpy as np

        if isinstance(obj, (list, tuple)):
            self._w(type(obj).__name__, str(len(obj)))
            for x in obj:
                self.add(x, d)
        elif isinstance(obj, (set, frozenset)):
            self._w("set", ",".join(self._sorted_digests(obj)))
        elif isinstance(obj, Mapping):
            self._w("map", type(obj).__qualname__)
            self._w("items", ",".join(self._sorted_digests(obj.items())))
        elif isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            self._w("ndarray", f"{arr.dtype.str}{arr.shape}")
            self._w("data", arr.tobytes() if arr.dtype != object else pickle.dumps(arr.tolist()))
        elif isinstance(obj, np.generic):
            self._w("np", f"{obj.dtype.str}:{obj!r}")
        elif isinstance(obj, type):
            self._add_class(obj, d)
        elif isinstance(obj, functools.partial):
            self._w("partial")
            self.add(obj.func, d)
            self.add(obj.args, d)
            self.add(obj.keywords, d)
        elif isinstance(obj, types.MethodType):
            self._w("method")
            self.add(obj.__func__, d)
            self.add(obj.__self__, d)
        elif isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
            self._add_function(obj, d)
        elif isinstance(obj, types.ModuleType):
            self._w("module", obj.__name__)
        elif isinstance(obj, types.CodeType):
            self._add_code(obj, d)
        else:
            self._add_instance(obj, d)

    def _add_class(self, cls: type, d: int) -> None:
        self._w("class", f"{cls.__module__}.{cls.__qualname__}")
        if _library(cls.__module__):
            return
        try:
            self._w("source", inspect.getsource(cls))
        except (OSError, TypeError):
            for name, member in sorted(vars(cls).items()):
                if isinstance(member, (types.FunctionType, staticmethod, classmethod)):
                    self._w("member", name)
                    self.add(getattr(member, "__func__", member), d)
        for base in cls.__mro__[1:]:
            if base is not object:
                self.add(base, d)

    def _add_function(self, fn: Any, d: int) -> None:
        module = getattr(fn, "__module__", None)
        self._w("function", f"{module}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}")
        if _library(module) or not isinstance(fn, types.FunctionType):
            return
        try:
            self._w("source", inspect.getsource(fn))
        except (OSError, TypeError):
            self._add_code(fn.__code__, d)
        self.add(fn.__defaults__, d)
        self.add(fn.__kwdefaults__, d)
        for cell in fn.__closure__ or ():
            try:
                self.add(cell.cell_contents, d)
            except ValueError:  # an empty cell
                self._w("empty")

    def _add_code(self, code: types.CodeType, d: int) -> None:
        self._w("code", code.co_code)
        self._w("names", ",".join(code.co_names))
        for const in code.co_consts:
            self.add(const, d)

    def _add_instance(self, obj: Any, d: int) -> None:
        cls = type(obj)
        self.add(cls, d)
        if not _library(cls.__module__):
            try:
                state = obj.__getstate__() if hasattr(obj, "__getstate__") else getattr(obj, "__dict__", None)
            except Exception:  # a __getstate__ that fails here: the attributes themselves
                state = getattr(obj, "__dict__", None)
            self.add(state, d)
            return
        try:  # a library object (a histogram, an awkward array...): its pickle, stable for one version
            self._w("pickle", pickle.dumps(obj, protocol=5))
        except Exception:
            self._w("cloudpickle", cloudpickle.dumps(obj))  # may differ between processes: a new key, not a wrong one


def fingerprint(*objs: Any) -> str:
    f = Fingerprint()
    for o in objs:
        f.add(o)
    return f.hexdigest()


# -- what determines a run's result ----------------------------------------------------------------


def _runner_arguments(work: Any) -> tuple[Any, dict[str, Any]] | None:
    """(processor, the other result-relevant options) of coffea Runner's work function."""
    bound = runner_work_arguments(work)
    if bound is None:
        return None
    proc = bound.pop("processor_instance", None)
    if isinstance(proc, bytes):
        import lz4.frame

        proc = cloudpickle.loads(lz4.frame.decompress(proc))
    return proc, {k: v for k, v in bound.items() if k not in NOT_RESULT}


def processor_identity(work: Any) -> dict[str, str]:
    """Name and digest of what a chunk runs (the processor and the Runner's options)."""
    runner = _runner_arguments(work)
    if runner is not None:
        proc, options = runner
        target = proc if isinstance(proc, (type, types.FunctionType, functools.partial)) else type(proc)
        name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        return {"name": name, "digest": fingerprint(proc, options)}
    fn = getattr(work, "func", work)
    return {"name": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}",
            "digest": fingerprint(work)}


def item_identity(item: Any) -> tuple[Any, ...]:
    uuid = getattr(item, "fileuuid", b"")
    return (
        getattr(item, "dataset", ""), getattr(item, "filename", str(item)), getattr(item, "treename", ""),
        getattr(item, "entrystart", None), getattr(item, "entrystop", None),
        uuid.hex() if isinstance(uuid, bytes) else str(uuid), getattr(item, "usermeta", None),
    )


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def describe_items(items: list[Any]) -> dict[str, Any]:
    f = Fingerprint()
    for it in items:
        f.add(item_identity(it))
    ends = [item_identity(items[i])[1:5] for i in (0, -1)] if items else []
    return {"count": len(items), "digest": f.hexdigest(), "first_last": [list(map(str, e)) for e in ends]}


def run_identity(items: list[Any], work: Any, fanin: int) -> dict[str, Any]:
    ident = {
        "items": describe_items(items),
        "processor": processor_identity(work),
        "versions": versions(),
        "merge_fanin": fanin,
    }
    ident["run_key"] = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=16).hexdigest()
    return ident


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    oi, ni = old.get("items", {}), new["items"]
    if oi.get("digest") != ni["digest"]:
        out.append(f"the work items differ ({oi.get('count')} chunks then, {ni['count']} now"
                   + (", same count but other files, ranges or UUIDs" if oi.get("count") == ni["count"] else "") + ")")
    op, np_ = old.get("processor", {}), new["processor"]
    if op.get("digest") != np_["digest"]:
        same = op.get("name") == np_["name"]
        out.append(f"the processor differs ({np_['name']}: its code or settings changed)" if same
                   else f"the processor differs ({op.get('name')} then, {np_['name']} now)")
    ov = old.get("versions", {})
    out += [f"{k} {ov.get(k)} then, {v} now" for k, v in new["versions"].items() if ov.get(k) != v]
    if old.get("merge_fanin") != new["merge_fanin"]:
        out.append(f"merge_fanin {old.get('merge_fanin')} then, {new['merge_fanin']} now")
    return out or ["its run key differs"]


# -- a checkpoint location ----------------------------------------------------------------------------


class Checkpoint:
    """One run's checkpoint at ``url``: opened (checked against the manifest) at the start of a call."""

    def __init__(self, url: str, restart: bool = False) -> None:
        self.url = url
        self.store = Store(url)  # its key is this checkpoint's once opened
        self.restart = restart
        self.identity: dict[str, Any] = {}
        self.restarted = False
        self.key_file: Path | None = None

    @property
    def location(self) -> str:
        """The canonical URL (``ck``, ``./ck/`` and ``file:///abs/ck`` are one location)."""
        try:
            return self.store.fs.unstrip_protocol(self.store.path("").rstrip("/"))
        except Exception:
            return self.store.url

    def open(self, items: list[Any], work: Any, fanin: int) -> None:
        """Check (or write) the manifest; refuse another run's checkpoint, or one its key does not vouch
        for, unless restarting."""
        self.identity = run_identity(items, work, fanin)
        self.key_file = signing.checkpoint_key_path(self.location, self.identity["run_key"])
        key = signing.read_key(self.key_file)
        self.store = Store(self.url, signing_key=key)  # no key yet: a new one, which vouches for nothing there
        try:
            fresh = self._examine(key)
        except (CheckpointMismatch, UntrustedData) as exc:
            if not self.restart:
                raise
            log.info("checkpoint_restart: deleting %s (%s)", self.url, exc)
            old = self._unverified_manifest()
            self.store.wipe()
            if old and isinstance(old.get("run_key"), str) and old["run_key"] != self.identity["run_key"]:
                signing.forget_key(signing.checkpoint_key_path(self.location, old["run_key"]))
            self.restarted, fresh = True, True
        if fresh:
            key = signing.new_key()
            signing.write_key(self.key_file, key)
            self.store = Store(self.url, signing_key=key).create()
            self.write_manifest(complete=False)

    def _refuse(self, problems: list[str]) -> CheckpointMismatch:
        return CheckpointMismatch(
            f"checkpoint {self.url} holds another run: {'; '.join(problems)}. "
            "Pass checkpoint_restart=True to delete it and start over, or choose another location.")

    def _examine(self, key: bytes | None) -> bool:
        """True when the location holds nothing (a run starts there), False when it holds this run
        (resumed); raises when it holds another run or files this run's key does not vouch for."""
        try:
            doc = self.store.get_json(MANIFEST)  # authenticated before it is parsed
        except NodeCorrupt as exc:
            raise self._untrusted(key, exc) from None
        if doc is None:
            leftovers = self.store.keys()
            if leftovers:
                raise self._refuse([f"it holds {len(leftovers)} files but no {MANIFEST} "
                                    "(not a casa_executors checkpoint)"])
            return True
        if doc.get("format") != FORMAT:
            raise self._refuse([f"its manifest is not a {FORMAT}"])
        if doc.get("run_key") != self.identity["run_key"]:
            raise self._refuse(differences(doc, self.identity))
        return False

    def _untrusted(self, key: bytes | None, exc: NodeCorrupt) -> Exception:
        """Why a manifest that does not authenticate is refused. Most often it is another run's (its key is
        another file): its text says which, read as JSON only (never unpickled) to word the refusal."""
        old = self._unverified_manifest()
        if old is not None and old.get("format") == FORMAT and old.get("run_key") != self.identity["run_key"]:
            try:
                return self._refuse(differences(old, self.identity))
            except Exception:  # a manifest too odd to compare: refused below as untrusted
                pass
        advice = "Pass checkpoint_restart=True to delete it and start over, or choose another location."
        if key is None:
            return UntrustedData(
                f"checkpoint {self.url}: there is no key for it at {self.key_file} (written from another account "
                f"or machine, or the key was deleted), so its files cannot be authenticated and none is read. "
                f"To resume it here, copy the key it was written with to that path (mode 0600); or: "
                f"{advice[0].lower()}{advice[1:]}")
        return UntrustedData(f"checkpoint {self.url}: {exc}. {advice}")

    def _unverified_manifest(self) -> dict[str, Any] | None:
        try:
            with self.store.fs.open(self.store.path(MANIFEST), "rb") as f:
                doc = json.loads(f.read()[HEADER.size:])
        except Exception:
            return None
        return doc if isinstance(doc, dict) else None

    def write_manifest(self, complete: bool) -> None:
        doc = {"format": FORMAT, **self.identity, "complete": complete,
               "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.store.put_json(MANIFEST, doc)

    def resolve(self, tree: MergeTree, level: int | None = None,
                index: int = 0) -> tuple[list[tuple[int, int]], list[int], list[str]]:
        """What the store holds below a node (the root by default).

        Returns ``(restored nodes, chunks to run, leftover keys to delete)``; a node
        that is there stands for every chunk below it.
        """
        level = tree.top if level is None else level
        keys = set(self.store.keys("nodes"))
        restored: list[tuple[int, int]] = []
        todo: list[int] = []
        stack = [(level, index)]
        while stack:
            lv, j = stack.pop()
            if node_key(lv, j) in keys:
                restored.append((lv, j))
            elif lv == 0:
                todo.append(j)
            else:
                stack += [(lv - 1, c) for c in reversed(tree.children(lv, j))]
        kept = {node_key(lv, j) for lv, j in restored}
        if level == tree.top:  # a whole-run look: everything else is a leftover
            leftovers = [k for k in self.store.keys() if k != MANIFEST and k not in kept]
        else:
            leftovers = [k for k in keys if TMP in k]
        return restored, todo, leftovers
