"""What the ledger answers about a task: its state read from its events, its history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from ledger.domain import Task
from ledger.jsonvalue import JSONValue
from ledger.values import Attempt, Status


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
    callback_url: str | None = None
    callback_events: list[str] | None = None
    last_delivery: dict[str, Any] | None = None  # the last WebhookAttempted, if any

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
            callback_url=task.callback_url,
            callback_events=None if task.callback_events is None else list(task.callback_events),
            last_delivery=None if task.last_delivery is None else dict(task.last_delivery),
        )


@dataclass(frozen=True)
class Submission:
    task: TaskState
    created: bool  # False when an idempotency key matched an earlier identical submission


@dataclass(frozen=True)
class HistoryEntry:
    version: int
    type: str
    at: datetime
    data: dict[str, Any]
    position: int | None = None  # in the log
    hash: str | None = None  # the chain there, hex (ledger.chain)
