"""The ledger service: loads tasks from the event store, runs commands, saves new events.

Optimistic concurrency is the arbiter between writers. Every command is "load, decide,
save"; if another writer saved first, the save fails on the (task, version) primary key,
and the command reloads and decides again against the new state, a bounded number of
times. So when a worker's AttemptCompleted and the reaper's TaskExpired race for the same
attempt, exactly one is stored and the other is refused by the rules it re-checks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import typing
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, TypeVar
from uuid import UUID

import psycopg
from eventsourcing.application import AggregateNotFoundError, Application, project_aggregate
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

from ledger.clock import Clock, SystemClock
from ledger.connections import DEFAULT_BOUNDS, Bounds
from ledger.domain import (
    Attempt,
    AttemptError,
    AttemptResult,
    Status,
    Task,
    TaskLimits,
)
from ledger.errors import (
    AttemptLeaseLost,
    ContentionExhausted,
    IdempotencyConflict,
    KeyNotFound,
    LedgerUnavailable,
    TaskNotFound,
    VersionMismatch,
)
from ledger.groupcommit import GroupCommit
from ledger.jsonvalue import JSONValue
from ledger.keys import ApiKey, KeyAlreadyRevoked, key_stream_id, parse_key
from ledger.leases import LeaseBook, LeaseLostError, Leases
from ledger.persistence import EventMapper, LedgerRecorder, OrjsonTranscoder
from ledger.retry import RetryPolicy

# uuid5 namespace for tasks submitted with an idempotency key: the key decides the id, so
# the store's primary key, not a lookup table, makes a repeated submission collide.
IDEMPOTENCY_NAMESPACE = UUID("6f1d1f0e-6a53-4b53-9d55-0d4f3c1b7a10")

# The library names the table after the application: Ledger.name.lower() + "_events".
EVENTS_TABLE = "taskledger_events"
# The channel the library NOTIFYs on each insert into that table.
EVENTS_CHANNEL = EVENTS_TABLE

# Arbitrary but fixed: serialises schema creation between processes starting together.
SCHEMA_LOCK_KEY = 0x7461736B6C6564  # "taskled"

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttemptState:
    number: int
    reason: str
    scheduled_at: datetime
    not_before: datetime
    deadline: datetime
    started_at: datetime | None
    worker_id: str | None
    finished_at: datetime | None
    outcome: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    retryable: bool | None
    detected_by: str | None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptState:
        return cls(
            number=attempt.number,
            reason=attempt.reason,
            scheduled_at=attempt.scheduled_at,
            not_before=attempt.not_before,
            deadline=attempt.deadline,
            started_at=attempt.started_at,
            worker_id=attempt.worker_id,
            finished_at=attempt.finished_at,
            outcome=str(attempt.outcome) if attempt.outcome else None,
            result=attempt.result,
            error=attempt.error,
            retryable=attempt.retryable,
            detected_by=attempt.detected_by,
        )


@dataclass(frozen=True)
class TaskState:
    """A task as the ledger knows it right now (read from its events)."""

    id: UUID
    tenant: str
    description: str
    language: str
    code: str
    data: JSONValue
    status: Status
    attempt: int  # over the task's life: manual retries continue the count
    run_attempt: int  # within the current run (since submit or the last manual retry)
    max_attempts: int
    ttl_seconds: float
    deadline: datetime
    not_before: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    submitted_by: str
    idempotency_key: str | None
    version: int
    attempts: tuple[AttemptState, ...]

    @classmethod
    def of(cls, task: Task) -> TaskState:
        current = task.current
        return cls(
            id=task.id,
            tenant=task.tenant,
            description=task.description,
            language=task.language,
            code=task.code,
            data=task.data,
            status=task.status,
            attempt=current.number,
            run_attempt=task.run_attempt,
            max_attempts=task.max_attempts,
            ttl_seconds=task.ttl_seconds,
            deadline=current.deadline,
            not_before=current.not_before,
            created_at=task.created_on,
            updated_at=task.modified_on,
            started_at=current.started_at,
            finished_at=current.finished_at,
            worker_id=current.worker_id,
            result=current.result,
            error=current.error,
            submitted_by=task.submitted_by,
            idempotency_key=task.idempotency_key,
            version=task.version,
            attempts=tuple(AttemptState.of(a) for a in task.attempts),
        )


@dataclass(frozen=True)
class Submission:
    task: TaskState
    created: bool  # False when an idempotency key matched an earlier identical submission


@dataclass(frozen=True)
class SubmitRequest:
    """What `Ledger.submit` takes, as a value (for submit_many)."""

    description: str
    language: str
    code: str
    tenant: str
    submitted_by: str
    data: JSONValue = None
    ttl_seconds: float = 300
    max_attempts: int = 3
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Command:
    """A decision to take on one task (see Ledger.execute_many)."""

    task_id: UUID
    decide: Callable[[Task], Any]  # raises the rule's refusal, or appends events
    fresh: bool = False  # read the task from the store even if this process holds it


def _no_change(task: Task) -> None:
    return None


@dataclass(frozen=True)
class KeyPrincipal:
    """Who a valid API key speaks for."""

    key_id: str
    tenant: str
    role: str


@dataclass(frozen=True)
class HistoryEntry:
    version: int
    type: str
    at: datetime
    data: dict[str, Any]


_ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


def event_payload(event: object) -> dict[str, Any]:
    """An event's own fields, without the envelope (task id, version, time, topic)."""
    return {k: v for k, v in vars(event).items() if k not in _ENVELOPE}


def _unavailable(error: BaseException) -> LedgerUnavailable:
    return LedgerUnavailable(
        f"event store error: {error}; check that PostgreSQL is running and reachable"
    )


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Give infrastructure errors (the library's, or psycopg's from our own queries) the
    ledger's meaning (IntegrityError passes: it is the version conflict the command loop
    handles)."""
    try:
        yield
    except IntegrityError:
        raise
    except (PersistenceError, psycopg.Error) as error:
        raise _unavailable(error) from None


class Ledger(Application[UUID]):
    """Commands and queries on tasks, over an event store."""

    name = "TaskLedger"  # hence EVENTS_TABLE
    env: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        env: EnvType | None = None,
        *,
        clock: Clock | None = None,
        retry_policy: RetryPolicy | None = None,
        limits: TaskLimits | None = None,
        max_contention_retries: int = 16,
        recent_capacity: int = 1024,
        lease_seconds: float = 10.0,
        bounds: Bounds = DEFAULT_BOUNDS,
    ) -> None:
        self.bounds = bounds  # before the store is built: construct_env and _recorder use it
        self.clock = clock or SystemClock()
        self.retry_policy = retry_policy or RetryPolicy()
        self.limits = limits or TaskLimits()
        self.max_contention_retries = max_contention_retries
        # Lost version races so far (each one cost a reload and a second decision).
        self.version_conflicts = 0
        with _store_errors():
            super().__init__(env)
        self.group_commit = GroupCommit(self.recorder.insert_events)
        # Attempt leases (ledger.leases): granted and settled with the events; renewed,
        # and taken when they lapse, through `leases`. None on a store without them.
        self.leases: Leases | None = None
        if isinstance(self.recorder, LedgerRecorder):
            schema = self.recorder.datastore.schema
            self.recorder.lease_book = LeaseBook(schema, lease_seconds)
            self.leases = Leases(self.recorder.datastore, schema, lease_seconds)
        self._closing = threading.Event()
        if isinstance(self.recorder, LedgerRecorder):
            threading.Thread(
                target=self._watch_calls,
                args=(self.recorder,),
                name="ledger-call-watch",
                daemon=True,
            ).start()
        # Tasks this process saved last, so that the next command on one (a worker's
        # AttemptCompleted after its AttemptStarted) need not read it back. Never
        # trusted for a query nor for a refusal; see _execute.
        self._recent: OrderedDict[UUID, Task] = OrderedDict()
        self._recent_lock = threading.Lock()
        self.recent_capacity = recent_capacity
        self.recent_hits = 0

    # -- construction ---------------------------------------------------------------------

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

    # -- queries ----------------------------------------------------------------------------

    def get(self, task_id: UUID, *, tenant: str | None = None) -> TaskState:
        """The task's current state. `tenant` (None = any) hides other tenants' tasks."""
        return TaskState.of(self._load(task_id, tenant))

    def history(self, task_id: UUID, *, tenant: str | None = None) -> list[HistoryEntry]:
        self._load(task_id, tenant)
        with _store_errors():
            events = list(self.events.get(task_id))
        return [
            HistoryEntry(
                version=event.originator_version,
                type=type(event).__name__,
                at=typing.cast(datetime, vars(event)["timestamp"]),
                data=event_payload(event),
            )
            for event in events
        ]

    # -- commands from clients ----------------------------------------------------------------

    def submit(
        self,
        *,
        description: str,
        language: str,
        code: str,
        data: JSONValue = None,
        ttl_seconds: float = 300,
        max_attempts: int = 3,
        tenant: str,
        submitted_by: str,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Accept a task: TaskSubmitted and AttemptScheduled(1), in one transaction.

        With an idempotency key the task id is derived from (tenant, key): a repeat of
        the same request returns the existing task (created=False); a different request
        under the same key raises IdempotencyConflict.
        """
        outcome = self.submit_many(
            [
                SubmitRequest(
                    description=description,
                    language=language,
                    code=code,
                    data=data,
                    ttl_seconds=ttl_seconds,
                    max_attempts=max_attempts,
                    tenant=tenant,
                    submitted_by=submitted_by,
                    idempotency_key=idempotency_key,
                )
            ]
        )[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[Submission | Exception]:
        """Accept many tasks in one transaction; each request gets its own outcome (a
        Submission, or the exception `submit` would raise, returned)."""
        results: list[Submission | Exception | None] = [None] * len(requests)
        accepted: list[tuple[int, Task]] = []
        now = self.clock.now()
        for i, r in enumerate(requests):
            if r.idempotency_key is None:
                task_id = uuid.uuid4()
            else:
                task_id = uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{r.tenant}\x00{r.idempotency_key}")
            try:
                task = Task.submit(
                    task_id=task_id,
                    now=now,
                    description=r.description,
                    language=r.language,
                    code=r.code,
                    data=r.data,
                    ttl_seconds=r.ttl_seconds,
                    max_attempts=r.max_attempts,
                    tenant=r.tenant,
                    submitted_by=r.submitted_by,
                    idempotency_key=r.idempotency_key,
                    limits=self.limits,
                )
            except Exception as refused:  # noqa: BLE001 - this request's own outcome
                results[i] = refused
            else:
                accepted.append((i, task))
        pending = [task.collect_events() for _, task in accepted]
        errors = self.group_commit.save_many(
            [[self.mapper.to_stored_event(e) for e in events] for events in pending]
        )
        for (i, task), events, met in zip(accepted, pending, errors, strict=True):
            if met is None:
                self._log_transition(task, events)
                self._keep_recent(task)
                results[i] = Submission(TaskState.of(task), created=True)
            elif isinstance(met, IntegrityError) and task.idempotency_key is not None:
                try:
                    results[i] = self._repeated_submission(task)
                except Exception as outcome:  # noqa: BLE001 - this request's own outcome
                    results[i] = outcome
            elif isinstance(met, IntegrityError):
                # A uuid4 collision: not something to paper over.
                results[i] = LedgerUnavailable(f"task id {task.id} collided: {met}")
            else:
                results[i] = _unavailable(met)
        return [r if r is not None else LedgerUnavailable("no outcome") for r in results]

    def _repeated_submission(self, task: Task) -> Submission:
        """The idempotency key of `task` is taken: the same request again, or not."""
        assert task.idempotency_key is not None
        existing = self._load(task.id, task.tenant)
        if existing.fingerprint != task.fingerprint:
            raise IdempotencyConflict(task.id, task.idempotency_key)
        return Submission(TaskState.of(existing), created=False)

    def cancel(
        self, task_id: UUID, *, by: str, reason: str = "", tenant: str | None = None
    ) -> TaskState:
        return self._execute(task_id, tenant, lambda t: t.cancel(by, reason, self.clock.now()))

    def retry(
        self,
        task_id: UUID,
        *,
        by: str,
        ttl_seconds: float | None = None,
        tenant: str | None = None,
    ) -> TaskState:
        return self._execute(
            task_id, tenant, lambda t: t.retry(self.clock.now(), ttl_seconds, self.limits, by)
        )

    def update(
        self,
        task_id: UUID,
        patch: dict[str, Any],
        *,
        by: str,
        expected_version: int | None = None,
        tenant: str | None = None,
    ) -> TaskState:
        def decide(task: Task) -> None:
            if expected_version is not None and task.version != expected_version:
                raise VersionMismatch(task_id, expected_version, task.version)
            task.update(patch, by, self.clock.now(), self.limits)

        return self._execute(task_id, tenant, decide)

    # -- commands from workers and the reaper ----------------------------------------------------

    def start_attempt(self, task_id: UUID, attempt: int, worker_id: str) -> TaskState:
        return self.execute(self.start_command(task_id, attempt, worker_id))

    def complete_attempt(self, task_id: UUID, attempt: int, result: AttemptResult) -> TaskState:
        return self.execute(self.complete_command(task_id, attempt, result))

    def fail_attempt(
        self, task_id: UUID, attempt: int, error: AttemptError, *, retryable: bool
    ) -> TaskState:
        return self.execute(self.fail_command(task_id, attempt, error, retryable=retryable))

    def expire(self, task_id: UUID, attempt: int, *, detected_by: str) -> TaskState:
        return self.execute(self.expire_command(task_id, attempt, detected_by=detected_by))

    # The same commands as values, for execute_many.

    def read_command(self, task_id: UUID) -> Command:
        """Changes nothing: reads the task from the store, and keeps it so that the next
        command on it (a worker's start, once a slot is free) need not read it again."""
        return Command(task_id, _no_change, fresh=True)

    def start_command(self, task_id: UUID, attempt: int, worker_id: str) -> Command:
        return Command(task_id, lambda t: t.start_attempt(attempt, worker_id, self.clock.now()))

    def complete_command(self, task_id: UUID, attempt: int, result: AttemptResult) -> Command:
        result = result.within(self.limits.output_bytes)
        return Command(task_id, lambda t: t.complete_attempt(attempt, result, self.clock.now()))

    def fail_command(
        self, task_id: UUID, attempt: int, error: AttemptError, *, retryable: bool
    ) -> Command:
        error = error.within(self.limits.output_bytes)
        return Command(
            task_id,
            lambda t: t.fail_attempt(
                attempt, error, retryable=retryable, now=self.clock.now(), policy=self.retry_policy
            ),
        )

    def expire_command(self, task_id: UUID, attempt: int, *, detected_by: str) -> Command:
        return Command(task_id, lambda t: t.expire(attempt, detected_by, self.clock.now()))

    def execute(self, command: Command) -> TaskState:
        return self._execute(command.task_id, None, command.decide)

    def execute_many(self, commands: Sequence[Command]) -> list[TaskState | Exception]:
        """Run commands on many tasks at once: one read for the tasks this process does
        not hold, one transaction for all their events. Each command gets the outcome
        `execute` would give it: its task's new state, or the exception it would raise
        (returned, not raised). Anything the batch cannot decide safely (a second
        command on the same task, a stale copy, a lost version race) is run on its own
        afterwards, as `execute` would.
        """
        results: list[TaskState | Exception | None] = [None] * len(commands)
        alone: list[int] = []
        held: dict[int, tuple[Task, bool]] = {}  # index -> (task, read from the store)
        to_read: list[int] = []
        seen: set[UUID] = set()
        for i, command in enumerate(commands):
            if command.task_id in seen:
                alone.append(i)
                continue
            seen.add(command.task_id)
            copy = None if command.fresh else self._take_recent(command.task_id)
            if copy is None:
                to_read.append(i)
            else:
                held[i] = (copy, False)
        if to_read:
            try:
                loaded = self._load_many([commands[i].task_id for i in to_read])
            except LedgerUnavailable as error:
                for i in to_read:
                    results[i] = LedgerUnavailable(str(error))
                loaded = {}
            for i in to_read:
                task = loaded.get(commands[i].task_id)
                if task is not None:
                    held[i] = (task, True)
                elif results[i] is None:
                    results[i] = TaskNotFound(commands[i].task_id)
        deciding: list[int] = []
        for i, (task, trusted) in held.items():
            try:
                commands[i].decide(task)
            except Exception as refused:  # noqa: BLE001 - the command's own outcome
                if trusted:
                    results[i] = refused
                else:
                    alone.append(i)
                continue
            if task.pending_events:
                deciding.append(i)
            elif trusted:
                self._keep_recent(task)
                results[i] = TaskState.of(task)
            else:
                alone.append(i)
        pending = {i: held[i][0].collect_events() for i in deciding}
        errors = self.group_commit.save_many(
            [[self.mapper.to_stored_event(e) for e in pending[i]] for i in deciding]
        )
        for i, met in zip(deciding, errors, strict=True):
            task, trusted = held[i]
            if met is None:
                self._log_transition(task, pending[i])
                self._keep_recent(task)
                self.recent_hits += not trusted
                results[i] = TaskState.of(task)
            elif isinstance(met, LeaseLostError):
                results[i] = AttemptLeaseLost(commands[i].task_id, str(met))
            elif isinstance(met, IntegrityError):
                self.version_conflicts += trusted
                alone.append(i)
            else:
                results[i] = _unavailable(met)
        for i in sorted(alone):
            try:
                results[i] = self.execute(commands[i])
            except Exception as outcome:  # noqa: BLE001 - the command's own outcome
                results[i] = outcome
        return [r if r is not None else LedgerUnavailable("no outcome") for r in results]

    # -- API keys ---------------------------------------------------------------------------------

    def issue_key(
        self, *, tenant: str, role: str, issued_by: str, label: str = ""
    ) -> tuple[KeyPrincipal, str]:
        """Issue a key; returns who it speaks for and the token (shown this once)."""
        key, token = ApiKey.issue(
            tenant=tenant, role=role, issued_by=issued_by, label=label, now=self.clock.now()
        )
        self._save(key)
        return KeyPrincipal(key.key_id, key.tenant, str(key.role)), token

    def revoke_key(self, key_id: str, *, by: str) -> None:
        key = self._load_key(key_id)
        if key is None:
            raise KeyNotFound(f"no API key with id {key_id}")
        with contextlib.suppress(KeyAlreadyRevoked):
            key.revoke(by, self.clock.now())
            self._save(key)

    def authenticate(self, token: str) -> KeyPrincipal | None:
        """Who the token speaks for, or None if it is malformed, unknown or revoked."""
        parsed = parse_key(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        key = self._load_key(key_id)
        if key is None or not key.accepts(secret):
            return None
        return KeyPrincipal(key.key_id, key.tenant, str(key.role))

    def _load_key(self, key_id: str) -> ApiKey | None:
        try:
            with _store_errors():
                key: object = self.repository.get(key_stream_id(key_id))
        except AggregateNotFoundError:
            return None
        return key if isinstance(key, ApiKey) else None

    # -- machinery --------------------------------------------------------------------------------

    def _load(self, task_id: UUID, tenant: str | None) -> Task:
        try:
            with _store_errors():
                task: object = self.repository.get(task_id)
        except AggregateNotFoundError:
            raise TaskNotFound(task_id) from None
        if not isinstance(task, Task) or (tenant is not None and task.tenant != tenant):
            raise TaskNotFound(task_id)
        return task

    def _load_many(self, task_ids: Sequence[UUID]) -> dict[UUID, Task]:
        """Tasks by id, read in one query (absent ids and other streams left out)."""
        recorder = self.recorder
        if not isinstance(recorder, PostgresAggregateRecorder):
            found: dict[UUID, Task] = {}
            for task_id in task_ids:
                with contextlib.suppress(TaskNotFound):
                    found[task_id] = self._load(task_id, None)
            return found
        # One index range per task (LATERAL, not flattened thanks to OFFSET 0): with
        # `originator_id = ANY(...)` the planner may scan the whole table.
        statement = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state"
            " FROM unnest(%s::uuid[]) AS wanted(id) CROSS JOIN LATERAL ("
            "  SELECT * FROM {}.{} t WHERE t.originator_id = wanted.id OFFSET 0) e"
            " ORDER BY e.originator_id, e.originator_version"
        ).format(Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
        with _store_errors(), recorder.datastore.get_connection() as conn:
            rows = conn.execute(statement, (list(task_ids),), prepare=True).fetchall()
        streams: dict[UUID, list[Any]] = {}
        for row in rows:
            stored = StoredEvent(
                originator_id=row["originator_id"],
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
            stream = typing.cast(UUID, stored.originator_id)  # a uuid column
            streams.setdefault(stream, []).append(self.mapper.to_domain_event(stored))
        tasks: dict[UUID, Task] = {}
        for task_id, events in streams.items():
            task = project_aggregate(None, events)
            if isinstance(task, Task):
                tasks[task_id] = task
        return tasks

    def _save(self, aggregate: Task | ApiKey) -> None:
        pending = aggregate.collect_events()
        with _store_errors():
            self.group_commit.save([self.mapper.to_stored_event(e) for e in pending])
        if isinstance(aggregate, Task):
            self._log_transition(aggregate, pending)

    def _log_transition(self, task: Task, events: Sequence[object]) -> None:
        # One line per transition, for whoever follows a task through the logs.
        log.info(
            "task transition",
            extra={
                "task_id": str(task.id),
                "attempt": task.current.number,
                "events": [type(e).__name__ for e in events],
                "status": str(task.status),
                "version": task.version,
            },
        )

    def _execute(
        self, task_id: UUID, tenant: str | None, decide: Callable[[Task], Any]
    ) -> TaskState:
        """Load, decide, save; on a lost version race, reload and decide again.

        The first try may start from the copy this process saved last (no read). That
        copy can be stale, so only a decision it leads to that then saves is kept: the
        save of version v+1 succeeding proves nobody else wrote after version v, i.e.
        the copy was the current state. A refusal or a no-op decided on the copy is
        decided again on the task read from the store.
        """
        recent = self._take_recent(task_id)
        for _ in range(self.max_contention_retries):
            trusted = recent is None
            task = self._load(task_id, tenant) if recent is None else recent
            recent = None
            if tenant is not None and task.tenant != tenant:
                raise TaskNotFound(task_id)
            try:
                decide(task)  # raises TransitionRefused & co. when the rules say no
            except Exception:
                if trusted:
                    raise
                continue
            if not task.pending_events:
                if trusted:
                    self._keep_recent(task)
                    return TaskState.of(task)
                continue
            try:
                self._save(task)
            except LeaseLostError as lost:
                raise AttemptLeaseLost(task_id, str(lost)) from None
            except IntegrityError:
                if trusted:
                    self.version_conflicts += 1
                continue
            if not trusted:
                self.recent_hits += 1
            self._keep_recent(task)
            return TaskState.of(task)
        raise ContentionExhausted(task_id, self.max_contention_retries)

    def _take_recent(self, task_id: UUID) -> Task | None:
        with self._recent_lock:
            return self._recent.pop(task_id, None)  # one command at a time owns a copy

    def _keep_recent(self, task: Task) -> None:
        with self._recent_lock:
            self._recent[task.id] = task
            self._recent.move_to_end(task.id)
            while len(self._recent) > self.recent_capacity:
                self._recent.popitem(last=False)
