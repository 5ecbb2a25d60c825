"""The event store the ledger writes through: the library's application over
PostgreSQL (or its in-memory twin), with our bounds, our schema lock, one-query batch
loads, group commit, and every store error given the ledger's meaning."""

from __future__ import annotations

import contextlib
import logging
import threading
import typing
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar
from uuid import UUID

import psycopg
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    ApplicationRecorder,
    IntegrityError,
    Mapper,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresFactory
from eventsourcing.utils import Environment, EnvType
from psycopg.sql import SQL, Identifier

from ledger.connections import DEFAULT_BOUNDS, Bounds
from ledger.domain import Task
from ledger.errors import LedgerUnavailable, TaskNotFound
from ledger.groupcommit import GroupCommit
from ledger.leases import LeaseBook, Leases
from ledger.persistence import EventMapper, LedgerRecorder, OrjsonTranscoder

# Arbitrary but fixed: serialises schema creation between processes starting together.
SCHEMA_LOCK_KEY = 0x7461736B6C6564  # "taskled"

log = logging.getLogger(__name__)


def replay(events: Sequence[Any]) -> Aggregate | None:
    """The aggregate its events make, each event's `mutate` in turn: the library's
    `project_aggregate` without its per-event `isinstance` against a runtime-checkable
    Protocol, which alone took 4 % of the worker's CPU under the no-op load."""
    aggregate: Aggregate | None = None
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


def unavailable(error: BaseException) -> LedgerUnavailable:
    return LedgerUnavailable(
        f"event store error: {error}; check that PostgreSQL is running and reachable"
    )


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Give infrastructure errors (the library's, or psycopg's from our own queries) the
    ledger's meaning (IntegrityError passes: it is the version conflict the command loop
    handles)."""
    try:
        yield
    except IntegrityError:
        raise
    except (PersistenceError, psycopg.Error) as error:
        raise unavailable(error) from None


class EventStore(Application[UUID]):
    """Tasks and keys in and out of the store; the ledger decides, this keeps."""

    name = "TaskLedger"  # the library names the events table after it: ledger.log.EVENTS_TABLE
    env: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        env: EnvType | None = None,
        *,
        lease_seconds: float = 10.0,
        bounds: Bounds = DEFAULT_BOUNDS,
    ) -> None:
        self.bounds = bounds  # before the store is built: construct_env and _recorder use it
        with store_errors():
            super().__init__(env)
        self.group_commit = GroupCommit(self.recorder.insert_events)
        # Attempt leases (ledger.leases): granted and settled with the events; renewed,
        # and taken when they lapse, through `leases`. None on a store without them.
        self.leases: Leases | None = None
        self._closing = threading.Event()
        if isinstance(self.recorder, LedgerRecorder):
            schema = self.recorder.datastore.schema
            self.recorder.lease_book = LeaseBook(schema, lease_seconds)
            self.leases = Leases(self.recorder.datastore, schema, lease_seconds)
            threading.Thread(
                target=self._watch_calls,
                args=(self.recorder,),
                name="ledger-call-watch",
                daemon=True,
            ).start()

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        # The library would merge os.environ in; only the composition root reads the
        # environment here, so a stray POSTGRES_* variable cannot redirect the ledger.
        settings = {
            # The library's names for our bounds (ledger.connections): its "connect
            # timeout" is the wait for a pooled connection; its lock timeout is SET LOCAL
            # in each insert (0, its default, would lift ours).
            "POSTGRES_CONNECT_TIMEOUT": str(max(1, round(self.bounds.wait_seconds))),
            "POSTGRES_LOCK_TIMEOUT": str(self.bounds.lock_seconds),
            "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": str(
                self.bounds.idle_in_transaction_seconds
            ),
        }
        settings.update(env or {})
        return Environment(name, settings)

    def construct_mapper(self) -> Mapper[UUID]:
        return self.factory.mapper(transcoder=OrjsonTranscoder(), mapper_class=EventMapper)

    def construct_recorder(self) -> ApplicationRecorder:
        factory = self.factory
        if not isinstance(factory, PostgresFactory):
            return super().construct_recorder()
        datastore = factory.datastore
        # Not yet open: every connection it makes will carry the bounds.
        pool = datastore.pool
        assert isinstance(pool.kwargs, dict)
        pool.kwargs.update(self.bounds.statements())
        pool.kwargs["application_name"] = "taskledger ledger"
        # No automatic preparation: psycopg (3.3.9) counts a statement whose preparation
        # an aborted pipeline skipped as prepared, and the connection then fails every
        # later use of it ("prepared statement _pg3_N does not exist"). A save's pipeline
        # aborts whenever a write in it is refused (a version race, a lost lease).
        pool.kwargs["prepare_threshold"] = None
        pool.timeout = self.bounds.wait_seconds
        pool.reconnect_timeout = self.bounds.reconnect_seconds
        with datastore.get_connection() as conn:
            conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(datastore.schema)))
            # CREATE TABLE IF NOT EXISTS is not safe against itself in two sessions at
            # once; processes that start together take turns.
            conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
            try:
                return super().construct_recorder()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))

    def _watch_calls(self, recorder: LedgerRecorder) -> None:
        while not self._closing.wait(0.5):
            try:
                recorder.break_stalled(self.bounds.stall_seconds)
            except Exception:  # the watch must outlive any one failure of its own
                log.exception("the watch over stalled calls failed once; it goes on")

    def stalled_for(self) -> float:
        """Seconds the oldest call under way has waited for the store, once that is half
        the stall bound (else 0): /readyz reports it."""
        if not isinstance(self.recorder, LedgerRecorder):
            return 0.0
        waited = self.recorder.stalled_for()
        return waited if waited > self.bounds.stall_seconds / 2 else 0.0

    def close(self) -> None:
        self._closing.set()
        super().close()

    # -- reading and writing aggregates ---------------------------------------------------

    def load(self, task_id: UUID, tenant: str | None = None) -> Task:
        try:
            with store_errors():
                task: object = self.repository.get(task_id)
        except AggregateNotFoundError:
            raise TaskNotFound(task_id) from None
        if not isinstance(task, Task) or (tenant is not None and task.tenant != tenant):
            raise TaskNotFound(task_id)
        return task

    def load_many(self, task_ids: Sequence[UUID]) -> dict[UUID, Task]:
        """Tasks by id, read in one query (absent ids and other streams left out)."""
        recorder = self.recorder
        if not isinstance(recorder, PostgresAggregateRecorder):
            found: dict[UUID, Task] = {}
            for task_id in task_ids:
                with contextlib.suppress(TaskNotFound):
                    found[task_id] = self.load(task_id)
            return found
        # One index range per task (LATERAL, not flattened thanks to OFFSET 0): with
        # `originator_id = ANY(...)` the planner may scan the whole table.
        statement = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state"
            " FROM unnest(%s::uuid[]) AS wanted(id) CROSS JOIN LATERAL ("
            "  SELECT * FROM {}.{} t WHERE t.originator_id = wanted.id OFFSET 0) e"
            " ORDER BY e.originator_id, e.originator_version"
        ).format(Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
        with store_errors(), recorder.datastore.get_connection() as conn:
            rows = conn.execute(statement, (list(task_ids),), prepare=True).fetchall()
        streams: dict[UUID, list[Any]] = {}
        for row in rows:
            stream = typing.cast(UUID, row["originator_id"])  # a uuid column
            streams.setdefault(stream, []).append(self._event(row))
        tasks: dict[UUID, Task] = {}
        for task_id, events in streams.items():
            task = replay(events)
            if isinstance(task, Task):
                tasks[task_id] = task
        return tasks

    def load_aggregate(self, stream_id: UUID) -> Aggregate | None:
        """Any aggregate by its id (an API key's stream), or None."""
        try:
            with store_errors():
                found: object = self.repository.get(stream_id)
        except AggregateNotFoundError:
            return None
        return found if isinstance(found, Aggregate) else None

    def record(self, aggregate: Aggregate) -> list[Any]:
        """Store the aggregate's new events in a shared transaction; the events stored."""
        pending = aggregate.collect_events()
        with store_errors():
            self.group_commit.save([self.mapper.to_stored_event(e) for e in pending])
        return list(pending)

    def record_many(self, pending: Sequence[Sequence[Any]]) -> list[BaseException | None]:
        """Store each list of new events in one transaction: per list, None or why not."""
        return self.group_commit.save_many(
            [[self.mapper.to_stored_event(e) for e in events] for events in pending]
        )

    def events_of(self, stream_id: UUID) -> list[tuple[Any, int | None, bytes | None]]:
        """A stream's events, oldest first, each with its position and its chain (None on
        a store without them: the in-memory one)."""
        recorder = self.recorder
        if not isinstance(recorder, PostgresAggregateRecorder):
            with store_errors():
                return [(event, None, None) for event in self.events.get(stream_id)]
        statement = SQL(
            "SELECT originator_id, originator_version, topic, state, notification_id, chain"
            " FROM {}.{} WHERE originator_id = %s ORDER BY originator_version"
        ).format(Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
        with store_errors(), recorder.datastore.get_connection() as conn:
            rows = conn.execute(statement, (stream_id,), prepare=True).fetchall()
        return [
            (
                self._event(row),
                row["notification_id"],
                None if row["chain"] is None else bytes(row["chain"]),
            )
            for row in rows
        ]

    def load_with_events(
        self, task_id: UUID, tenant: str | None = None
    ) -> tuple[Task, list[tuple[Any, int | None, bytes | None]]]:
        """The task (as `load` finds it) and its events as `events_of` gives them, from
        one read of its stream."""
        events = self.events_of(task_id)
        task = replay([event for event, _, _ in events]) if events else None
        if not isinstance(task, Task) or (tenant is not None and task.tenant != tenant):
            raise TaskNotFound(task_id)
        return task, events

    def _event(self, row: dict[str, Any]) -> Any:
        """A domain event from a row of the events table."""
        return self.mapper.to_domain_event(
            StoredEvent(
                originator_id=row["originator_id"],
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
        )
