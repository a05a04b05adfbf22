"""A basket that straddles a chunk's edge is read and decompressed once per worker thread, not once per chunk.

uproot reads and decompresses every basket a chunk's entries touch. When a chunk ends inside a basket
(chunks of 100k events on files written in baskets of 200k, or any chunking that does not follow the
file's clusters), the next chunk of the file reads and decompresses that basket again: ADL Q7 at chunks
of 100k read 672 MB from files of 373 MB, where RDataFrame, reading each file in one pass, reads each
basket once. uproot 5 has no basket cache (uproot 3's ``basketcache`` is gone), but its
``TBranch.entries_to_ranges_or_baskets`` may hand back a basket already read in place of its byte range
(it does so for embedded baskets), and uproot then only interprets it. So, while one of our chunks runs
on a thread (``source.metering``) with the optimisations on (:mod:`casa_executors.internals` wraps those
two uproot functions then, after checking them, and calls :func:`kept` and :func:`read`):

* a basket the chunk's entries cover only in part is kept when it is read (``Model_TBasket.read`` is
  wrapped: it is read in uproot's own batch of ranges, one request with the chunk's other baskets);
* a later chunk of the same file on that thread gets the kept basket instead of its range, and the
  basket is let go once chunks have had all its entries;
* kept baskets are this thread's :class:`source.OpenFiles`'s: they go when the run ends or another run
  begins there, and at most :data:`BASKET_BYTES_PER_THREAD` of them, oldest out first.

Baskets are keyed by the file's URL and the branch's uproot cache key (the file's UUID, the tree, the
branch), so a copy of a file (same UUID, another URL) is always read from its own source. Baskets a
chunk covers whole are never kept: no other chunk of the run reads them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy

BASKET_BYTES_PER_THREAD = 256 * 2**20  # decompressed; ADL Q7 at chunks of 100k keeps at most 28 MB (12 baskets)

_local = threading.local()  # .baskets: the running chunk's store; .wanted: baskets to keep once read


def _size(basket: Any) -> int:
    offsets = basket.byte_offsets
    return int(basket.member("fObjlen")) + (0 if offsets is None else offsets.nbytes)


class Baskets:
    """One thread's kept baskets, each with the number of its entries no chunk has had yet."""

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit  # None: BASKET_BYTES_PER_THREAD, as it is when a basket comes
        self.nbytes = 0
        self._kept: OrderedDict[tuple, tuple[Any, int, int]] = OrderedDict()  # key -> basket, entries left, bytes
        self._spent: list[tuple] = []  # all entries had: let go when the chunk ends (it may read the branch again)

    @property
    def limit(self) -> int:
        return BASKET_BYTES_PER_THREAD if self._limit is None else self._limit

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, key: tuple, entries: int) -> Any | None:
        """The kept basket under ``key`` for a chunk that reads ``entries`` of it not counted yet."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        basket, left, nbytes = kept
        if entries:
            left -= entries
            self._kept[key] = (basket, left, nbytes)
            if left <= 0:
                self._spent.append(key)
        self._kept.move_to_end(key)
        return basket

    def __contains__(self, key: tuple) -> bool:
        return key in self._kept

    def chunk_ended(self) -> None:
        """Let go of the baskets whose entries chunks have all had."""
        for key in self._spent:
            kept = self._kept.pop(key, None)
            if kept is not None:
                self.nbytes -= kept[2]
        self._spent.clear()

    def keep(self, key: tuple, basket: Any, entries_left: int) -> None:
        """Keep a basket some of whose entries (``entries_left`` > 0) the chunk reading it does not read."""
        nbytes = _size(basket)
        if nbytes > self.limit or key in self._kept:
            return
        self._kept[key] = (basket, entries_left, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.limit:
            _, (_, _, old) = self._kept.popitem(last=False)
            self.nbytes -= old

    def clear(self) -> None:
        self._kept.clear()
        self._spent.clear()
        self.nbytes = 0


def active(baskets: Baskets | None) -> Baskets | None:
    """Make ``baskets`` this thread's store (None: none, uproot reads as it always does) for a chunk that
    begins or ends; the one before."""
    outer = getattr(_local, "baskets", None)
    if outer is not None:
        outer.chunk_ended()
    _local.baskets = baskets
    _local.wanted = {}  # (branch, basket number) -> key, entries left: to keep once read
    _local.had = set()  # keys this chunk has counted (coffea may read a branch twice: offsets, contents)
    return outer


def current() -> Baskets | None:
    """This thread's store, if a chunk of ours is running on it (:func:`active`)."""
    return getattr(_local, "baskets", None)


def kept(branch: Any, num: int, first: int, last: int, entry_start: int, entry_stop: int) -> Any | None:
    """The kept basket ``num`` (entries ``first`` to ``last``) of ``branch`` for a chunk reading entries
    ``entry_start`` to ``entry_stop``; None: uproot reads it (and it is kept then if the chunk has only
    part of it: :func:`read`)."""
    baskets = current()
    if baskets is None or (entry_start <= first and last <= entry_stop):
        return None  # this chunk's alone: never kept
    entries = min(last, entry_stop) - max(first, entry_start)
    key = (branch.file.file_path, branch.cache_key, num)
    basket = baskets.take(key, 0 if key in _local.had else entries)
    _local.had.add(key)
    if basket is None:  # kept when uproot has read it, on this thread (coffea's TrivialExecutor)
        _local.wanted[(id(branch), num)] = (key, last - first - entries)
    return basket


def read(branch: Any, basket: Any, chunk: Any) -> None:
    """uproot has read ``basket`` of ``branch`` from ``chunk``: keep it if a chunk wanted it (:func:`kept`)."""
    wanted = getattr(_local, "wanted", None)
    # an uncompressed basket's data is a view of what was read: never of a memory map kept past its file
    if not wanted or isinstance(getattr(chunk, "raw_data", None), numpy.memmap):
        return
    want = wanted.pop((id(branch), basket.basket_num), None)
    baskets = current()
    if want is not None and baskets is not None:
        baskets.keep(want[0], basket, want[1])
