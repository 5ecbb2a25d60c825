"""How events become bytes in PostgreSQL, and how a database URL becomes store settings.

Events are serialised with orjson. orjson writes datetimes and UUIDs natively but reads
them back as strings, so the mapper restores them from the event class's field types
rather than tagging values inline: tagging (as the library's JSONTranscoder does with
`{"_type_": ..., "_data_": ...}`) would misread a client's `data` that happens to have
that shape. Type-directed decoding has no such collision, so every field round-trips
exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import typing
from collections.abc import Iterator
from datetime import datetime
from functools import cache
from typing import Any
from uuid import UUID

import orjson
import psycopg
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import (
    ApplicationRecorder,
    IntegrityError,
    InterfaceError,
    Mapper,
    OperationalError,
    StoredEvent,
    Subscription,
    Transcoder,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresSubscription
from eventsourcing.utils import resolve_topic
from psycopg import Connection, Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier
from psycopg_pool import PoolTimeout

from ledger import chain, secrets
from ledger.leases import LeaseBook, ddl


class OrjsonTranscoder(Transcoder):
    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj)

    def decode(self, data: bytes) -> Any:
        return orjson.loads(data)


_NONE = type(None)


@cache
def _typed_fields(event_class: type) -> dict[str, type]:
    """The fields of an event class that JSON cannot carry as themselves (datetime, UUID)."""
    typed: dict[str, type] = {}
    for name, hint in typing.get_type_hints(event_class).items():
        candidates = [a for a in typing.get_args(hint) if a is not _NONE] or [hint]
        for special in (datetime, UUID):
            if special in candidates:
                typed[name] = special
    return typed


def _restore_typed(event_class: type, state: dict[str, Any]) -> None:
    """Turn the ISO strings of `event_class`'s datetime and UUID fields back into those."""
    for name, kind in _typed_fields(event_class).items():
        value = state.get(name)
        if isinstance(value, str):
            state[name] = datetime.fromisoformat(value) if kind is datetime else UUID(value)


def stored_fields(topic: str, state: bytes) -> tuple[str, dict[str, Any]]:
    """The event class's name and the fields of a stored event (its timestamp among them,
    not its stream or version), as `EventMapper.to_domain_event` would give them (the same
    upcasting, datetimes and UUIDs restored) but without making the event object: for the
    log's followers, which read every event and keep only its fields. This mapper has no
    cipher or compressor (the store is configured without either)."""
    cls = resolve_topic(topic)
    fields: dict[str, Any] = orjson.loads(state)
    class_version = getattr(cls, "class_version", 1)
    version = fields.pop("class_version", 1)
    while version < class_version:
        getattr(cls, f"upcast_v{version}_v{version + 1}")(fields)
        version += 1
    _restore_typed(cls, fields)
    fields.pop("originator_topic", None)
    return cls.__name__, fields


class EventMapper(Mapper[UUID]):
    """A Mapper that restores datetimes and UUIDs from the event class's type hints."""

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[UUID]:
        # The library's mapper does decryption, decompression, upcasting (class_version)
        # and id conversion; we only restore the typed fields afterwards. Upcasters
        # therefore see datetimes as ISO strings.
        event = super().to_domain_event(stored_event)
        _restore_typed(type(event), event.__dict__)
        return event


log = logging.getLogger(__name__)

# Above this many bytes of events in one save, psycopg's pipeline mode is not used.
PIPELINE_LIMIT = 64 * 1024
# Writes of a save whose connection broke before it was stored (each after a look), and
# the time after which no further one is begun: a request learns of an outage in seconds.
AMBIGUOUS_TRIES = 3
SAVE_SECONDS = 4.0


def unreachable(error: BaseException) -> bool:
    """Whether a store error means no connection could be had (the pool waited in vain):
    nothing was sent, and trying again at once would only wait again."""
    return isinstance(error.__cause__, PoolTimeout)


class LedgerRecorder(PostgresApplicationRecorder):
    """The library's recorder, plus the attempt leases kept in step with the events (in
    the same transaction; ledger.leases), and a large save written without pipeline mode.

    psycopg (3.3.9, C and Python alike) can deadlock in a pipeline whose queued data is
    more than the socket takes at once: `pipeline_communicate` stops writing once every
    command is queued even when libpq's output buffer is not yet flushed, and then waits
    for results, while the server waits for the rest of the query (its backend sits in
    ClientRead). With a Unix socket that happens from a few hundred KB (one task's output
    at its 1 MiB cap wedged the embedded default); over TCP from a few MB (a group commit of
    several large outputs). psycopg issue #685 was a similar case, closed in 2024. Without
    the pipeline the same statements take a round trip each, in blocking mode, which
    sends a query whole."""

    lease_book: LeaseBook | None = None  # set by the Ledger

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Every event's digest and chain are written by the insert itself (ledger.chain).
        self.insert_events_statement = chain.insert_statement(
            self.datastore.schema, self.events_table_name, self.stored_event_type_name
        )
        # The calls under way: thread -> (its connection, when it began). See
        # break_stalled. Every connection the store hands out is watched, from the pool's
        # check of it (a query too, which a frozen server never answers) to its return.
        self._in_flight: dict[int, tuple[Connection[Any], float]] = {}
        datastore = self.datastore
        library_connection = datastore.get_connection
        pool = datastore.pool
        library_check = pool._check  # psycopg_pool keeps the check callback here

        @contextlib.contextmanager
        def watched() -> Iterator[Connection[DictRow]]:
            with library_connection() as conn:
                if getattr(_waits_by_design, "listening", False):
                    yield conn
                    return
                with self._watching(conn):
                    yield conn

        def checked(conn: Connection[Any]) -> None:
            if library_check is not None:
                with self._watching(conn):
                    library_check(conn)

        datastore.get_connection = watched  # type: ignore[method-assign]
        pool._check = checked

    def subscribe(
        self, gt: int | None = None, topics: typing.Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return _ListeningSubscription(recorder=self, gt=gt, topics=topics)

    @contextlib.contextmanager
    def _watching(self, conn: Connection[Any]) -> Iterator[None]:
        thread = threading.get_ident()
        self._in_flight[thread] = (conn, time.monotonic())
        try:
            yield
        finally:
            self._in_flight.pop(thread, None)

    def create_table(self) -> None:
        super().create_table()
        schema, table = self.datastore.schema, self.events_table_name
        with self.datastore.get_connection() as conn:
            statements = [
                *ddl(schema),
                *secrets.ddl(schema),
                *chain.ddl(schema, table, self.stored_event_type_name),
            ]
            for statement in statements:
                conn.execute(statement)
            chained = chain.backfill(conn, schema, table)
        if chained:
            log.warning(
                "chained %d events stored before the hash chain existed",
                chained,
                extra={"events": chained},
            )

    def _insert_stored_events(
        self, curs: Cursor[DictRow], stored_events: typing.Sequence[StoredEvent], **_: Any
    ) -> None:
        """The library's insert (table lock, NOTIFY, one statement), with each event's
        digest computed here, outside the lock, for the chain (ledger.chain)."""
        self._lock_table(curs)
        self._notify_channel(curs)
        events = [
            self.construct_pg_stored_event(
                event.originator_id, event.originator_version, event.topic, event.state
            )
            for event in stored_events
        ]
        digests = [
            chain.digest(
                typing.cast(UUID, event.originator_id),
                event.originator_version,
                event.topic,
                event.state,
            )
            for event in stored_events
        ]
        curs.execute(self.insert_events_statement, (events, digests))

    def _fetch_ids_after_insert_events(
        self, curs: Cursor[DictRow], stored_events: typing.Sequence[StoredEvent], **_: Any
    ) -> typing.Sequence[int] | None:
        # The library's, less its check that the statement was an INSERT (ours is a
        # SELECT of the insert function).
        return [row["notification_id"] for row in curs.fetchall()]

    def insert_events(
        self, stored_events: typing.Sequence[StoredEvent], **kwargs: Any
    ) -> typing.Sequence[int] | None:
        """Write the events in one transaction. When the connection breaks meanwhile, the
        commit may or may not have happened (an ambiguous commit): look. Stored, the save
        succeeded (the library would write them again and report the duplicate key as a
        conflict, which turned a stored submission into a 503); not stored, write again,
        a few times and within SAVE_SECONDS, then give up with the connection's error.
        No connection at all (the pool waited in vain) means nothing was sent: that
        error is raised at once."""
        give_up_at = time.monotonic() + SAVE_SECONDS
        for attempt in range(1, AMBIGUOUS_TRIES + 1):
            try:
                return self._insert_once(stored_events, **kwargs)
            except IntegrityError as conflict:
                # Written again after a break whose look could not reach the server:
                # the duplicate key may be the first write's own events.
                if attempt > 1 and self._already_stored(stored_events, conflict):
                    return None
                raise
            except (OperationalError, InterfaceError) as broken:
                if unreachable(broken):
                    raise
                try:
                    if self._already_stored(stored_events, broken):
                        return None
                except (OperationalError, InterfaceError):
                    pass  # the store is still out of reach: as if not stored
                if attempt == AMBIGUOUS_TRIES or time.monotonic() >= give_up_at:
                    raise
                time.sleep(0.1 * attempt)
        return None  # (not reached)

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> typing.Sequence[StoredEvent]:
        """The library's read, retried once on a broken connection instead of ten times
        (with 5 s waits for a connection, a request took a minute to fail in an outage)."""
        read = PostgresApplicationRecorder.select_events.__wrapped__
        try:
            events: typing.Sequence[StoredEvent] = read(
                self, originator_id, gt=gt, lte=lte, desc=desc, limit=limit
            )
        except (OperationalError, InterfaceError) as broken:
            if unreachable(broken):
                raise
            events = read(self, originator_id, gt=gt, lte=lte, desc=desc, limit=limit)
        return events

    def _insert_once(
        self, stored_events: typing.Sequence[StoredEvent], **kwargs: Any
    ) -> typing.Sequence[int] | None:
        try:
            if sum(len(event.state) for event in stored_events) <= PIPELINE_LIMIT:
                # The library's own method without its retry decorator (see insert_events).
                insert = PostgresApplicationRecorder.insert_events.__wrapped__
                ids: typing.Sequence[int] | None = insert(self, stored_events, **kwargs)
                return ids
            with (
                self.datastore.get_connection() as conn,
                conn.transaction(),
                conn.cursor() as curs,
            ):
                self._insert_events(curs, stored_events, **kwargs)
                if not stored_events:
                    return None
                self._insert_stored_events(curs, stored_events, **kwargs)
                return self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)
        except IntegrityError as error:
            if self.lease_book is None:
                raise
            raise LeaseBook.translate(error) from error.__cause__

    def _already_stored(self, stored_events: typing.Sequence[StoredEvent], met: Exception) -> bool:
        """Whether an earlier write of this save, whose answer was lost, stored it: then
        the save succeeded, whatever this write met."""
        if not stored_events or not self._stored(stored_events[-1]):
            return False
        log.warning(
            "a save whose answer was lost is stored: it succeeded",
            extra={"events": len(stored_events), "error": str(met)},
        )
        return True

    def _stored(self, event: StoredEvent) -> bool:
        """Whether this very event (same stream, version and bytes) is in the store."""
        statement = SQL(
            "SELECT state FROM {} WHERE originator_id = %s AND originator_version = %s"
        ).format(Identifier(self.datastore.schema, self.events_table_name))
        with self.datastore.get_connection() as conn:
            row = conn.execute(
                statement, (event.originator_id, event.originator_version)
            ).fetchone()
        return row is not None and bytes(row["state"]) == bytes(event.state)

    def _insert_events(
        self, curs: Cursor[DictRow], stored_events: typing.Sequence[StoredEvent], **_: Any
    ) -> None:
        """The leases' writes, first in the save's transaction, and answered before the
        event store's statements are sent (a nested pipeline block syncs on exit; outside
        a pipeline it is one of its own).

        A statement that fails in a pipeline aborts those queued behind it, and psycopg
        (3.3.9) then reports "pipeline aborted" rather than the failure: queued before the
        insert, a lease refused came back as that instead of a lost lease; queued after
        it, a version race did. Answered on their own, each error is itself."""
        if self.lease_book is not None:
            with curs.connection.pipeline():
                self.lease_book.write(curs, stored_events)

    def stalled_for(self) -> float:
        """How long the oldest call under way has been waiting for the store (0: none)."""
        now = time.monotonic()
        return max((now - began for _, began in list(self._in_flight.values())), default=0.0)

    def break_stalled(self, after: float) -> None:
        """Break the connection of every call that has waited more than `after` seconds
        for the store: a server that stopped answering (frozen, or a pipeline deadlock
        like the one above) would otherwise hold that call for ever; a save, every save
        queued behind it in the group commit too, and the events table's lock. The
        call's thread then sees a broken connection: a save looks whether its events were
        stored and writes again or fails (insert_events). The server's session is ended
        too, if the server answers a new connection, so the locks it held are let go."""
        now = time.monotonic()
        for thread, (conn, began) in list(self._in_flight.items()):
            if now - began <= after or self._in_flight.get(thread, (None,))[0] is not conn:
                continue
            backend = conn.info.backend_pid
            log.error(
                "a call to the event store had no answer for %.1f s: breaking its connection "
                "(a save is written again or its callers get 503). If this repeats, "
                "look at PostgreSQL: pg_stat_activity for backend %s, locks, disk, network",
                now - began,
                backend,
                extra={"backend_pid": backend, "seconds": round(now - began, 1)},
            )
            _shut(conn)
            threading.Thread(
                target=self._end_session, args=(backend,), name="end-stalled", daemon=True
            ).start()

    def _end_session(self, backend: int) -> None:
        """End a stalled call's server session, on a connection of its own (the pool's
        may all be stalled too), in a thread of its own (this one may stall as well)."""
        pool = self.datastore.pool
        # The library's pool takes plain values (psycopg_pool also allows callables).
        conninfo = typing.cast(str, pool.conninfo)
        params = typing.cast(dict[str, Any], pool.kwargs or {})
        try:
            with psycopg.connect(conninfo, **params) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
        except psycopg.Error as error:
            log.warning(
                "could not end the stalled call's server session",
                extra={"backend_pid": backend, "error": str(error)},
            )


# Set in a thread whose connection waits by design (a LISTEN): the stall watch leaves it be.
_waits_by_design = threading.local()


class _ListeningSubscription(PostgresSubscription):
    """The library's subscription, whose LISTEN connection is held for its whole life."""

    def _listen(self) -> None:
        _waits_by_design.listening = True
        super()._listen()


def _shut(conn: Connection[Any]) -> None:
    """Shut the connection's socket down, under the thread blocked on it: its wait ends
    at once with an error (closing the connection from here would not wake it)."""
    try:
        fd = os.dup(conn.fileno())
    except (OSError, psycopg.Error):
        return  # already closed
    with socket.socket(fileno=fd) as sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
