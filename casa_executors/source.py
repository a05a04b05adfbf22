"""An uproot ``Source`` that meters the bytes of a chunk and routes its reads.

The worker-side task opens a :class:`ChunkIO` around each chunk; every file
that uproot opens in that chunk goes through :class:`MeteredSource`, which asks
the chunk's router for the endpoints to try (cache first, then origin), fails
over on error, and counts what it read. Without a router it reads the URL as
given. coffea keeps seeing the user's URL: only the inner source knows the
routed one.

A worker thread keeps its last few files open between chunks (:class:`OpenFiles`):
the source (its connection) and uproot's objects read from it, above all the
TTree's metadata. coffea opens the file and deserialises the TTree (86 branches
in the ADL files) for every chunk, ~40 ms that dominates light queries; with
the TTree kept, the next chunk of the same file starts reading baskets at once.
Sources are closed between runs (a file may be replaced in between); the objects
are kept, and found again only in a file with the same UUID, read through a new
source. Within a run, the small single reads every open makes (the file's header,
its keys) are kept too (:class:`SmallReads`): over a network each is a round trip.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Protocol

import uproot
import uproot.source.chunk
from uproot.source.fsspec import FSSpecSource

from casa_executors import baskets, internals
from casa_executors.errors import AllEndpointsFailed  # also importable from here, its first home
from casa_executors.xcache.tokens import redact

log = logging.getLogger(__name__)


class Router(Protocol):
    def candidates(self, url: str) -> list[tuple[str, str]]: ...

    def secrets(self) -> list[str]: ...

    def describe(self, url: str) -> str: ...


class ChunkIO:
    """What one chunk read: bytes, the endpoint(s) that served it, fail-overs."""

    def __init__(self, router: Router | None = None) -> None:
        self.router = router
        self.bytes_read = 0
        self.endpoints: list[str] = []
        self.failovers: list[str] = []
        self._lock = threading.Lock()

    def candidates(self, url: str) -> list[tuple[str, str]]:
        if self.router is None:
            return [("direct", url)]
        return self.router.candidates(url)

    def secrets(self) -> list[str]:
        return [] if self.router is None else list(self.router.secrets())

    def describe(self, url: str) -> str:
        """``url`` as logs and errors may show it (no token)."""
        return url if self.router is None else self.router.describe(url)

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def served_by(self, label: str) -> None:
        with self._lock:
            if label not in self.endpoints:
                self.endpoints.append(label)

    def failed_over(self, label: str, error: BaseException) -> None:
        with self._lock:
            self.failovers.append(f"{label}: {type(error).__name__}")


_local = threading.local()
_install_lock = threading.Lock()
_install_depth = 0
_previous_handler: Any = None


@contextlib.contextmanager
def metering(io: ChunkIO) -> Iterator[ChunkIO]:
    """Route and meter every ``uproot.open`` of this thread while inside."""
    global _install_depth, _previous_handler
    with _install_lock:
        if _install_depth == 0:
            _previous_handler = uproot.reading.open.defaults["handler"]
            if _previous_handler is None:
                uproot.reading.open.defaults["handler"] = MeteredSource
        _install_depth += 1
    outer = getattr(_local, "io", None)
    _local.io = io
    files = open_files()
    outer_baskets = baskets.active(files.baskets)
    try:
        yield io
    finally:
        _local.io = outer
        baskets.active(outer_baskets)
        files.arrays.clear()  # a chunk's arrays are its own (ChunkArrays)
        with _install_lock:
            _install_depth -= 1
            if _install_depth == 0:
                uproot.reading.open.defaults["handler"] = _previous_handler


OPEN_FILES_PER_THREAD = 8  # files a worker thread keeps open between chunks
SMALL_READ = 64 * 2**10  # a single read up to this size (a file's header, its keys) is kept for the run's next opens
SMALL_READS_PER_THREAD = 16 * 2**20  # bytes of such reads a worker thread keeps
OBJECTS_PER_THREAD = 16  # uproot objects (TTrees, ~1 MB each for 86 branches) it keeps, across runs
ARRAYS_PER_CHUNK = "100 MB"  # uproot's default array cache per file, here per running chunk (ChunkArrays)


class OpenFiles:
    """The files one worker thread keeps open between chunks, least recently used first out.

    uproot.open closes its source when coffea's ``with`` ends; a pooled source stays open
    (``close`` returns it here), so a TTree in :data:`objects` (uproot's object cache, keyed
    by the file's URL, UUID and the object's seek position: :class:`ThreadObjectCache`) stays
    readable in the next chunk.

    Sources are kept within one run only: between runs a file may be replaced, and a source
    kept open would go on reading the old one. The objects outlive their sources: uproot reads
    the UUID of every file it opens through a new source, and a kept TTree is found again only
    under that UUID, so only in the same file (a rewritten file has another); it then reads
    through a new source (:meth:`MeteredSource._reopen`). A worker that runs the same files
    again, call after call, does not read their TTrees again.
    """

    def __init__(self, size: int = OPEN_FILES_PER_THREAD) -> None:
        self.size = size
        self.run = ""  # the run whose files are open
        self.sources: OrderedDict[tuple[str, str], FSSpecSource] = OrderedDict()
        self.objects = uproot.cache.LRUCache(OBJECTS_PER_THREAD)
        self.baskets = baskets.Baskets()  # baskets a chunk's edge cut, for the file's next chunk
        self.arrays = uproot.cache.LRUArrayCache(ARRAYS_PER_CHUNK)  # the running chunk's (ChunkArrays)
        self.read_branches: dict[str, dict[str, None]] = {}  # tree name -> branches this run's chunks read (prefetch)
        self.left_ahead: tuple[str, Any] | None = None  # (run, prefetch.Ahead) a task left for the next one
        self.schemas: dict[tuple, Any] = {}  # this run's NanoEvents schemas, per tree (nanoforms.KeptSchema)
        self.small_reads = SmallReads()  # this run's small reads, per file and byte range

    def open(self, url: str, options: dict[str, Any]) -> FSSpecSource:
        key = (url, repr(sorted(options.items(), key=lambda kv: kv[0])))
        source = self.sources.get(key)
        if source is not None and not source.closed:
            self.sources.move_to_end(key)
            return source
        source = FSSpecSource(url, **options)
        self.sources[key] = source
        while len(self.sources) > self.size:
            _, old = self.sources.popitem(last=False)
            _forget(old)
        return source

    def drop(self, source: uproot.source.chunk.Source) -> None:
        """A source that failed: closed, and never handed out again."""
        for key, s in list(self.sources.items()):
            if s is source:
                del self.sources[key]
        _forget(source)

    def close(self) -> None:
        """Close every source and let go of kept baskets; the objects stay (see the class)."""
        while self.sources:
            _forget(self.sources.popitem()[1])
        self.baskets.clear()
        self.read_branches.clear()
        self.schemas.clear()
        self.small_reads.clear()
        if self.left_ahead is not None:
            self.left_ahead[1].stop()
            self.left_ahead = None


class SmallReads:
    """The small single reads of this run's files, by (file, start, stop): what uproot reads again each
    time coffea opens a file for a chunk (its header, the root directory's keys).

    Each of those is a round trip, and over a network it often waits behind a read of baskets on the
    same connection (an XRootD server answers a client's requests in turn). Kept for the run only, as
    sources are (:class:`OpenFiles`): within a run a file does not change."""

    def __init__(self, limit: int = SMALL_READS_PER_THREAD) -> None:
        self.limit = limit
        self.nbytes = 0
        self._data: dict[tuple[str, int, int], bytes] = {}

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        return self._data.get(key)

    def put(self, key: tuple[str, int, int], data: bytes) -> None:
        if self.nbytes + len(data) > self.limit:
            self.clear()
        self._data[key] = data
        self.nbytes += len(data)

    def forget(self, file_path: str) -> None:
        for key in [k for k in self._data if k[0] == file_path]:
            self.nbytes -= len(self._data.pop(key))

    def clear(self) -> None:
        self._data.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)


def open_files(run: str | None = None) -> OpenFiles:
    """This thread's open files; given the ``run`` a chunk belongs to, the sources of another run are closed."""
    files = getattr(_local, "open_files", None)
    if files is None:
        files = _local.open_files = OpenFiles()
    if run is not None and run != files.run:
        files.close()
        files.run = run
    return files


class ThreadObjectCache(MutableMapping):
    """uproot's ``object_cache`` option: this thread's :class:`OpenFiles` objects (a worker's
    function is shared by its threads; uproot objects are not, so each thread has its own).

    uproot keys objects by the file's UUID and the object's position, which copies of a file
    share; here the key also holds the file's URL, so that a copy is never read through
    another's source (a lookup is made for the file this thread opened last: at worst a miss).
    """

    def _cache(self) -> MutableMapping:
        return open_files().objects

    @staticmethod
    def _key(key: str, value: Any = None) -> tuple[str, str]:
        path = getattr(getattr(value, "file", None), "file_path", None)
        return (path or getattr(_local, "opening", ""), key)

    def __getitem__(self, key: str) -> Any:
        return self._cache()[self._key(key)]

    def __setitem__(self, key: str, value: Any) -> None:
        self._cache()[self._key(key, value)] = value

    def __delitem__(self, key: str) -> None:
        del self._cache()[self._key(key)]

    def __iter__(self):
        return iter([k for _, k in list(self._cache())])

    def __len__(self) -> int:
        return len(self._cache())

    def __reduce__(self):  # a worker's own cache, never this process's contents
        return (ThreadObjectCache, ())


def keep_files_open(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """coffea Runner's chunk function (or its file-metadata function), with uproot objects kept
    between the chunks of a thread while the task allows coffea/uproot internals (``internals.active``).

    Runner opens every chunk's file with its ``uproot_options``; adding ``object_cache``
    there (unless the user gave one) is the only way in without changing coffea
    (:func:`internals.with_uproot_options`). The metadata function reads each file's TTree too: kept,
    the same thread's chunks of that file do not read it again (the driver gives the processing that
    follows the same run: ``Driver._file_run``).
    """
    global _kept_last
    last = _kept_last
    if last is not None and last[0] is function:  # in process, every batch of a run brings the same function
        return last[1]
    kept = internals.with_uproot_options(function, _with_object_cache)
    out = function if kept is None else _WhenAllowed(kept, function)
    _kept_last = (function, out)
    return out


_kept_last: tuple[Any, Any] | None = None  # keep_files_open's last function and what it gave


class _WhenAllowed:
    """``fast`` while this thread's task allows coffea/uproot internals, else ``plain`` (coffea's own)."""

    __slots__ = ("fast", "plain")

    def __init__(self, fast: Callable[[Any], Any], plain: Callable[[Any], Any]) -> None:
        self.fast, self.plain = fast, plain

    def __call__(self, item: Any) -> Any:
        return (self.fast if internals.active() else self.plain)(item)


def _with_object_cache(options: Any) -> dict[str, Any] | None:
    """coffea's ``uproot_options`` with this thread's object cache; None: leave them (a user's cache).

    With an array cache that lasts one chunk (:class:`ChunkArrays`), unless the user gave one: uproot's
    default keeps up to 100 MB of arrays in each opened file, and here that is the file a kept TTree
    holds: memory across chunks, and across runs the same chunks served from memory, which neither a
    fresh worker nor coffea's executors do."""
    if not isinstance(options, dict) or "object_cache" in options:
        return None
    return {"array_cache": ChunkArrays(), **options, "object_cache": ThreadObjectCache()}


class ChunkArrays(MutableMapping):
    """uproot's ``array_cache`` option: the arrays the chunk running on this thread has read, until it ends.

    coffea reads a jagged branch twice per chunk (its offsets and its contents are two buffers of
    NanoEvents' form, each read through the branch); uproot's array cache is what makes the second read
    free, as it does for coffea's own executors, whose files live one chunk. Outside a chunk nothing is
    kept.
    """

    def _cache(self) -> MutableMapping:
        return open_files().arrays

    def __getitem__(self, key: str) -> Any:
        return self._cache()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if getattr(_local, "io", None) is not None:
            self._cache()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._cache()[key]

    def __iter__(self):
        return iter(list(self._cache()))

    def __len__(self) -> int:
        return len(self._cache())

    def __reduce__(self):  # a worker's own, never this process's contents
        return (ChunkArrays, ())


class MeteredSource(uproot.source.chunk.Source):
    """Reads through the first working endpoint of the chunk's router.

    Its endpoint's source is pooled by the thread (:class:`OpenFiles`): closing returns it,
    and reads after that (a TTree kept for the next chunk) are metered to the chunk that
    reads, not to the one that opened the file. A pooled source closed since (another run,
    eviction) is opened again on the next read.
    """

    def __init__(self, file_path: str, **options: Any) -> None:
        super().__init__()
        self._opened_by: ChunkIO = getattr(_local, "io", None) or ChunkIO()
        _local.opening = file_path  # the file this thread's object lookups are for (ThreadObjectCache)
        self._file_path = file_path
        self._options = options
        self._inner: uproot.source.chunk.Source | None = None
        self._requests = [0, 0, 0]  # requests, chunks, bytes
        self._route()

    @property
    def _io(self) -> ChunkIO:
        """The chunk reading now (this thread's), else the one that opened the file."""
        return getattr(_local, "io", None) or self._opened_by

    def _open_next(self) -> None:
        while True:
            if self._inner is not None:
                open_files().drop(self._inner)
                open_files().small_reads.forget(self._file_path)
                self._inner = None
            self._position += 1
            label, url = self._candidates[self._position]
            try:
                self._inner = open_files().open(url, self._options)
                self._label = label
                return
            except Exception as exc:
                self._failed(label, url, exc)

    def _failed(self, label: str, url: str, exc: BaseException) -> None:
        """Note an endpoint's failure; raise once none is left."""
        text = redact(f"{type(exc).__name__}: {exc}".replace(url, self._io.describe(url)), self._io.secrets())
        self._errors.append(f"{label}: {text}")
        if self._position + 1 >= len(self._candidates):
            if len(self._candidates) == 1:
                raise exc
            # from None: the causes' text carries the routed URL, token included
            raise AllEndpointsFailed(self._io.describe(self._file_path), self._errors) from None
        self._io.failed_over(label, exc)
        log.info("reading %s: %s failed (%s); trying %s", self._io.describe(self._file_path), label, text,
                 self._candidates[self._position + 1][0])

    @property
    def _can_fail_over(self) -> bool:
        return self._position + 1 < len(self._candidates)

    def _route(self) -> None:
        """Ask the reading chunk's router for the endpoints, and open the first that works."""
        self._candidates: list[tuple[str, str]] = self._io.candidates(self._file_path)
        self._position = -1
        self._errors: list[str] = []
        self._open_next()

    def _reopen(self) -> None:
        """If the pool closed this file's source (another run, an eviction): route it afresh (the
        reading chunk's token may have been renewed, a failed cache be back)."""
        if self._inner is not None and self._inner.closed:
            self._inner = None
            self._route()

    def _call(self, read):
        self._reopen()
        while True:
            try:
                out = read(self._inner)
                self._io.served_by(self._label)
                return out
            except Exception as exc:
                if len(self._candidates) == 1:
                    raise
                self._failed(self._label, self._candidates[self._position][1], exc)
                self._open_next()

    # uproot's Source counts in private attributes its subclasses set: these are ours, through its public names
    @property
    def num_requests(self) -> int:
        return self._requests[0]

    @property
    def num_requested_chunks(self) -> int:
        return self._requests[1]

    @property
    def num_requested_bytes(self) -> int:
        """The bytes the chunk reading now has read, through any source (coffea's ``savemetrics`` reads
        this as the chunk's ``bytesread``): a kept TTree reads through the source that first opened its
        file, and a read-ahead through its own, so this source's own count would miss them. Outside a
        chunk, this source's own count."""
        io = getattr(_local, "io", None)
        return self._requests[2] if io is None else io.bytes_read

    def _count(self, chunks: int, nbytes: int) -> None:
        r = self._requests
        r[0], r[1], r[2] = r[0] + 1, r[1] + chunks, r[2] + nbytes

    def chunk(self, start: int, stop: int) -> uproot.source.chunk.Chunk:
        small = stop - start <= SMALL_READ
        if small:
            kept = open_files().small_reads.get((self._file_path, start, stop))
            if kept is not None:  # read by an earlier open of this file in this run: no round trip
                return uproot.source.chunk.Chunk.wrap(self, kept, start)
        self._count(1, stop - start)
        self._io.add_bytes(stop - start)
        out = self._call(lambda s: s.chunk(start, stop))
        if small:
            data = out.raw_data  # uproot waits for a single read at once anyway (a header, keys, an object)
            if len(data) == stop - start:
                open_files().small_reads.put((self._file_path, start, stop), bytes(data))
        return out

    def chunks(
        self, ranges: list[tuple[int, int]], notifications: queue.Queue
    ) -> list[uproot.source.chunk.Chunk]:
        n = sum(stop - start for start, stop in ranges)
        self._count(len(ranges), n)
        self._io.add_bytes(n)
        self._reopen()
        if not self._can_fail_over:
            self._io.served_by(self._label)
            return self._inner.chunks(ranges, notifications)

        def read_all(source):
            # wait here, so that a failing endpoint is caught while we can fail over
            local: queue.Queue = queue.Queue()
            out = source.chunks(ranges, local)
            for c in out:
                c.wait()
            return out

        out = self._call(read_all)
        for c in out:
            notifications.put(c)
        return out

    @property
    def file_path(self) -> str:
        return self._file_path

    @property
    def options(self) -> dict[str, Any]:
        """The options the file was opened with (a read-ahead opens its own source with them)."""
        return dict(self._options)

    @property
    def num_bytes(self) -> int:
        return self._call(lambda s: s.num_bytes)

    @property
    def closed(self) -> bool:
        return self._inner is None  # a pooled source closed since is opened again (_reopen)

    def close(self) -> None:
        self.__exit__(None, None, None)

    def __enter__(self) -> MeteredSource:
        return self

    def __exit__(self, exception_type, exception_value, traceback) -> None:
        pass  # the source stays in the thread's OpenFiles, which closes it when it is evicted

    def __repr__(self) -> str:
        return f"<MeteredSource {self._file_path!r} via {self._label}>"


def _forget(source: uproot.source.chunk.Source) -> None:
    """Close a failed endpoint and drop fsspec's cached handles to it.

    fsspec-xrootd keeps open handles per URL; one to a server that died keeps
    failing after the server is back unless it is dropped.
    """
    with contextlib.suppress(Exception):
        source.__exit__(None, None, None)
    internals.drop_cached_handles(source)
