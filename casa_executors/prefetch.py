"""Reads overlapped with compute: while a chunk computes, a background thread reads and decompresses
the baskets of the next chunk.

A task runs its chunks in order on one worker thread (``task.run_batch``). Without this, a chunk's
bytes are fetched and decompressed when coffea first asks for a branch, and nothing computes
meanwhile. Here, when chunk *k* begins, a thread (:class:`Ahead`) reads the baskets chunk *k + 1* will
need in one vector request and decompresses them (zlib, lz4 and zstd release the GIL while they work).
When chunk *k + 1* runs, uproot gets them in place of their byte ranges as they come (:func:`take`,
called by the ``TBranch.entries_to_ranges_or_baskets`` wrapper of :mod:`casa_executors.internals`; a
basket still on its way is waited for, never read twice) and only interprets them. The output is the
same: the same bytes, decompressed by the same uproot code, in another thread.

Which baskets: those of the branches this run's chunks have read on this thread (:func:`seen`), in the
next chunk's file, for its entries, when that file's TTree is in this thread's object cache (a chunk,
the metadata step or an earlier run of this thread read it). A basket the running chunk also reads is
left to it (``casa_executors.baskets`` keeps it for the next chunk), and so is one the thread keeps.
The first chunk a thread runs in a run has nothing read ahead. Which chunk is next: the task's next;
after a task's last, ``TaskBatch.then`` (the driver sets it on a backend that runs one task at a time).
A next chunk whose baskets all begin in the running chunk's entries (baskets longer than chunks) needs
no read: it takes them from the running chunk; the chunk after it is read ahead instead (up to
:data:`SHARED_AHEAD` chunks on).
Over a network, a chunk with nothing read ahead reads its own baskets in one request up front; a local
file's chunk reading less than :data:`LOCAL_MIN_BYTES` is left to uproot.

Bounds: one chunk ahead, one read at a time, at most :data:`READ_AHEAD_BYTES` of decompressed baskets
held for it (planned from each branch's compression ratio, checked basket by basket); what does not fit
is read by uproot as usual. The read is stopped and joined when its chunk ends and when the task ends,
whether its chunks succeeded or failed (a read of ``then`` goes on into the next task on this thread,
and is stopped there, or when the thread's files close at the end of the run). An error while reading
ahead is logged and forgotten: the chunk then reads those baskets itself, and meets the error (with
fail-over) where it would have without read-ahead.

Off with the other optimisations (``internals=False``, ``CASA_EXECUTORS_INTERNALS=0``), or alone with
``CASA_EXECUTORS_READ_AHEAD=0``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from casa_executors import internals
from casa_executors.source import ChunkIO, MeteredSource, Router, open_files
from casa_executors.xcache.tokens import redact

log = logging.getLogger(__name__)

ENV = "CASA_EXECUTORS_READ_AHEAD"
READ_AHEAD_BYTES = 128 * 2**20  # decompressed, for the one chunk read ahead
# a local file's chunk reading less than this (compressed) is left to uproot: its decompression (lz4: a
# millisecond a few MB) costs less than handing it to a thread, above all on a busy machine (ADL Q1 to
# Q4 at chunks of 100k, 0.4 to 3 MB, were blocked longer with read-ahead: docs/reading.md)
LOCAL_MIN_BYTES = 4 * 2**20

# a chunk whose baskets all begin in the running chunk's entries is passed over, up to this many chunks
SHARED_AHEAD = 4
REMOTE_AHEAD = 2  # chunks read ahead at once over a network (each up to READ_AHEAD_BYTES)
STARTED, SHARED, NOTHING = "started", "shared", "nothing"  # what came of starting a read-ahead

_local = threading.local()  # .plan: this thread's ReadAhead; .ready: the running chunk's Ahead


def env_allows() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in internals.OFF


# -- what chunks read: recorded by the entries_to_ranges_or_baskets wrapper -------------------------------

def seen(branch: Any) -> None:
    """A chunk of ours reads ``branch``: remember its name (per tree name) and its file's tree, for this run."""
    try:
        open_files().read_branches.setdefault(branch.tree.name, {})[branch.name] = None
    except Exception:  # not a TTree's branch as expected: nothing to learn
        return


def _tree_of(filename: str, treename: str) -> Any | None:
    """This thread's TTree ``treename`` of ``filename``, if its object cache holds it (a chunk, an earlier
    run or the metadata step of this thread read it: ``source.ThreadObjectCache``)."""
    objects = open_files().objects
    for key in list(objects.keys()):
        if not (isinstance(key, tuple) and key and key[0] == filename):
            continue
        value = objects.get(key)
        if getattr(value, "name", None) == treename and hasattr(value, "branches"):
            return value
    return None


# -- one chunk's baskets, read ahead -----------------------------------------------------------------------

class Ahead:
    """The baskets of one chunk, read and decompressed by a background thread.

    What to read is planned when it is made, on the chunk's thread (:func:`plan`); the thread only
    reads and decompresses."""

    def __init__(self, item: Any, io: ChunkIO, plan: list[tuple[Any, int, tuple[int, int]]], budget: int,
                 after: Ahead | None = None) -> None:
        self.item = item
        self.after = after  # the read before this one (the running chunk's): one read at a time
        self.io = io
        self.plan = plan
        self.budget = budget
        self.baskets: dict[tuple[str, int], Any] = {}  # (branch cache key, basket number) -> basket
        self.nbytes = 0  # decompressed bytes held
        self.error: BaseException | None = None
        self._keys = {(branch.cache_key, num) for branch, num, _ in plan}
        self._ready = threading.Condition()  # a basket added, or the read ended
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="casa-read-ahead", daemon=True)

    @property
    def planned(self) -> int:
        return len(self.plan)

    @property
    def keys(self) -> set[tuple[str, int]]:
        """(branch cache key, basket number) of the baskets it reads."""
        return self._keys

    def start(self) -> Ahead:
        self._thread.start()
        return self

    def wait(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def get(self, key: tuple[str, int]) -> Any | None:
        """The basket under ``key`` (branch cache key, number), waiting for it if it is still to come."""
        with self._ready:
            while key not in self.baskets and key in self._keys and not self._done:
                self._ready.wait()
            return self.baskets.get(key)

    def _run(self) -> None:
        try:
            if self.after is not None:
                self.after.wait()
            self._read()
        except BaseException as exc:  # the chunk reads what is missing itself, and meets the error there
            self.error = exc
            log.info("reading ahead %s failed (%s: %s); the chunk reads it itself",
                     self.io.describe(self.item.filename), type(exc).__name__, redact(str(exc), self.io.secrets()))
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()

    def _read(self) -> None:
        from uproot.models.TBasket import Model_TBasket
        from uproot.source.cursor import Cursor
        from uproot.source.fsspec import FSSpecSource

        plan = self.plan
        if not plan or self._stop.is_set():
            return
        file = plan[0][0].file
        own = file.source
        if not isinstance(own, MeteredSource):  # a user's handler: leave its reads to it
            return
        label, url = self.io.candidates(file.file_path)[0]
        ranges = [where for _, _, where in plan]
        with FSSpecSource(url, **own.options) as source:
            chunks = source.chunks(ranges, queue.Queue())
            self.io.add_bytes(sum(b - a for a, b in ranges))
            self.io.served_by(label)
            for (branch, num, _), chunk in zip(plan, chunks, strict=True):
                if self._stop.is_set():
                    return
                chunk.wait()
                basket = Model_TBasket.read(chunk, Cursor(chunk.start), {"basket_num": num}, file, file, branch)
                if getattr(basket, "basket_num", None) != num:  # uproot reads baskets otherwise now: none
                    self.baskets.clear()
                    return
                nbytes = int(basket.member("fObjlen"))
                if self.nbytes + nbytes > self.budget:  # the estimate was short: the rest is read by the chunk
                    return
                with self._ready:
                    self.baskets[(branch.cache_key, num)] = basket
                    self.nbytes += nbytes
                    self._ready.notify_all()


def plan(item: Any, branches: list[Any], skip: tuple[int, int] | None, budget: int,
         kept: Any = None, pending: set[tuple[Any, int]] | frozenset = frozenset()) -> list[
        tuple[Any, int, tuple[int, int]]]:
    """The baskets of ``branches`` that chunk ``item`` reads, as (branch, number, byte range), in order,
    up to ``budget`` decompressed bytes (estimated from each branch's compression ratio), without those
    that the entries ``skip`` (the running chunk's, in the same file) also cover, nor those in ``kept``
    (the thread's ``baskets.Baskets``): those are the running chunk's to read and keep; nor those in
    ``pending`` ((branch cache key, number) an earlier chunk's read ahead has: that chunk keeps them)."""
    start, stop = item.entrystart, item.entrystop
    out, estimate = [], 0
    for branch in branches:
        offsets = branch.entry_offsets
        try:
            ratio = max(1.0, branch.member("fTotBytes") / max(1, branch.member("fZipBytes")))
        except Exception:
            ratio = 1.0
        # uproot's own function: the wrapper hands over kept baskets only inside a chunk (baskets.current)
        for num, where in branch.entries_to_ranges_or_baskets(start, stop):
            if not (isinstance(where, tuple) and len(where) == 2):
                continue  # embedded in the branch, or already read: nothing to read
            first, last = int(offsets[num]), int(offsets[num + 1])
            if skip is not None and first < skip[1] and skip[0] < last:
                continue
            if kept is not None and (branch.file.file_path, branch.cache_key, num) in kept:
                continue
            if (branch.cache_key, num) in pending:
                continue
            estimate += int((where[1] - where[0]) * ratio)
            if estimate > budget:
                return out
            out.append((branch, num, (int(where[0]), int(where[1]))))
    return out


_handed_lock = threading.Lock()
_handed = [0]  # baskets handed to uproot in this process


def handed() -> int:
    """How many baskets read ahead this process has handed to uproot."""
    return _handed[0]


def take(branch: Any, num: int) -> Any | None:
    """Basket ``num`` of ``branch``, read ahead for the running chunk; None: uproot reads it."""
    ahead = getattr(_local, "ready", None)
    if ahead is None:
        return None
    try:
        if branch.file.file_path != ahead.item.filename:
            return None
    except Exception:
        return None
    basket = ahead.get((branch.cache_key, num))
    if basket is not None:
        with _handed_lock:
            _handed[0] += 1
    return basket


# -- a task's chunks --------------------------------------------------------------------------------------

def _remote(item: Any) -> bool:
    """Whether the chunk's file is read over a network (a URL other than file://)."""
    name = str(getattr(item, "filename", ""))
    return "://" in name and not name.startswith("file://")


def _key(item: Any) -> tuple:
    return tuple(getattr(item, a, None) for a in ("filename", "treename", "entrystart", "entrystop"))


class ReadAhead:
    """Reads each chunk of a task ahead while the one before it runs (see the module).

    ``then``: the chunk the driver will most likely hand this thread after the task (the next chunk, on
    a backend that runs one task at a time: ``TaskBatch.then``). It is read ahead during the task's last
    chunk and handed over to the next task on this thread if that task begins with it (:func:`reading_ahead`).
    """

    def __init__(self, tasks: Sequence[Any], router: Router | None, then: Any = None,
                 budget: int | None = None) -> None:
        self.items = [t.item for t in tasks] + ([then] if then is not None else [])
        self.tasks = len(tasks)
        self.router = router
        self.budget = READ_AHEAD_BYTES if budget is None else budget
        self._position = {id(t): i for i, t in enumerate(tasks)}
        self._aheads: dict[int, Ahead] = {}
        self.started: list[Ahead] = []  # every Ahead this task started (tests, figures)
        self.failed = False  # a chunk raised: nothing is handed over to the next task

    def adopt(self, ahead: Ahead) -> bool:
        """Take over an Ahead a task before read for this task's first chunk, if it is that chunk."""
        if self.items and self.tasks and _key(ahead.item) == _key(self.items[0]):
            self._aheads[0] = ahead
            return True
        return False

    def io_for(self, task: Any) -> ChunkIO:
        """The chunk's ChunkIO: the one its bytes read ahead were metered to, else a new one."""
        ahead = self._aheads.get(self._position.get(id(task), -1))
        return ahead.io if ahead is not None else ChunkIO(self.router)

    @contextlib.contextmanager
    def chunk(self, task: Any, io: ChunkIO | None = None) -> Iterator[Ahead | None]:
        """While ``task`` runs: its baskets read ahead are handed to uproot, and the next chunk's are read
        (from its start if the branches to read are known, else once it has read them)."""
        position = self._position.get(id(task))
        ahead = None if position is None else self._aheads.pop(position, None)
        if ahead is None and position is not None and _remote(task.item):
            # nothing read ahead: over a network, the chunk's baskets in one request, not one per branch
            self._start(position, None, io)
            ahead = self._aheads.pop(position, None)
        _local.ready = ahead  # its baskets are handed over as they come (Ahead.get)
        if position is not None:
            self._start_next(position, task.item, after=ahead)
        try:
            yield ahead
        except BaseException:
            self.failed = True
            raise
        finally:
            _local.ready = None
            if ahead is not None:
                ahead.stop()  # what the chunk did not take is not wanted
        if position is not None and not self.failed:
            self._start_next(position, task.item)  # the first chunk of a run learns the branches only as it reads

    def _start_next(self, position: int, running: Any, after: Ahead | None = None) -> None:
        """Read ahead the first chunk after ``position`` with baskets of its own (over a network, the first
        :data:`REMOTE_AHEAD`, read at once): a chunk whose baskets all begin in the running chunk's entries (a
        basket longer than a chunk) gets them from the running chunk (``casa_executors.baskets``) and ends at
        once, so the one after it is what to read now.

        Over a network a read is mostly waiting (a round trip, then one request's stream), so reads there
        overlap; from a local disk they follow one another (``after``): more at once would only compete."""
        remote = _remote(running)
        depth = REMOTE_AHEAD if remote else 1
        started = shared = 0
        for ahead in range(position + 1, len(self.items)):
            outcome = self._start(ahead, running, after=after if not remote else None)
            if outcome == STARTED:
                started += 1
                if started >= depth:
                    return
            elif outcome == SHARED and shared < SHARED_AHEAD:
                shared += 1
            else:
                return

    def _start(self, position: int, running: Any, io: ChunkIO | None = None, after: Ahead | None = None) -> str:
        """Start reading chunk ``position`` ahead; what came of it: STARTED, SHARED (its baskets are the running
        chunk's, or kept) or NOTHING."""
        if position >= len(self.items):
            return NOTHING
        if position in self._aheads:
            return STARTED
        item = self.items[position]
        filename, treename = getattr(item, "filename", None), getattr(item, "treename", None)
        start, stop = getattr(item, "entrystart", None), getattr(item, "entrystop", None)
        if filename is None or treename is None or start is None or stop is None or stop <= start:
            return NOTHING
        names = open_files().read_branches.get(treename)
        tree = _tree_of(filename, treename) if names else None
        if tree is None:
            return NOTHING
        branches = []
        for name in names:
            try:
                branches.append(tree[name])
            except Exception:
                continue
        if not branches:
            return NOTHING
        skip = None
        if getattr(running, "filename", None) == filename and getattr(running, "entrystart", None) is not None:
            skip = (running.entrystart, running.entrystop)
        pending = {key for a in self._aheads.values() if a.item.filename == filename for key in a.keys}
        try:
            todo = plan(item, branches, skip, self.budget, open_files().baskets, pending)
        except Exception as exc:  # a tree not as expected: the chunk reads as uproot does
            log.info("cannot plan a read-ahead of %s: %s: %s", filename, type(exc).__name__, exc)
            return NOTHING
        if not todo:
            return SHARED if skip is not None or pending else NOTHING
        if not _remote(item) and sum(b - a for _, _, (a, b) in todo) < LOCAL_MIN_BYTES:
            return NOTHING
        ahead = Ahead(item, io or ChunkIO(self.router), todo, self.budget, after)
        self._aheads[position] = ahead
        self.started.append(ahead)
        ahead.start()
        return STARTED

    def close(self) -> Ahead | None:
        """Stop and join every read still running; the one for ``then`` is returned instead, still running,
        unless a chunk failed."""
        then = None if self.failed else self._aheads.pop(self.tasks, None)
        while self._aheads:
            _, ahead = self._aheads.popitem()
            ahead.stop()
        _local.ready = None
        return then


@contextlib.contextmanager
def reading_ahead(tasks: Sequence[Any], router: Router | None, on: bool, run: str = "",
                  then: Any = None) -> Iterator[ReadAhead | None]:
    """For the task running on this thread: a :class:`ReadAhead` when ``on`` (the task's internals), the
    environment allows it and uproot's basket hook is in place; else None (uproot reads as it does).

    An Ahead a task before left for this thread (its ``then``) is taken over if this task, of the same
    run, begins with that chunk, and stopped otherwise."""
    files = open_files()
    left, files.left_ahead = files.left_ahead, None
    if not (on and env_allows() and "TBranch.entries_to_ranges_or_baskets" in internals.installed()):
        if left is not None:
            left[1].stop()
        yield None
        return
    plan = ReadAhead(tasks, router, then)
    if left is not None and not (left[0] == run and plan.adopt(left[1])):
        left[1].stop()
    outer = getattr(_local, "plan", None)
    _local.plan = plan
    try:
        yield plan
    finally:
        _local.plan = outer
        ahead = plan.close()
        if ahead is not None:  # stopped by the next task, or when the thread's files close (the run ends)
            open_files().left_ahead = (run, ahead)


def current() -> ReadAhead | None:
    """The :class:`ReadAhead` of the task running on this thread, if any."""
    return getattr(_local, "plan", None)
