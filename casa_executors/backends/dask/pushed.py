"""A chunk task's metadata pushed to the driver as a Dask event: one task per chunk, not two.

With outputs kept in worker memory (``outputs.EnginePlacement``) the driver needs each
batch's results without their outputs (events, timings, errors) while the outputs stay
where they are. Fetching them took a second task per batch (``strip_outputs``) and a
gather; on chunks of tens of milliseconds those round trips cost the workers a measurable
share of their time. Instead the task itself publishes its stripped results on the
scheduler's event broker (``Worker.log_event``) before it returns, and the driver's client,
subscribed to the topic, resolves the batch's future when both the event and the task's
completion have arrived.

Order: the worker sends the event on its stream to the scheduler before the task's
completion, the scheduler forwards both to the client in that order, and the client runs
the topic handler before it marks the key finished. Should an event still be missing when
the task is finished (a scheduler that drops events), the batch falls back to a
``strip_outputs`` task, so nothing is lost either way.
"""

from __future__ import annotations

import logging
import pickle
import threading
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from casa_executors.task import ChunkResult, TaskBatch, strip_outputs

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)
# one topic for every driver: the scheduler keeps the last events of each topic
# (distributed.admin.low-level-log-length), so a topic per run would grow with the runs
TOPIC = "casa_executors.results"


@dataclass(frozen=True)
class PushMetadata:
    """Worker side (``TaskBatch.notify``): publish the batch's stripped results under its tag."""

    tag: str

    def __call__(self, results: list[ChunkResult]) -> None:
        from distributed import get_worker

        try:
            get_worker().log_event(TOPIC, {"tag": self.tag, "results": pickle.dumps(strip_outputs(results))})
        except Exception as exc:  # the driver falls back to a strip_outputs task
            log.warning("could not publish a batch's results as an event: %s", exc)


class _Batch(Future):
    """The metadata of one batch (a concurrent future); cancelling it cancels the Dask task."""

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.data = data
        self.results: list[ChunkResult] | None = None  # set by the event (one assignment: no lock needed)

    def cancel(self) -> bool:
        self.data.cancel()
        return super().cancel()


class PushedResults:
    """Client side: the batches in flight by tag, resolved by their events and their tasks.

    A client has one handler per topic, so the backends sharing a client share one of these
    (:meth:`attach`, :meth:`release`); tags are unique, so their batches never mix.
    """

    _shared: ClassVar[weakref.WeakKeyDictionary[Any, PushedResults]] = weakref.WeakKeyDictionary()
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: dict[str, _Batch] = {}
        self._lock = threading.Lock()
        self._users = 0
        self.fallbacks = 0  # batches whose event never came (their metadata took a task)
        client.subscribe_topic(TOPIC, self._on_event)

    @classmethod
    def attach(cls, client: Client) -> PushedResults:
        with cls._shared_lock:
            pushed = cls._shared.get(client)
            if pushed is None:
                pushed = cls._shared[client] = cls(client)
            pushed._users += 1
            return pushed

    def release(self) -> None:
        """One user fewer; the last one unsubscribes (batches still in flight fail as cancelled)."""
        with self._shared_lock:
            self._users -= 1
            if self._users > 0:
                return
            self._shared.pop(self._client, None)
        try:
            self._client.unsubscribe_topic(TOPIC)
        except Exception:  # the client is closing
            pass
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for batch in pending:
            batch.cancel()

    def submit(self, fn: Callable[[TaskBatch], Any], batches: list[TaskBatch],
               priority: int = 0) -> list[tuple[Future, Any]]:
        """Per batch: (the future of its stripped results, the Dask future holding the full ones).
        ``fn`` runs the batch and calls its ``notify`` (``task.run_batch``); ``priority``: Dask's."""
        tags = [uuid.uuid4().hex for _ in batches]
        for batch, tag in zip(batches, tags):
            batch.notify = PushMetadata(tag)
        data = self._client.map(fn, batches, pure=False, retries=0, priority=priority)
        out = []
        for tag, future in zip(tags, data):
            batch = _Batch(future)
            with self._lock:
                self._pending[tag] = batch
            future.add_done_callback(lambda f, tag=tag: self._resolve(tag, f))
            out.append((batch, future))
        return out

    def _on_event(self, event: tuple[float, Any]) -> None:
        msg = event[1]
        batch = self._pending.get(msg.get("tag")) if isinstance(msg, dict) else None
        if batch is None:  # another driver's, or one already resolved
            return
        try:
            results = pickle.loads(msg["results"])
        except Exception as exc:
            log.warning("an unreadable results event (%s); the batch's metadata will take a task", exc)
            return
        batch.results = results
        if batch.data.done():  # not the usual order: the completion came first
            self._resolve(msg["tag"], batch.data)

    def _resolve(self, tag: str, future: Any) -> None:
        with self._lock:
            batch = self._pending.get(tag)
            if batch is not None and batch.done():  # cancelled by the driver: nothing to wait for
                del self._pending[tag]
                return
        if batch is None:
            return
        if future.status != "finished":  # lost, erred or cancelled: the driver sees why
            self._finish(tag, batch, exception=_exception(future))
            return
        if batch.results is not None:
            self._finish(tag, batch, results=batch.results)
            return
        self.fallbacks += 1
        log.info("dask: no results event for a finished batch; fetching its metadata with a task")
        strip = self._client.submit(strip_outputs, future, pure=False, retries=0)
        strip.add_done_callback(lambda f: self._finish(tag, batch, **_outcome(f)))

    def _finish(self, tag: str, batch: _Batch, results: Any = None, exception: BaseException | None = None) -> None:
        with self._lock:
            if self._pending.pop(tag, None) is None:
                return
        if batch.done():  # cancelled meanwhile
            return
        if exception is not None:
            batch.set_exception(exception)
        else:
            batch.set_result(results)


def _exception(future: Any) -> BaseException:
    try:
        exc = future.exception()
    except BaseException as cancelled:  # CancelledError
        return cancelled
    return exc if exc is not None else RuntimeError(f"the task ended as {future.status}")


def _outcome(future: Any) -> dict[str, Any]:
    try:
        return {"results": future.result()}
    except BaseException as exc:
        return {"exception": exc}
