"""The ledger service: loads tasks from the event store, runs commands, saves new events.

Optimistic concurrency is the arbiter between writers. Every command is "load, decide,
save"; if another writer saved first, the save fails on the (task, version) primary key,
and the command reloads and decides again against the new state, a bounded number of
times. So when a worker's AttemptCompleted and the reaper's TaskExpired race for the same
attempt, exactly one is stored and the other is refused by the rules it re-checks.
"""

from __future__ import annotations

import logging
import threading
import typing
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import EnvType

from ledger.clock import Clock, SystemClock
from ledger.connections import DEFAULT_BOUNDS, Bounds
from ledger.domain import Task
from ledger.errors import (
    AttemptLeaseLost,
    ContentionExhausted,
    IdempotencyConflict,
    LedgerUnavailable,
    TaskNotFound,
    VersionMismatch,
)
from ledger.jsonvalue import JSONValue
from ledger.keys import Keys
from ledger.leases import LeaseLostError, Leases
from ledger.log import event_payload
from ledger.retry import RetryPolicy
from ledger.state import HistoryEntry, Submission, TaskState
from ledger.store import EventStore, unavailable
from ledger.values import AttemptError, AttemptResult, TaskLimits

# uuid5 namespace for tasks submitted with an idempotency key: the key decides the id, so
# the store's primary key, not a lookup table, makes a repeated submission collide.
IDEMPOTENCY_NAMESPACE = UUID("6f1d1f0e-6a53-4b53-9d55-0d4f3c1b7a10")

log = logging.getLogger(__name__)


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
class Decision:
    """What to decide on one task, as a value (see Ledger.execute_many)."""

    task_id: UUID
    decide: Callable[[Task], Any]  # raises the rule's refusal, or appends events
    fresh: bool = False  # read the task from the store even if this process holds it


class Ledger:
    """Commands and queries on tasks, over an event store."""

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
        self.store = EventStore(env, lease_seconds=lease_seconds, bounds=bounds)
        self.clock = clock or SystemClock()
        self.keys = Keys(self.store, self.clock)
        self.retry_policy = retry_policy or RetryPolicy()
        self.limits = limits or TaskLimits()
        self.max_contention_retries = max_contention_retries
        # Lost version races so far (each one cost a reload and a second decision).
        self.version_conflicts = 0
        # Tasks this process saved last, so that the next command on one (a worker's
        # AttemptCompleted after its AttemptStarted) need not read it back. Never
        # trusted for a query nor for a refusal; see _execute.
        self._recent: OrderedDict[UUID, Task] = OrderedDict()
        self._recent_lock = threading.Lock()
        self.recent_capacity = recent_capacity
        self.recent_hits = 0

    @property
    def leases(self) -> Leases | None:
        return self.store.leases

    def stalled_for(self) -> float:
        """Seconds the oldest call under way has waited for the store (see EventStore)."""
        return self.store.stalled_for()

    def close(self) -> None:
        self.store.close()

    # -- queries ----------------------------------------------------------------------------

    def get(self, task_id: UUID, *, tenant: str | None = None) -> TaskState:
        """The task's current state. `tenant` (None = any) hides other tenants' tasks."""
        return TaskState.of(self.store.load(task_id, tenant))

    def history(self, task_id: UUID, *, tenant: str | None = None) -> list[HistoryEntry]:
        self.store.load(task_id, tenant)
        events = self.store.events_of(task_id)
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
        errors = self.store.record_many(pending)
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
                results[i] = unavailable(met)
        return [r if r is not None else LedgerUnavailable("no outcome") for r in results]

    def _repeated_submission(self, task: Task) -> Submission:
        """The idempotency key of `task` is taken: the same request again, or not."""
        assert task.idempotency_key is not None
        existing = self.store.load(task.id, task.tenant)
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
        return self.execute(self.start_decision(task_id, attempt, worker_id))

    def complete_attempt(self, task_id: UUID, attempt: int, result: AttemptResult) -> TaskState:
        return self.execute(self.complete_decision(task_id, attempt, result))

    def fail_attempt(
        self, task_id: UUID, attempt: int, error: AttemptError, *, retryable: bool
    ) -> TaskState:
        return self.execute(self.fail_decision(task_id, attempt, error, retryable=retryable))

    def expire(self, task_id: UUID, attempt: int, *, detected_by: str) -> TaskState:
        return self.execute(self.expire_decision(task_id, attempt, detected_by=detected_by))

    # The same commands as values, for execute_many.

    def start_decision(
        self, task_id: UUID, attempt: int, worker_id: str, *, waits: Collection[str] = ()
    ) -> Decision:
        """AttemptStarted. With `waits` (languages that need a sandbox slot), an attempt
        in one of them that could start is left as it is, read fresh from the store: the
        answer then is the Pending task, to start once a slot is free. An attempt that
        cannot start is refused (or, past its deadline, expired by the caller) at once."""

        def decide(task: Task) -> None:
            now = self.clock.now()
            if task.language in waits and task.can_start(attempt, now):
                return
            task.start_attempt(attempt, worker_id, now)

        return Decision(task_id, decide, fresh=bool(waits))

    def complete_decision(self, task_id: UUID, attempt: int, result: AttemptResult) -> Decision:
        result = result.within(self.limits.output_bytes)
        return Decision(task_id, lambda t: t.complete_attempt(attempt, result, self.clock.now()))

    def fail_decision(
        self, task_id: UUID, attempt: int, error: AttemptError, *, retryable: bool
    ) -> Decision:
        error = error.within(self.limits.output_bytes)
        return Decision(
            task_id,
            lambda t: t.fail_attempt(
                attempt, error, retryable=retryable, now=self.clock.now(), policy=self.retry_policy
            ),
        )

    def expire_decision(self, task_id: UUID, attempt: int, *, detected_by: str) -> Decision:
        return Decision(task_id, lambda t: t.expire(attempt, detected_by, self.clock.now()))

    def execute(self, command: Decision) -> TaskState:
        return self._execute(command.task_id, None, command.decide)

    def execute_many(self, commands: Sequence[Decision]) -> list[TaskState | Exception]:
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
                loaded = self.store.load_many([commands[i].task_id for i in to_read])
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
        errors = self.store.record_many([pending[i] for i in deciding])
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
                results[i] = unavailable(met)
        for i in sorted(alone):
            try:
                results[i] = self.execute(commands[i])
            except Exception as outcome:  # noqa: BLE001 - the command's own outcome
                results[i] = outcome
        return [r if r is not None else LedgerUnavailable("no outcome") for r in results]

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
            task = self.store.load(task_id, tenant) if recent is None else recent
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
                self._log_transition(task, self.store.record(task))
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
