"""Group commit: the events of concurrent saves go to the store in one transaction.

eventsourcing's insert locks the whole events table (EXCLUSIVE) for each transaction, so
one save at a time is all the store does, whatever the number of writers (~600-800
saves/s on a 2-core machine). Writing the events of many tasks in one transaction costs
little more than writing one task's: new aggregates from one thread, 1 per save ~760/s,
10 per save ~5,100/s, 50 ~11,600/s (eventsourcing 9.5.6, PostgreSQL 15, 2026-11).
`python -m bench ledger_writes` measures the ledger's saves/s with 1 and 4 writers
against the library's own application saving one aggregate per transaction.

Leader/follower, as in database logs: a thread that saves while no write is in flight
writes at once (no added latency for a lone writer); saves arriving meanwhile queue up,
and when the write ends, the first of them writes the whole queue in one transaction.

Optimistic concurrency is kept: each aggregate's events still carry their versions, and
the (stream, version) primary key still refuses a stale write. A refused batch does not
say which of its writes was stale, so each write of that batch is then tried alone, and
only the stale ones get the IntegrityError their callers handle (reload and decide again).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eventsourcing.persistence import IntegrityError, StoredEvent

Insert = Callable[[Sequence[StoredEvent]], object]


@dataclass(eq=False)
class _Write:
    events: Sequence[StoredEvent]
    wake: threading.Event = field(default_factory=threading.Event)
    done: bool = False  # woken while not done: promoted to write the queue next
    error: BaseException | None = None


class GroupCommit:
    """Serialises writers into batches; see the module docstring."""

    def __init__(self, insert: Insert, *, max_batch_events: int = 2000) -> None:
        self._insert = insert
        self.max_batch_events = max_batch_events
        self._lock = threading.Lock()
        self._queue: deque[_Write] = deque()
        self._writing = False
        # Observability: transactions written and writes they carried.
        self.transactions = 0
        self.writes = 0
        self.split_batches = 0  # batches refused as a whole and retried write by write

    def save(self, events: Sequence[StoredEvent]) -> None:
        """Write `events` (one aggregate's, or several that must commit together)
        atomically; raises IntegrityError when one of them is stale."""
        (error,) = self.save_many([events])
        if error is not None:
            raise _fresh(error)

    def save_many(self, writes: Sequence[Sequence[StoredEvent]]) -> list[BaseException | None]:
        """Write each of `writes` atomically, all in as few transactions as fit; what
        each write met: None when stored, else its error (IntegrityError: stale)."""
        queued = [_Write(events) for events in writes if events]
        if queued:
            with self._lock:
                self._queue.extend(queued)
                lead = not self._writing
                if lead:
                    self._writing = True
            if lead:
                self._lead()
            for write in queued:  # in queue order: each is written, or promoted to lead
                if not write.done:
                    write.wake.wait()
                    if not write.done:
                        self._lead()
        results = iter(queued)
        return [next(results).error if events else None for events in writes]

    def _lead(self) -> None:
        """Write one batch from the head of the queue, then hand over."""
        with self._lock:
            batch: list[_Write] = []
            size = 0
            while self._queue:
                if batch and size + len(self._queue[0].events) > self.max_batch_events:
                    break
                head = self._queue.popleft()
                batch.append(head)
                size += len(head.events)
        try:
            self._write(batch)
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._writing = False
            for write in batch:
                write.done = True
                write.wake.set()
            if successor is not None:
                successor.wake.set()

    def _write(self, batch: list[_Write]) -> None:
        self.transactions += 1
        self.writes += len(batch)
        try:
            self._insert([event for write in batch for event in write.events])
        except IntegrityError as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            self.split_batches += 1
            for write in batch:
                self.transactions += 1
                try:
                    self._insert(write.events)
                except BaseException as single:  # noqa: BLE001 - handed to its own caller
                    write.error = single
        except BaseException as error:  # noqa: BLE001 - every caller of the batch learns it
            for write in batch:
                write.error = error


def _fresh(error: BaseException) -> BaseException:
    """A new exception like `error`, so that threads raising it do not share one
    traceback; the shared one is its cause."""
    try:
        copy = type(error)(*error.args)
    except Exception:  # noqa: BLE001 - an exception type with an unusual constructor
        return error
    copy.__cause__ = error
    return copy
