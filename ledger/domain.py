"""The Task aggregate: its events, the rules of which may follow which, and derived status.

Every change to a task is a past-tense event applied to the aggregate. Command methods
check the rules against the current state, refuse with a `TransitionRefused` subclass
naming the broken rule, and only then trigger events; `apply` methods never check, so a
task rebuilt from its history is always the task that was saved.

Time is passed in (`now`), never read here: the application service owns the clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from ledger.checks import (
    check_code,
    check_data,
    check_description,
    check_fields,
    check_language,
    check_max_attempts,
    check_text,
    check_ttl,
    submission_fingerprint,
)
from ledger.errors import (
    AttemptAlreadyStarted,
    AttemptNotCurrent,
    AttemptNotStarted,
    DeadlineNotReached,
    DeadlinePassed,
    FieldLocked,
    InvalidTask,
    NotRetryable,
    TaskIsTerminal,
)
from ledger.jsonvalue import JSONValue, merge_patch, without_nul
from ledger.retry import RetryPolicy
from ledger.targets import TargetPolicy, check_callback_events, check_callback_url
from ledger.values import (
    RETRYABLE_BY_CLIENT,
    Attempt,
    AttemptError,
    AttemptResult,
    Outcome,
    ScheduleReason,
    Status,
    TaskLimits,
)

_OUTCOME_STATUS = {
    Outcome.COMPLETED: Status.COMPLETED,
    Outcome.FAILED: Status.FAILED,
    Outcome.EXPIRED: Status.EXPIRED,
    Outcome.CANCELLED: Status.CANCELLED,
}

# Who schedules automatic retries, in AttemptScheduled.by.
AUTO_RETRY_ACTOR = "ledger:retry-policy"

# Fields a client may change, and whether they may change after the task has left Pending.
UPDATABLE_ANY_TIME = frozenset({"description"})
UPDATABLE_WHILE_PENDING = frozenset({"data", "code", "ttl_seconds", "max_attempts"})
# ... and those that may change until the task is terminal (where its webhooks go).
UPDATABLE_WHILE_OPEN = frozenset({"callback_url", "callback_events"})
UPDATABLE = UPDATABLE_ANY_TIME | UPDATABLE_WHILE_PENDING | UPDATABLE_WHILE_OPEN

# The outcomes of a webhook delivery attempt (WebhookAttempted.outcome).
DELIVERY_OUTCOMES = ("delivered", "failed", "gave-up")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment!r}: the ledger only keeps aware UTC times")
    return moment


class Task(Aggregate):
    """A unit of work with a time budget, run in numbered attempts."""

    # -- events ---------------------------------------------------------------------------

    class TaskSubmitted(Aggregate.Created):
        # v2 added callback_url and callback_events (webhooks); version 1 events are read
        # with both None: no callback, and the default transitions.
        class_version = 2

        description: str
        language: str
        code: str
        data: JSONValue
        ttl_seconds: float
        max_attempts: int
        tenant: str
        submitted_by: str
        idempotency_key: str | None
        callback_url: str | None
        callback_events: list[str] | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["callback_url"] = None
            state["callback_events"] = None

        def apply(self, task: Task) -> None:
            task.description = self.description
            task.language = self.language
            task.code = self.code
            task.data = self.data
            task.ttl_seconds = self.ttl_seconds
            task.max_attempts = self.max_attempts
            task.tenant = self.tenant
            task.submitted_by = self.submitted_by
            task.idempotency_key = self.idempotency_key
            task.callback_url = self.callback_url
            task.callback_events = self.callback_events
            task.fingerprint = submission_fingerprint(self.request_fields())

        def request_fields(self) -> dict[str, Any]:
            return {
                "description": self.description,
                "language": self.language,
                "code": self.code,
                "data": self.data,
                "ttl_seconds": self.ttl_seconds,
                "max_attempts": self.max_attempts,
                "callback_url": self.callback_url,
                "callback_events": self.callback_events,
            }

    class AttemptScheduled(Aggregate.Event):
        # v2 added bulk_id: the bulk action (POST /api/tasks/bulk) this retry was part of,
        # else None. Version 1 events are read as bulk_id None (the library upcasts them).
        class_version = 2

        attempt: int
        reason: str
        not_before: datetime
        deadline: datetime
        ttl_seconds: float
        by: str
        bulk_id: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["bulk_id"] = None

        def apply(self, task: Task) -> None:
            if self.reason != ScheduleReason.AUTO_RETRY:
                task.run_first_attempt = self.attempt
                task.ttl_seconds = self.ttl_seconds
                task.cancelled_by = None
                task.cancel_reason = None
            task.attempts.append(
                Attempt(
                    number=self.attempt,
                    reason=self.reason,
                    scheduled_at=self.timestamp,
                    not_before=self.not_before,
                    deadline=self.deadline,
                )
            )

    class AttemptStarted(Aggregate.Event):
        attempt: int
        worker_id: str

        def apply(self, task: Task) -> None:
            current = task.current
            current.started_at = self.timestamp
            current.worker_id = self.worker_id

    class AttemptCompleted(Aggregate.Event):
        attempt: int
        result: dict[str, Any]

        def apply(self, task: Task) -> None:
            current = task.current
            current.finished_at = self.timestamp
            current.outcome = Outcome.COMPLETED
            current.result = self.result

    class AttemptFailed(Aggregate.Event):
        attempt: int
        error: dict[str, Any]
        retryable: bool

        def apply(self, task: Task) -> None:
            current = task.current
            current.finished_at = self.timestamp
            current.outcome = Outcome.FAILED
            current.error = self.error
            current.retryable = self.retryable

    class TaskExpired(Aggregate.Event):
        attempt: int
        detected_by: str

        def apply(self, task: Task) -> None:
            current = task.current
            current.finished_at = self.timestamp
            current.outcome = Outcome.EXPIRED
            current.detected_by = self.detected_by

    class TaskCancelled(Aggregate.Event):
        class_version = 2  # v2 added bulk_id, as AttemptScheduled did

        attempt: int
        by: str
        reason: str
        bulk_id: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["bulk_id"] = None

        def apply(self, task: Task) -> None:
            current = task.current
            current.finished_at = self.timestamp
            current.outcome = Outcome.CANCELLED
            task.cancelled_by = self.by
            task.cancel_reason = self.reason

    class TaskUpdated(Aggregate.Event):
        changes: dict[str, JSONValue]
        by: str

        def apply(self, task: Task) -> None:
            for name, value in self.changes.items():
                setattr(task, name, value)
            if "ttl_seconds" in self.changes:
                task.current.deadline = task.run_deadline_for(self.changes["ttl_seconds"])

    class WebhookAttempted(Aggregate.Event):
        """One attempt to deliver a webhook of this task: a fact about the delivery, not
        a transition, so it is allowed in any state (terminal ones above all).

        `delivery_attempt` counts the attempts of one delivery (not the task's
        `attempt`, which every view and page reads as the attempt that ran)."""

        delivery_id: UUID
        trigger_version: int
        trigger_type: str
        url: str
        delivery_attempt: int
        outcome: str  # delivered | failed | gave-up
        status_code: int | None
        error: str | None
        next_attempt_at: datetime | None

        def apply(self, task: Task) -> None:
            task.last_delivery = {
                "delivery_id": self.delivery_id,
                "trigger_type": self.trigger_type,
                "outcome": self.outcome,
                "status_code": self.status_code,
                "error": self.error,
                "attempt": self.delivery_attempt,
                "at": self.timestamp,
            }

    def __init__(self) -> None:
        # Called with no arguments when TaskSubmitted creates the task; its apply() then
        # sets the real values. Declared here so readers and type checkers see the state.
        self.description: str = ""
        self.language: str = ""
        self.code: str = ""
        self.data: JSONValue = None
        self.ttl_seconds: float = 0
        self.max_attempts: int = 0
        self.tenant: str = ""
        self.submitted_by: str = ""
        self.idempotency_key: str | None = None
        self.fingerprint: str = ""
        self.attempts: list[Attempt] = []
        self.run_first_attempt: int = 1
        self.cancelled_by: str | None = None
        self.cancel_reason: str | None = None
        self.callback_url: str | None = None
        self.callback_events: list[str] | None = None
        self.last_delivery: dict[str, Any] | None = None  # the last WebhookAttempted

    # -- derived state ---------------------------------------------------------------------

    @property
    def current(self) -> Attempt:
        return self.attempts[-1]

    @property
    def status(self) -> Status:
        current = self.current
        if current.outcome is not None:
            return _OUTCOME_STATUS[current.outcome]
        if current.started_at is not None:
            return Status.IN_PROGRESS
        return Status.PENDING

    @property
    def run_first(self) -> Attempt:
        """The attempt a client scheduled (submit or manual retry) that began this run."""
        return self.attempts[self.run_first_attempt - 1]

    @property
    def run_attempt(self) -> int:
        """The current attempt's number within its run, from 1 (what `max_attempts` bounds).

        `current.number` counts over the task's whole life, so after a manual retry of a
        task with `max_attempts` 1 it is 2 while this is 1.
        """
        return self.current.number - self.run_first_attempt + 1

    def run_deadline_for(self, ttl_seconds: float) -> datetime:
        return self.run_first.scheduled_at + timedelta(seconds=ttl_seconds)

    # -- commands --------------------------------------------------------------------------

    @classmethod
    def submit(
        cls,
        *,
        task_id: UUID,
        now: datetime,
        description: str,
        language: str,
        code: str,
        data: JSONValue,
        ttl_seconds: float,
        max_attempts: int,
        tenant: str,
        submitted_by: str,
        idempotency_key: str | None,
        limits: TaskLimits,
        callback_url: str | None = None,
        callback_events: list[str] | None = None,
        targets: TargetPolicy | None = None,
    ) -> Task:
        check_description(description, limits)
        check_language(language)
        check_code(code, limits)
        check_data(data, limits)
        check_ttl(ttl_seconds, limits)
        check_max_attempts(max_attempts, limits)
        for name, value in (("tenant", tenant), ("submitted_by", submitted_by)):
            if not isinstance(value, str) or not value:
                raise InvalidTask(name, "must be a non-empty string")
            check_text(name, value)
        if idempotency_key is not None:
            check_text("idempotency_key", idempotency_key)
        if callback_url is not None:
            check_callback_url(callback_url, targets or TargetPolicy())
        check_callback_events(callback_events)
        task = cls._create(
            cls.TaskSubmitted,
            id=task_id,
            timestamp=_utc(now),
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
            callback_events=None if callback_events is None else list(callback_events),
        )
        task._schedule(
            1,
            ScheduleReason.SUBMITTED,
            now,
            not_before=now,
            ttl_seconds=ttl_seconds,
            by=submitted_by,
        )
        return task

    def can_start(self, attempt: int, now: datetime) -> bool:
        """Whether `start_attempt(attempt, ...)` would start it now (not refuse it)."""
        current = self.current
        return (
            self.status is Status.PENDING
            and current.number == attempt
            and current.started_at is None
            and now < current.deadline
        )

    def start_attempt(self, attempt: int, worker_id: str, now: datetime) -> None:
        current = self._require_current(attempt, "start")
        self._require_not_terminal(f"attempt {attempt} cannot start")
        if current.started_at is not None:
            raise AttemptAlreadyStarted(
                self.id, f"attempt {attempt} was already started by worker {current.worker_id}"
            )
        if now >= current.deadline:
            raise DeadlinePassed(
                self.id,
                f"attempt {attempt} reached its deadline {current.deadline.isoformat()} "
                "before it started; expire the task instead of running it",
            )
        self.trigger_event(
            self.AttemptStarted, timestamp=_utc(now), attempt=attempt, worker_id=worker_id
        )

    def complete_attempt(self, attempt: int, result: AttemptResult, now: datetime) -> None:
        self._require_running(attempt, "complete")
        self.trigger_event(
            self.AttemptCompleted, timestamp=_utc(now), attempt=attempt, result=result.as_payload()
        )

    def fail_attempt(
        self,
        attempt: int,
        error: AttemptError,
        *,
        retryable: bool,
        now: datetime,
        policy: RetryPolicy,
    ) -> None:
        """Record the failure, then schedule an automatic retry if the run allows one.

        A retry is scheduled only for retryable errors, while the run has attempts left
        (`max_attempts` counts the attempts since the last client scheduling), and only if
        its backoff ends before the run's deadline: retries share that deadline.
        """
        self._require_running(attempt, "fail")
        self.trigger_event(
            self.AttemptFailed,
            timestamp=_utc(now),
            attempt=attempt,
            error=error.as_payload(),
            retryable=retryable,
        )
        attempts_in_run = self.run_attempt
        if not retryable or attempts_in_run >= self.max_attempts:
            return
        not_before = now + timedelta(seconds=policy.delay(attempts_in_run))
        deadline = self.current.deadline
        if not_before >= deadline:
            return
        self._schedule(
            attempt + 1,
            ScheduleReason.AUTO_RETRY,
            now,
            not_before=not_before,
            ttl_seconds=self.ttl_seconds,
            deadline=deadline,
            by=AUTO_RETRY_ACTOR,
        )

    def expire(self, attempt: int, detected_by: str, now: datetime) -> None:
        current = self._require_current(attempt, "expire")
        self._require_not_terminal(f"attempt {attempt} cannot expire")
        if now < current.deadline:
            raise DeadlineNotReached(
                self.id,
                f"attempt {attempt} has until {current.deadline.isoformat()}; "
                "it cannot expire before its deadline",
            )
        self.trigger_event(
            self.TaskExpired, timestamp=_utc(now), attempt=attempt, detected_by=detected_by
        )

    def cancel(self, by: str, reason: str, now: datetime, bulk_id: str | None = None) -> None:
        check_text("reason", reason)
        self._require_not_terminal("it cannot be cancelled")
        self.trigger_event(
            self.TaskCancelled,
            timestamp=_utc(now),
            attempt=self.current.number,
            by=by,
            reason=reason,
            bulk_id=bulk_id,
        )

    def retry(
        self,
        now: datetime,
        ttl_seconds: float | None,
        limits: TaskLimits,
        by: str,
        bulk_id: str | None = None,
    ) -> None:
        """A client's retry: a new run of attempts with a new deadline. History is kept."""
        if self.status not in RETRYABLE_BY_CLIENT:
            raise NotRetryable(
                self.id,
                f"task is {self.status}; only Failed, Expired or Cancelled tasks can be retried",
            )
        ttl = self.ttl_seconds if ttl_seconds is None else ttl_seconds
        check_ttl(ttl, limits)
        self._schedule(
            self.current.number + 1,
            ScheduleReason.MANUAL_RETRY,
            now,
            not_before=now,
            ttl_seconds=ttl,
            by=by,
            bulk_id=bulk_id,
        )

    def update(
        self,
        patch: dict[str, Any],
        by: str,
        now: datetime,
        limits: TaskLimits,
        targets: TargetPolicy | None = None,
    ) -> bool:
        """Apply a JSON merge patch to the task's fields; return whether anything changed.

        `description` may change in any state; `data`, `code`, `ttl_seconds` and
        `max_attempts` only while the task is Pending; `callback_url` and
        `callback_events` (null: none, the default) until it is terminal.
        """
        if not isinstance(patch, dict):
            raise InvalidTask("patch", "must be a JSON object")
        unknown = sorted(set(patch) - UPDATABLE)
        if unknown:
            raise InvalidTask(unknown[0], "is not a field that can be updated")
        changes: dict[str, Any] = {}
        for name, value in patch.items():
            new = merge_patch(self.data, value) if name == "data" else value
            if new is None and name not in ("data", *UPDATABLE_WHILE_OPEN):
                raise InvalidTask(name, "cannot be removed (null)")
            if new != getattr(self, name) or type(new) is not type(getattr(self, name)):
                changes[name] = new
        if not changes:
            return False
        locked = sorted(set(changes) & UPDATABLE_WHILE_PENDING)
        if locked and self.status is not Status.PENDING:
            raise FieldLocked(
                self.id,
                f"task is {self.status}; {', '.join(locked)} can only change while it is Pending",
            )
        open_locked = sorted(set(changes) & UPDATABLE_WHILE_OPEN)
        if open_locked and self.status.is_terminal:
            raise TaskIsTerminal(
                self.id,
                f"task is already {self.status}; {', '.join(open_locked)} can only change "
                "until it is terminal",
            )
        check_fields({k: v for k, v in changes.items() if k not in UPDATABLE_WHILE_OPEN}, limits)
        if changes.get("callback_url") is not None:
            check_callback_url(changes["callback_url"], targets or TargetPolicy())
        if "callback_events" in changes:
            check_callback_events(changes["callback_events"])
        if "ttl_seconds" in changes and self.run_deadline_for(changes["ttl_seconds"]) <= now:
            raise InvalidTask(
                "ttl_seconds",
                f"{changes['ttl_seconds']} would put the deadline in the past "
                f"(the attempt was scheduled at {self.run_first.scheduled_at.isoformat()})",
            )
        self.trigger_event(self.TaskUpdated, timestamp=_utc(now), changes=changes, by=by)
        return True

    def record_webhook_attempt(
        self,
        *,
        delivery_id: UUID,
        trigger_version: int,
        trigger_type: str,
        url: str,
        delivery_attempt: int,
        outcome: str,
        status_code: int | None,
        error: str | None,
        next_attempt_at: datetime | None,
        now: datetime,
    ) -> None:
        """Record one attempt to deliver a webhook: allowed in any state."""
        if outcome not in DELIVERY_OUTCOMES:
            raise InvalidTask("outcome", f"must be one of {', '.join(DELIVERY_OUTCOMES)}")
        if not 1 <= trigger_version <= self.version:
            raise InvalidTask(
                "trigger_version", f"is {trigger_version}; the task is at version {self.version}"
            )
        self.trigger_event(
            self.WebhookAttempted,
            timestamp=_utc(now),
            delivery_id=delivery_id,
            trigger_version=trigger_version,
            trigger_type=trigger_type,
            url=url,
            delivery_attempt=delivery_attempt,
            outcome=outcome,
            status_code=status_code,
            error=None if error is None else without_nul(error)[:2_000],
            next_attempt_at=next_attempt_at,
        )

    # -- helpers -----------------------------------------------------------------------------

    def _schedule(
        self,
        attempt: int,
        reason: ScheduleReason,
        now: datetime,
        *,
        not_before: datetime,
        ttl_seconds: float,
        by: str,
        deadline: datetime | None = None,
        bulk_id: str | None = None,
    ) -> None:
        self.trigger_event(
            self.AttemptScheduled,
            timestamp=_utc(now),
            attempt=attempt,
            reason=str(reason),
            not_before=not_before,
            deadline=deadline or now + timedelta(seconds=ttl_seconds),
            ttl_seconds=ttl_seconds,
            by=by,
            bulk_id=bulk_id,
        )

    def _require_current(self, attempt: int, verb: str) -> Attempt:
        current = self.current
        if attempt != current.number:
            raise AttemptNotCurrent(
                self.id,
                f"cannot {verb} attempt {attempt}: the current attempt is {current.number} "
                "(a stale or duplicate command; drop it)",
            )
        return current

    def _require_not_terminal(self, consequence: str) -> None:
        if self.status.is_terminal:
            raise TaskIsTerminal(self.id, f"task is already {self.status}; {consequence}")

    def _require_running(self, attempt: int, verb: str) -> Attempt:
        current = self._require_current(attempt, verb)
        self._require_not_terminal(f"attempt {attempt} already has its outcome")
        if current.started_at is None:
            raise AttemptNotStarted(self.id, f"cannot {verb} attempt {attempt}: it has not started")
        return current
