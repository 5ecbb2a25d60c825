"""The values the Task aggregate is made of: statuses, an attempt, its outcome, and the
bounds on what a task may carry. Plain data: no rules, no events."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from ledger.jsonvalue import without_nul


class Status(StrEnum):
    PENDING = "Pending"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILED = "Failed"
    EXPIRED = "Expired"
    CANCELLED = "Cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.EXPIRED, Status.CANCELLED})
RETRYABLE_BY_CLIENT = frozenset({Status.FAILED, Status.EXPIRED, Status.CANCELLED})


class ScheduleReason(StrEnum):
    SUBMITTED = "submitted"
    AUTO_RETRY = "auto-retry"
    MANUAL_RETRY = "manual-retry"


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TaskLimits:
    """Bounds on what a task may carry: the one payload budget. The API refuses a task
    beyond it; the sandbox keeps this much of each output stream; and the ledger cuts
    whatever reaches it beyond its output bound (a worker configured otherwise cannot
    grow an event). So the largest event is known: TaskSubmitted, code + data; an
    attempt's outcome, stdout + stderr (docs/ledger.md, "The payload budget"), and the
    store carries it in every mode (tests/e2e: `taskledger dev` at each limit)."""

    description_chars: int = 1_000
    code_bytes: int = 64 * 1024
    data_bytes: int = 256 * 1024
    output_bytes: int = 1024 * 1024  # each of stdout and stderr, as UTF-8
    max_ttl_seconds: float = 86_400
    max_attempts: int = 10


def cut(text: str, limit: int) -> tuple[str, bool]:
    """At most `limit` bytes of `text` as UTF-8, cut on a character boundary; and
    whether anything was cut."""
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes: no need to look
        return text, False
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text, False
    return encoded[:limit].decode("utf-8", "ignore"), True


@dataclass(frozen=True)
class AttemptResult:
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    duration_ms: float = 0.0
    truncated: bool = False

    def within(self, output_bytes: int) -> AttemptResult:
        """This result with stdout and stderr cut to `output_bytes` each (truncated if
        either was)."""
        stdout, cut_out = cut(self.stdout, output_bytes)
        stderr, cut_err = cut(self.stderr, output_bytes)
        if not (cut_out or cut_err):
            return self
        return replace(self, stdout=stdout, stderr=stderr, truncated=True)

    def as_payload(self) -> dict[str, Any]:
        return {
            "stdout": without_nul(self.stdout),
            "stderr": without_nul(self.stderr),
            "exit_code": self.exit_code,
            "duration_ms": self.duration_ms,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class AttemptError:
    """Why an attempt failed. `kind` is a stable name: program_error, compile_error,
    unknown_language, invalid_code, worker_lost, sandbox_error..."""

    kind: str
    message: str
    stderr: str = ""
    exit_code: int | None = None

    def within(self, output_bytes: int) -> AttemptError:
        """This error with its message and stderr cut to `output_bytes` each."""
        message, cut_message = cut(self.message, output_bytes)
        stderr, cut_stderr = cut(self.stderr, output_bytes)
        if not (cut_message or cut_stderr):
            return self
        return replace(self, message=message, stderr=stderr)

    def as_payload(self) -> dict[str, Any]:
        return {
            "kind": without_nul(self.kind),
            "message": without_nul(self.message),
            "stderr": without_nul(self.stderr),
            "exit_code": self.exit_code,
        }


@dataclass
class Attempt:
    """One try at running the task. Mutable only through the task's events."""

    number: int
    reason: str
    scheduled_at: datetime
    not_before: datetime
    deadline: datetime
    started_at: datetime | None = None
    worker_id: str | None = None
    finished_at: datetime | None = None
    outcome: Outcome | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    retryable: bool | None = None
    detected_by: str | None = None
