"""Where chunk outputs live during a run, and where their merges run.

The driver's loop is the same for all; a :class:`Placement` says what a chunk
task does with its output, what a ready group of the merge tree becomes, and
how the final output is fetched. Three exist:

``DriverPlacement``
    outputs come back with the results and merge in the driver as they arrive
    (iterative; any engine's preprocessing; ``merge="driver"``; engines whose
    workers may be elsewhere when no shared ``store=`` is given).
``StorePlacement``
    workers write each output to a :class:`~casa_executors.store.Store` and
    return its size; merge tasks run on the engine, read the children, write
    the node and delete the children; the driver reads only the root. The store
    is the checkpoint when there is one, else ``store=``, else a temporary
    folder on this machine when the engine's workers run here.
``EnginePlacement``
    the engine keeps outputs in worker memory and runs merge tasks on them
    (Dask: futures as arguments); the driver waits for the results' metadata
    (Dask: pushed as events by the chunk tasks) and fetches only the root, or,
    when the run's outputs are small in all, gathers the last groups and merges
    them itself. A worker lost with outputs in memory: Dask recomputes them
    from lineage; if that fails too, the driver runs the chunks below again.

Every placement merges the same fixed tree (:mod:`casa_executors.merge`), so
the output is bit-identical whichever is used.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
import warnings
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from casa_executors.errors import ExecutorOptionError
from casa_executors.merge import (
    Group,
    MergeFailed,
    MergeResult,
    Node,
    StoredMerge,
    add_outputs,
    fold,
    held_value,
    merge_held,
    merge_stored,
    node_key,
)
from casa_executors.store import NodeCorrupt, NodeMissing, Store
from casa_executors.task import ChunkResult, TaskBatch, decompress, run_batch, strip_outputs

if TYPE_CHECKING:
    from casa_executors.backends.base import Backend
    from casa_executors.checkpoint import Checkpoint

log = logging.getLogger(__name__)
MERGE_MODES = ("auto", "workers", "driver")
LOST_STATES = ("error", "cancelled")  # "lost": Dask recomputes it from lineage


class Lost(Exception):
    """Outputs the driver counted on are gone (a lost worker, a missing or corrupt file)."""

    def __init__(self, nodes: list[Node], why: str, corrupt: list[str] | None = None) -> None:
        super().__init__(why)
        self.nodes, self.corrupt = nodes, corrupt or []


class Placement:
    name = "driver"
    merges_here = True  # ready groups are merged in the driver process, at once
    tail_here = True  # a merge it can run here: the run's last ones, with nothing else to run (driver._tail)
    # the run's chunk outputs in all, encoded, at most this: the driver may merge all the run's last groups
    # (driver._tail), and an engine's last merges come here (EnginePlacement.tail_here)
    tail_bytes = 16 << 20

    def __init__(self, backend: Backend, compression: int | None) -> None:
        self.backend, self.compression = backend, compression
        self.merge_tasks = 0  # merges run on the engine
        self.merged_here = 0  # merges run in the driver (its own placement, or a fallback)
        self.folded = 0  # nodes merged by the task that ran all their chunks (task.Fold): no merge needed
        self.bytes_to_driver = 0  # output bytes the driver received (all of them, or the root only)
        self.output_bytes = 0  # encoded chunk outputs, wherever they went

    @property
    def small(self) -> bool:
        """Are the run's chunk outputs, encoded, small in all?"""
        return self.output_bytes <= self.tail_bytes

    def info(self) -> dict[str, Any]:
        return {"outputs": self.name, "merges": "driver" if self.merges_here else "workers",
                "merge_tasks": self.merge_tasks, "merged_here": self.merged_here, "folded": self.folded,
                "output_bytes": self.output_bytes, "bytes_to_driver": self.bytes_to_driver}

    def window(self, limit: int) -> int:
        """How many chunk tasks to keep submitted, given the backend's ``limit`` (merges go at once)."""
        return limit

    # chunks
    def submit_chunks(self, batches: list[TaskBatch], priority: int = 0) -> list[tuple[Future, Any]]:
        """Per batch: (the future the driver waits on — its result is the list of ChunkResult —, data to keep).
        ``priority``: ``state.SubmitChunks.priority``, for a backend that ``honours_priority``."""
        return [(f, None) for f in self.backend.submit_many(run_batch, batches, priority)]

    def collect(self, futures: list[Future]) -> list[Any]:
        """The results of finished futures (an exception in place of a failed one's)."""
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except BaseException as exc:
                out.append(exc)
        return out

    def leaf(self, result: ChunkResult, data: Any, position: int, level: int, index: int) -> Any:
        """The handle of a chunk task's output: node ``(level, index)`` of the tree (level > 0: a task that
        covered a whole node, adaptive chunking, or merged its leaves, a Fold)."""
        self.output_bytes += result.output_bytes
        if isinstance(result.output, bytes):
            self.bytes_to_driver += len(result.output)
        return decompress(result.output)

    def peek(self, handle: Any) -> Any:
        """The output behind a node's handle, read without taking it from the tree (for ``on_progress``,
        :mod:`casa_executors.live`): the caller must not change it."""
        return handle

    # merges
    def merge_here(self, group: Group, root: bool = False) -> Any:
        """Merge ``group`` in this process; ``root``: it is the tree's top, whose output the run returns."""
        self.merged_here += 1
        return fold(c.handle for c in group.children)

    def merge_call(self, group: Group) -> tuple[Any, Any]:
        raise NotImplementedError

    def merged(self, group: Group, future: Future) -> Any:
        raise NotImplementedError

    def lost_children(self, group: Group) -> list[Node]:
        """After a merge task failed on the engine: children whose data went with it."""
        return []

    # the end
    def fetch(self, root: Node) -> Any:
        return root.handle

    def forget(self, nodes: list[Node]) -> None:
        """Merged children nobody needs any more."""

    def close(self, finished: bool) -> None:
        pass


DriverPlacement = Placement


class StorePlacement(Placement):
    name = "store"

    def __init__(self, backend: Backend, compression: int | None, store: Store,
                 checkpoint: Checkpoint | None = None, merges_here: bool = False,
                 owned_dir: str | None = None, tail_here: bool = True) -> None:
        super().__init__(backend, compression)
        self.store, self.checkpoint = store, checkpoint
        self.merges_here, self.tail_here = merges_here, tail_here
        self._owned_dir = owned_dir  # a temporary folder we made: removed at the end
        self._root_here: tuple[str, Any] | None = None  # (key, output) of the root, when merged here

    def info(self) -> dict[str, Any]:
        return {**super().info(), "store": self.store.url}

    def submit_chunks(self, batches: list[TaskBatch], priority: int = 0) -> list[tuple[Future, Any]]:
        for batch in batches:
            batch.store = self.store
        return super().submit_chunks(batches, priority)

    def leaf(self, result: ChunkResult, data: Any, position: int, level: int, index: int) -> Any:
        self.output_bytes += result.output_bytes
        return node_key(level, index)  # where the worker wrote it (task._place)

    def peek(self, handle: Any) -> Any:
        return self.store.read_output(handle)[0] if handle is not None else None  # its tag checked first

    def _task(self, group: Group) -> StoredMerge:
        complete = group.complete
        keys = [c.handle for c in group.children]
        # a checkpoint keeps complete nodes until a complete parent stands for them
        delete = [k for k in keys if k is not None
                  and (self.checkpoint is None or complete or not k.startswith("nodes/"))]
        return StoredMerge(self.store, keys, node_key(group.level, group.index, complete), delete, self.compression)

    def merge_call(self, group: Group) -> tuple[Any, Any]:
        self.merge_tasks += 1
        return merge_stored, self._task(group)

    def merge_here(self, group: Group, root: bool = False) -> Any:
        self.merged_here += 1
        task = self._task(group)
        task.keep = root  # written for the checkpoint, and kept: fetch need not read it back
        result = merge_stored(task)
        self.bytes_to_driver += result.read_bytes
        key = self._outcome(group, result)
        if root:
            self._root_here = (key, result.value)
        return key

    def merged(self, group: Group, future: Future) -> Any:
        return self._outcome(group, future.result())

    def _outcome(self, group: Group, result: MergeResult) -> str:
        if not isinstance(result, MergeResult):
            raise RuntimeError(f"a merge task returned {type(result).__name__}, not a MergeResult")
        if result.error is not None:
            raise MergeFailed(result.error.message)
        if result.bad:
            bad = {k for k, _ in result.bad}
            corrupt = [k for k, why in result.bad if "missing" not in why]
            raise Lost([c for c in group.children if c.handle in bad], "; ".join(w for _, w in result.bad), corrupt)
        return result.key

    def fetch(self, root: Node) -> Any:
        if root.handle is None:
            return None
        if self._root_here is not None and self._root_here[0] == root.handle:
            output = self._root_here[1]  # merged here, just written: not read back
        else:
            try:
                output, nbytes = self.store.read_output(root.handle)  # its tag checked before it is unpickled
            except NodeMissing as exc:
                raise Lost([root], str(exc)) from None
            except NodeCorrupt as exc:  # NodeUntrusted included: recomputed, never unpickled
                raise Lost([root], str(exc), [root.handle]) from None
            self.bytes_to_driver += nbytes
        self._root_here = None
        if self.checkpoint is not None and not root.handle.startswith("nodes/"):
            self.store.remove([root.handle])  # a partial root (failed chunks inside) is not a checkpoint
        return output

    def close(self, finished: bool) -> None:
        if self.checkpoint is not None:
            return
        try:
            self.store.wipe()
        except OSError as exc:
            log.warning("could not remove the run's outputs at %s: %s", self.store.url, exc)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)


class Here:
    """A node merged in this process (the run's last merges, ``EnginePlacement.tail_here``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class EnginePlacement(Placement):
    name = "engine"
    merges_here = False
    # the run's last merges come here when the outputs are ``small``: a merge task on Dask is a round trip
    # through its scheduler and the workers holding the children (18-20 ms each here, two or three one after
    # the other at the end of a run), a gather of small children is one; larger outputs stay on the engine
    # (the driver then receives only the root: nothing funnels through it)

    def __init__(self, backend: Backend, compression: int | None, tail_allowed: bool = True) -> None:
        super().__init__(backend, compression)
        self.tail_allowed = tail_allowed  # merge="workers": every merge on the engine, the last ones too

    @property
    def tail_here(self) -> bool:  # type: ignore[override]
        return self.tail_allowed and self.small

    @property
    def small(self) -> bool:  # type: ignore[override]
        # with compression=None outputs stay objects on the engine: their sizes are unknown, so not small
        return self.compression is not None and super().small

    def window(self, limit: int) -> int:
        # the engine queues tasks itself (Dask: on its scheduler), so a deeper window costs the workers
        # nothing and hides the round trip through this process between one chunk and the next
        return 4 * limit

    def submit_chunks(self, batches: list[TaskBatch], priority: int = 0) -> list[tuple[Future, Any]]:
        return self.backend.submit_held(run_batch, strip_outputs, batches, priority)

    def collect(self, futures: list[Future]) -> list[Any]:
        """The metadata of finished batches in one gather (not one round trip each)."""
        finished = [f for f in futures if getattr(f, "status", "") == "finished"]
        got: dict[int, Any] = {}
        if len(finished) > 1:
            try:
                got = {id(f): r for f, r in zip(finished, finished[0].client.gather(finished))}
            except Exception:  # lost meanwhile: one by one below says which
                got = {}
        return [got[id(f)] if id(f) in got else super(EnginePlacement, self).collect([f])[0] for f in futures]

    def leaf(self, result: ChunkResult, data: Any, position: int, level: int, index: int) -> Any:
        self.output_bytes += result.output_bytes
        return (data, position)

    def peek(self, handle: Any) -> Any:
        if handle is None or isinstance(handle, Here):
            return handle.value if handle is not None else None
        future, position = handle if isinstance(handle, tuple) else (handle, None)
        value = future.result()  # a batch's results (a leaf) or a merged node
        return decompress(value[position].output if position is not None else value)

    def merge_call(self, group: Group) -> tuple[Any, Any]:
        self.merge_tasks += 1
        return merge_held, (self.compression, [c.handle for c in group.children])

    def merge_here(self, group: Group, root: bool = False) -> Any:
        """One gather of the children (a batch's results, a merged node) and the same left fold as a merge task."""
        self.merged_here += 1
        children = [c.handle for c in group.children if c.handle is not None]
        held = {id(f): f for f in (h[0] if isinstance(h, tuple) else h for h in children) if not isinstance(f, Here)}
        try:
            got = dict(zip(held, next(iter(held.values())).client.gather(list(held.values())))) if held else {}
        except Exception as exc:  # Dask could not recompute them either: the driver runs the chunks below again
            lost = self.lost_children(group) or [c for c in group.children if c.handle is not None
                                                 and not isinstance(c.handle, Here)]
            raise Lost(lost, f"the engine lost outputs to merge: {type(exc).__name__}: {exc}") from None
        for value in got.values():  # a batch's results hold the outputs of its chunks the tree merges elsewhere too
            sizes = [_size(r.output) for r in value] if isinstance(value, list) else [_size(value)]
            self.bytes_to_driver += sum(sizes)
        values = [h.value if isinstance(h, Here) else held_value((got[id(h[0])], h[1]) if isinstance(h, tuple)
                                                                  else got[id(h)]) for h in children]
        return Here(add_outputs(values))

    def merged(self, group: Group, future: Future) -> Any:
        exc = future.exception()
        if exc is not None:
            raise exc
        return future

    def lost_children(self, group: Group) -> list[Node]:
        return [c for c in group.children if c.handle is not None and _status(c.handle) in LOST_STATES]

    def fetch(self, root: Node) -> Any:
        if root.handle is None:
            return None
        if isinstance(root.handle, Here):
            return root.handle.value
        future = root.handle[0] if isinstance(root.handle, tuple) else root.handle
        try:
            value = future.result()
        except MergeFailed:
            raise
        except Exception as exc:
            raise Lost([root], f"the engine lost the final output: {type(exc).__name__}: {exc}") from None
        if isinstance(root.handle, tuple):  # one chunk only: the leaf is the root
            value = value[root.handle[1]].output
        if isinstance(value, bytes):
            self.bytes_to_driver += len(value)
        return decompress(value)

    def close(self, finished: bool) -> None:
        pass


def _size(output: Any) -> int:
    return len(output) if isinstance(output, bytes) else 0  # an encoded output's size; None: nothing


def _status(handle: Any) -> str:
    future = handle[0] if isinstance(handle, tuple) else handle
    return getattr(future, "status", "finished")


# -- choosing ------------------------------------------------------------------------------------------


def check_merge_option(merge: Any) -> None:
    if merge not in MERGE_MODES:
        raise ExecutorOptionError(f"merge must be one of {', '.join(map(repr, MERGE_MODES))}, got {merge!r}")


def choose(backend: Backend, phase_name: str, compression: int | None, merge: str,
           store_url: str | None, checkpoint: Checkpoint | None) -> Placement:
    """The placement for one executor call (see the module docstring)."""
    if phase_name != "processing":
        return DriverPlacement(backend, compression)  # file metadata: small, and not checkpointed
    here = merge == "driver" or backend.in_process
    tail = merge != "workers"  # "workers": every merge on the engine, the run's last ones too
    if checkpoint is not None:
        _warn_if_unreachable(backend, checkpoint.url, "checkpoint")
        return StorePlacement(backend, compression, checkpoint.store, checkpoint, merges_here=here, tail_here=tail)
    if store_url is not None:
        _warn_if_unreachable(backend, store_url, "store")
        run_folder = Store(store_url).child(f"run-{uuid.uuid4().hex[:12]}").create()
        return StorePlacement(backend, compression, run_folder, merges_here=here, tail_here=tail)
    if here:
        return DriverPlacement(backend, compression)
    if backend.holds_results:
        return EnginePlacement(backend, compression, tail_allowed=tail)
    if backend.workers_local:
        folder = tempfile.mkdtemp(prefix="casa-outputs-")
        return StorePlacement(backend, compression, Store(folder), owned_dir=folder, tail_here=tail)
    message = (f"{backend.name}: its workers may run on other machines, so chunk outputs come back to this "
               "process and merge here; give store='root://host//path' (or a folder every worker and this "
               "process share) to merge them on the workers")
    if merge == "workers":
        raise ExecutorOptionError(message.replace("come back to this process and merge here; ", "cannot merge on "
                                                  "the workers through a folder of this machine; "))
    warnings.warn(message, stacklevel=4)
    return DriverPlacement(backend, compression)


def _warn_if_unreachable(backend: Backend, url: str, option: str) -> None:
    local = "://" not in url or url.startswith("file://")
    if local and not backend.workers_local and not backend.in_process:
        warnings.warn(f"{option}={url!r} is a path on this machine and the workers of {backend.name} may run "
                      "elsewhere: it must be on a disk they share, or use a URL they reach (root://...)",
                      stacklevel=4)
