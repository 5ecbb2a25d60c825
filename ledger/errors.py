"""The ledger's errors: one base class, each subclass names the rule that was broken.

Callers map these to their own world (HTTP statuses in `api/errors.py`, ack-and-drop in the
workers); the ledger never knows about either.
"""

from __future__ import annotations

from uuid import UUID


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""


class TaskNotFound(LedgerError):
    def __init__(self, task_id: UUID) -> None:
        super().__init__(f"task {task_id} does not exist")
        self.task_id = task_id


class KeyNotFound(LedgerError):
    pass


class InvalidTask(LedgerError):
    """A value given to a command is outside what the task accepts. Nothing was written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TransitionRefused(LedgerError):
    """The task's current state forbids the command. Nothing was written.

    `rule` is a stable machine-readable name of the rule (for logs, metrics and problem
    types); the message says what the state is and what to do instead.
    """

    rule = "transition-refused"

    def __init__(self, task_id: UUID, message: str) -> None:
        super().__init__(f"task {task_id}: {message}")
        self.task_id = task_id
        self.reason = message  # the same, without the task (a bulk action counts by it)


class AttemptNotCurrent(TransitionRefused):
    """A command names an attempt that is not the task's latest one (stale or duplicate)."""

    rule = "attempt-not-current"


class AttemptAlreadyStarted(TransitionRefused):
    rule = "attempt-already-started"


class AttemptLeaseLost(TransitionRefused):
    """A worker's outcome for an attempt whose lease it no longer holds (it lapsed, or
    the leader recorded the attempt as worker_lost): not recorded."""

    rule = "attempt-lease-lost"


class AttemptNotStarted(TransitionRefused):
    rule = "attempt-not-started"


class TaskIsTerminal(TransitionRefused):
    rule = "task-is-terminal"


class DeadlineNotReached(TransitionRefused):
    rule = "deadline-not-reached"


class DeadlinePassed(TransitionRefused):
    rule = "deadline-passed"


class NotRetryable(TransitionRefused):
    rule = "not-retryable"


class FieldLocked(TransitionRefused):
    """An update touches a field that may only change while the task is Pending."""

    rule = "field-locked"


class VersionMismatch(LedgerError):
    """An update named a version (If-Match) that is no longer the task's version."""

    def __init__(self, task_id: UUID, expected: int, actual: int) -> None:
        super().__init__(
            f"task {task_id} is at version {actual}, not {expected}: "
            "read it again and reapply your change"
        )
        self.task_id = task_id
        self.expected = expected
        self.actual = actual


class IdempotencyConflict(LedgerError):
    """The idempotency key was used before with a different request."""

    def __init__(self, task_id: UUID, key: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for task {task_id} with a different "
            "request; use a new key for a new task"
        )
        self.task_id = task_id
        self.key = key


class ContentionExhausted(LedgerError):
    """A command lost the optimistic-concurrency race more times than it may retry."""

    def __init__(self, task_id: UUID, tries: int) -> None:
        super().__init__(
            f"task {task_id}: gave up after losing {tries} concurrent-write races in a row; "
            "the task is being written by many writers at once, try again"
        )
        self.task_id = task_id


class LedgerUnavailable(LedgerError):
    """The event store could not be reached or refused the operation."""
