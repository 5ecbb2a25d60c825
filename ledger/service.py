"""The ledger service: the commands of clients, workers and the reaper, and the queries
on one task. Each command is a decision on the Task aggregate, run by ledger.decisions
(load, decide, save; reload and decide again on a lost version race)."""

from __future__ import annotations

import itertools
import typing
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import EnvType

from ledger.clock import Clock, SystemClock
from ledger.connections import DEFAULT_BOUNDS, Bounds
from ledger.decisions import Decision, Decisions, log_transition
from ledger.domain import Task
from ledger.errors import (
    IdempotencyConflict,
    InvalidTask,
    LedgerUnavailable,
    TaskNotFound,
    VersionMismatch,
)
from ledger.jsonvalue import JSONValue
from ledger.keys import Keys
from ledger.leases import Leases
from ledger.log import event_payload
from ledger.persistence import LedgerRecorder
from ledger.retry import RetryPolicy
from ledger.secrets import SecretBook
from ledger.state import HistoryEntry, Submission, TaskState
from ledger.store import EventStore, replay, unavailable
from ledger.targets import TargetPolicy
from ledger.values import AttemptError, AttemptResult, TaskLimits
from ledger.webhooks import Webhooks

# uuid5 namespace for tasks submitted with an idempotency key: the key decides the id, so
# the store's primary key, not a lookup table, makes a repeated submission collide.
IDEMPOTENCY_NAMESPACE = UUID("6f1d1f0e-6a53-4b53-9d55-0d4f3c1b7a10")


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
    callback_url: str | None = None
    callback_events: list[str] | None = None


# The events a submission saves at once: TaskSubmitted and AttemptScheduled(1).
SUBMISSION_EVENTS = 2


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
        webhook_targets: TargetPolicy | None = None,
    ) -> None:
        self.store = EventStore(env, lease_seconds=lease_seconds, bounds=bounds)
        self.clock = clock or SystemClock()
        self.keys = Keys(self.store, self.clock)
        # Where webhooks may go (the `webhook_allow` setting's exceptions), and the
        # tenants' defaults and signing secrets.
        self.webhook_targets = webhook_targets or TargetPolicy()
        recorder = self.store.recorder
        self.webhooks = Webhooks(
            self.store,
            self.clock,
            self.webhook_targets,
            SecretBook(
                recorder.datastore.get_connection if isinstance(recorder, LedgerRecorder) else None,
                recorder.datastore.schema if isinstance(recorder, LedgerRecorder) else "",
            ),
        )
        self.retry_policy = retry_policy or RetryPolicy()
        self.limits = limits or TaskLimits()
        self.decisions = Decisions(
            self.store,
            max_contention_retries=max_contention_retries,
            recent_capacity=recent_capacity,
        )

    @property
    def version_conflicts(self) -> int:
        """Lost version races so far (each cost a reload and a second decision)."""
        return self.decisions.version_conflicts

    @property
    def recent_hits(self) -> int:
        """Decisions saved on a copy this process held, without reading the task."""
        return self.decisions.recent_hits

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

    def get_as_of(
        self,
        task_id: UUID,
        *,
        tenant: str | None = None,
        at: datetime | None = None,
        version: int | None = None,
    ) -> TaskState:
        """The task exactly as it was at time `at` (its events up to then), or at `version`,
        replayed; TaskNotFound if it did not exist yet."""
        current, stored = self.store.load_with_events(task_id, tenant)
        if version is not None and version > current.version:
            raise InvalidTask(
                "as_of_version", f"is {version}; the task's last version is {current.version}"
            )
        events = [event for event, _, _ in stored]
        if version is not None:
            # Only states a reader could have seen: TaskSubmitted is saved together with
            # its AttemptScheduled, so version 1 is read as that whole save.
            kept = events[: max(version, SUBMISSION_EVENTS)]
        else:
            assert at is not None, "as of a time or a version"
            # A prefix, always: clocks of other processes may put a later event a moment
            # before an earlier one, and a state is only ever a prefix of the history.
            kept = list(
                itertools.takewhile(
                    lambda e: typing.cast(datetime, vars(e)["timestamp"]) <= at, events
                )
            )
        if not kept:
            raise TaskNotFound(task_id)
        task = replay(kept)
        assert isinstance(task, Task)
        return TaskState.of(task)

    def history(self, task_id: UUID, *, tenant: str | None = None) -> list[HistoryEntry]:
        _, events = self.store.load_with_events(task_id, tenant)
        return [
            HistoryEntry(
                version=event.originator_version,
                type=type(event).__name__,
                at=typing.cast(datetime, vars(event)["timestamp"]),
                data=event_payload(event),
                position=position,
                hash=None if chain is None else chain.hex(),
            )
            for event, position, chain in events
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
        callback_url: str | None = None,
        callback_events: list[str] | None = None,
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
                    callback_url=callback_url,
                    callback_events=callback_events,
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
                    callback_url=r.callback_url,
                    callback_events=r.callback_events,
                    targets=self.webhook_targets,
                )
            except Exception as refused:  # noqa: BLE001 - this request's own outcome
                results[i] = refused
            else:
                accepted.append((i, task))
        pending = [task.collect_events() for _, task in accepted]
        errors = self.store.record_many(pending)
        for (i, task), events, met in zip(accepted, pending, errors, strict=True):
            if met is None:
                log_transition(task, events)
                self.decisions.keep(task)
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
        self,
        task_id: UUID,
        *,
        by: str,
        reason: str = "",
        tenant: str | None = None,
        bulk_id: str | None = None,
    ) -> TaskState:
        return self.decisions.run(
            task_id, tenant, lambda t: t.cancel(by, reason, self.clock.now(), bulk_id)
        )

    def retry(
        self,
        task_id: UUID,
        *,
        by: str,
        ttl_seconds: float | None = None,
        tenant: str | None = None,
        bulk_id: str | None = None,
    ) -> TaskState:
        return self.decisions.run(
            task_id,
            tenant,
            lambda t: t.retry(self.clock.now(), ttl_seconds, self.limits, by, bulk_id),
        )

    def client_decision(
        self,
        task_id: UUID,
        action: str,
        *,
        by: str,
        tenant: str | None = None,
        reason: str = "",
        bulk_id: str | None = None,
    ) -> Decision:
        """A client's "retry" or "cancel" of a task as a value, for `execute_many` (a bulk
        action); a task of another tenant than `tenant` is refused as not found."""

        def decide(task: Task) -> None:
            if tenant is not None and task.tenant != tenant:
                raise TaskNotFound(task_id)
            if action == "retry":
                task.retry(self.clock.now(), None, self.limits, by, bulk_id)
            elif action == "cancel":
                task.cancel(by, reason, self.clock.now(), bulk_id)
            else:
                raise ValueError(f"unknown client action {action!r}")

        return Decision(task_id, decide)

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
            task.update(patch, by, self.clock.now(), self.limits, self.webhook_targets)

        return self.decisions.run(task_id, tenant, decide)

    # -- webhooks -------------------------------------------------------------------------------

    def webhook_trigger(self, task_id: UUID, version: int) -> tuple[TaskState, HistoryEntry]:
        """What a webhook of the task's event `version` carries: the task as of that
        version (as `get_as_of` answers it) and that event (as `history` gives it)."""
        current, stored = self.store.load_with_events(task_id)
        if not 1 <= version <= current.version:
            raise InvalidTask("trigger_version", f"is {version}; the task is at {current.version}")
        events = [event for event, _, _ in stored]
        task = replay(events[: max(version, SUBMISSION_EVENTS)])
        assert isinstance(task, Task)
        event, position, chain = stored[version - 1]
        entry = HistoryEntry(
            version=version,
            type=type(event).__name__,
            at=typing.cast(datetime, vars(event)["timestamp"]),
            data=event_payload(event),
            position=position,
            hash=None if chain is None else chain.hex(),
        )
        return TaskState.of(task), entry

    def record_webhook_attempt(
        self,
        task_id: UUID,
        *,
        delivery_id: UUID,
        trigger_version: int,
        trigger_type: str,
        url: str,
        delivery_attempt: int,
        outcome: str,
        status_code: int | None = None,
        error: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> TaskState:
        """WebhookAttempted on the task (any state): one attempt to deliver a webhook."""
        return self.decisions.run(
            task_id,
            None,
            lambda t: t.record_webhook_attempt(
                delivery_id=delivery_id,
                trigger_version=trigger_version,
                trigger_type=trigger_type,
                url=url,
                delivery_attempt=delivery_attempt,
                outcome=outcome,
                status_code=status_code,
                error=error,
                next_attempt_at=next_attempt_at,
                now=self.clock.now(),
            ),
        )

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

    def execute(self, decision: Decision) -> TaskState:
        return self.decisions.run(decision.task_id, None, decision.decide)

    def execute_many(self, decisions: Sequence[Decision]) -> list[TaskState | Exception]:
        """Many decisions at once: one read, one transaction (see Decisions.run_many)."""
        return self.decisions.run_many(decisions)
