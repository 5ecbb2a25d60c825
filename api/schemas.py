"""Request and response bodies. These models are the OpenAPI schema, too."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

Language = Literal["python", "csharp", "echo"]
StatusName = Literal["Pending", "InProgress", "Completed", "Expired", "Failed", "Cancelled"]
# The transitions a callback may name (ledger.targets.CALLBACK_EVENTS).
CallbackEvent = Literal[
    "AttemptScheduled",
    "AttemptStarted",
    "AttemptCompleted",
    "AttemptFailed",
    "TaskExpired",
    "TaskCancelled",
]
CALLBACK_URL = (
    "Where to POST this task's webhooks (http or https, at most 2,000 characters, no "
    "credentials; private, loopback and link-local addresses are refused). Null: the "
    "tenant's default callback, if any. See docs/webhooks.md."
)
CALLBACK_EVENTS = (
    "Which transitions are sent. Null: the terminal ones (AttemptCompleted, TaskExpired, "
    "TaskCancelled, and AttemptFailed when no automatic retry follows it); a type named "
    "here is sent every time it happens."
)


class _Request(BaseModel):
    # Strict: "3" is not 3, and a field the API does not know is an error, not a silence.
    model_config = ConfigDict(extra="forbid", strict=True)


class TaskCreate(_Request):
    description: str = Field(
        default="", max_length=1_000, description="What the task is for (at most 1,000 characters)."
    )
    language: Language = Field(
        description="`echo` runs no program and returns `data` (a pipeline check)."
    )
    code: str | None = Field(
        default=None, description="The program (at most 64 KiB). Optional only for `echo`."
    )
    data: Any = Field(
        default=None, description="Any JSON value (at most 256 KiB); the program reads it on stdin."
    )
    ttl_seconds: float = Field(
        default=300.0, gt=0, le=86_400, description="Time budget from scheduling, in seconds."
    )
    max_attempts: int = Field(
        default=3, ge=1, le=10, description="Attempts per run, counting automatic retries."
    )
    callback_url: str | None = Field(default=None, max_length=2_000, description=CALLBACK_URL)
    callback_events: list[CallbackEvent] | None = Field(
        default=None, min_length=1, description=CALLBACK_EVENTS
    )

    @model_validator(mode="after")
    def _code_unless_echo(self) -> TaskCreate:
        if self.code is None and self.language != "echo":
            raise ValueError("code is required unless language is echo")
        return self


class TaskPatch(_Request):
    """A JSON merge patch (RFC 7396). `data` is merged; `null` inside it removes a key."""

    description: str | None = Field(default=None, max_length=1_000)
    data: Any = None
    code: str | None = None
    ttl_seconds: float | None = Field(default=None, gt=0, le=86_400)
    max_attempts: int | None = Field(default=None, ge=1, le=10)
    callback_url: str | None = Field(
        default=None,
        max_length=2_000,
        description="Until the task is terminal; null removes it (the tenant's default applies).",
    )
    callback_events: list[CallbackEvent] | None = Field(
        default=None,
        min_length=1,
        description="Until the task is terminal; null: the terminal transitions.",
    )


class RetryRequest(_Request):
    ttl_seconds: float | None = Field(
        default=None, gt=0, le=86_400, description="A new time budget for the new attempt."
    )


class CancelRequest(_Request):
    reason: str = Field(default="", max_length=1_000)


class Result(BaseModel):
    stdout: str
    stderr: str
    exit_code: int
    duration_ms: float
    truncated: bool


class TaskError(BaseModel):
    kind: str = Field(description="program_error, compile_error, unknown_language, worker_lost, …")
    message: str


ATTEMPT = (
    "The current attempt's number over the task's whole life: a manual retry continues the "
    "count (a task with max_attempts 1 retried once is on attempt 2)."
)
RUN_ATTEMPT = (
    "The current attempt's number within its run (since the submit or the last manual "
    "retry), from 1: what max_attempts bounds."
)
MAX_ATTEMPTS = "Attempts per run, counting automatic retries; a manual retry starts a new run."


class LastDelivery(BaseModel):
    """The task's last webhook delivery attempt."""

    delivery_id: UUID = Field(description="The `webhook-id` header: the same on every re-send.")
    trigger_type: str = Field(description="The event the webhook was sent for.")
    outcome: Literal["delivered", "failed", "gave-up"] = Field(
        description="failed: it is tried again later; gave-up: its retry window ended."
    )
    status_code: int | None = Field(description="The receiver's HTTP status, if it answered.")
    error: str | None = Field(description="Why it failed, when it did.")
    attempt: int = Field(description="The delivery's attempt number, from 1.")
    at: datetime


class TaskOut(BaseModel):
    id: UUID
    description: str
    language: str
    code: str | None = Field(default=None, description="Omitted in lists.")
    data: Any = Field(default=None, description="Omitted in lists.")
    status: StatusName
    attempt: int = Field(description=ATTEMPT)
    run_attempt: int = Field(description=RUN_ATTEMPT)
    max_attempts: int = Field(description=MAX_ATTEMPTS)
    ttl_seconds: float
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    result: Result | None
    error: TaskError | None
    version: int
    callback_url: str | None = Field(default=None, description=CALLBACK_URL)
    callback_events: list[str] | None = Field(default=None, description=CALLBACK_EVENTS)
    last_delivery: LastDelivery | None = Field(
        default=None, description="The last webhook delivery attempt (docs/webhooks.md)."
    )


class TaskSummaryOut(BaseModel):
    """A task as the list shows it (from the status view)."""

    id: UUID
    description: str
    language: str
    status: StatusName
    attempt: int = Field(description=ATTEMPT)
    max_attempts: int = Field(description=MAX_ATTEMPTS)
    ttl_seconds: float
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    summary: str | None = Field(description="The start of stdout, or the error message.")
    error_kind: str | None
    version: int


class TaskList(BaseModel):
    items: list[TaskSummaryOut]
    next_cursor: str | None


class HistoryItem(BaseModel):
    version: int
    type: str
    at: datetime
    data: dict[str, Any]
    position: int | None = Field(description="the event's position in the ledger's log")
    hash: str | None = Field(
        description="the hash chain at this event (hex SHA-256): `taskledger ledger verify` "
        "recomputes it; see docs/ledger.md, Tamper evidence"
    )


class History(BaseModel):
    items: list[HistoryItem]


class AuditItem(BaseModel):
    position: int
    task_id: UUID
    type: str
    attempt: int | None
    worker_id: str | None
    at: datetime
    version: int
    data: dict[str, Any]


class AuditList(BaseModel):
    items: list[AuditItem]
    next_cursor: str | None


class ProjectionLag(BaseModel):
    position: int
    lag_events: int


class FeedEvent(BaseModel):
    position: int = Field(description="in the ledger's log; resume after it")
    task_id: UUID
    version: int
    type: str
    at: datetime
    data: dict[str, Any] = Field(description="the event's own fields")
    hash: str | None = Field(description="the hash chain at this position (hex SHA-256)")


class EventFeed(BaseModel):
    items: list[FeedEvent]
    next_after: int = Field(description="pass as `after` for the next page")


class ChainPoint(BaseModel):
    position: int
    chain: str = Field(description="hex SHA-256 of the hash chain at this position")


class ChainProblem(BaseModel):
    position: int
    kind: Literal[
        "changed",
        "unlinked",
        "version_gap",
        "out_of_order",
        "tail_deleted",
        "unchained",
        "truncated",
        "rewritten",
    ]


class LedgerVerification(BaseModel):
    """The hash chain walked end to end: counts, positions and hashes only (no task's id
    or content). `taskledger ledger verify` names the task and explains."""

    status: Literal["ok", "broken"]
    events: int
    head: ChainPoint
    problem: ChainProblem | None
    seconds: float


class RunTime(BaseModel):
    """Start to finish of the tasks completed in the last hour (their last attempt)."""

    count: int
    p50_ms: float | None
    p95_ms: float | None


class Stats(BaseModel):
    counts: dict[str, int]
    projections: dict[str, ProjectionLag]
    queue_depth: int = Field(description="Pending tasks that may start now (not in a backoff).")
    run_time: RunTime


class MinuteOutcomes(BaseModel):
    minute: datetime = Field(description="The start of the minute (UTC).")
    completed: int
    failed: int
    expired: int


class OutcomesPerMinute(BaseModel):
    """Attempt outcomes per minute, oldest first; minutes without any have zeros."""

    minutes: list[MinuteOutcomes]


class TaskFilterIn(_Request):
    """Which tasks: the filters of `GET /api/tasks`."""

    status: list[StatusName] = Field(default_factory=list, description="Any of these.")
    language: Language | None = None
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None
    q: str | None = Field(
        default=None, min_length=1, max_length=200, description="Description contains (any case)."
    )


class BulkRequest(_Request):
    action: Literal["retry", "cancel"]
    filter: TaskFilterIn = Field(default_factory=TaskFilterIn)
    reason: str = Field(default="", max_length=1_000, description="For a cancel: why.")
    limit: int = Field(
        default=1_000,
        ge=1,
        le=1_000,
        description="Refuse (422, nothing done) if more tasks than this match: a client "
        "that confirmed N tasks sends N, and learns if more match by now.",
    )


class RefusedTask(BaseModel):
    id: UUID
    why: str


class BulkOut(BaseModel):
    bulk_id: str = Field(description="On each acted-on task's event (`bulk_id`).")
    action: Literal["retry", "cancel"]
    matched: int
    done: int
    refused: dict[str, int] = Field(description="Why tasks were refused, and how many each.")
    refused_tasks: list[RefusedTask] = Field(description="The first 100 refused tasks.")


class KeyOut(BaseModel):
    key_id: str
    tenant: str
    role: Literal["read", "submit", "admin"]
    label: str
    source: Literal["issued", "configured"] = Field(
        description="issued through the API or `taskledger keys`, or configured in "
        "TASKLEDGER_API_KEYS (changed there, not here)"
    )
    issued_by: str | None
    issued_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None


class KeyList(BaseModel):
    items: list[KeyOut]


class KeyCreate(_Request):
    tenant: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")
    role: Literal["read", "submit", "admin"]
    label: str = Field(default="", max_length=200)


class IssuedKey(KeyOut):
    key: str = Field(description="The key itself: shown this once, never stored.")


class WebhookSecretOut(BaseModel):
    """A tenant's webhook signing secret (Standard Webhooks' `whsec_…`)."""

    tenant: str
    secret_id: str
    secret: str = Field(description="`whsec_` and the base64 of 32 random bytes.")
    created_at: datetime
    previous_secret_id: str | None = Field(
        description="The secret before it, while it still signs (beside this one)."
    )
    previous_signs_until: datetime | None = Field(
        description="When the previous secret stops signing (24 h after the rotation)."
    )


class WebhookDefaultIn(_Request):
    callback_url: str | None = Field(
        max_length=2_000,
        description="Where the tenant's tasks without a callback of their own send their "
        "webhooks; null clears it.",
    )
    callback_events: list[CallbackEvent] | None = Field(
        default=None, min_length=1, description=CALLBACK_EVENTS
    )


class WebhookDefaultOut(BaseModel):
    tenant: str
    callback_url: str | None
    callback_events: list[str] | None
    updated_at: datetime | None = Field(description="When it was last set (null: never).")


class WebhookEvent(BaseModel):
    version: int = Field(description="The event's version in the task's history.")
    type: str
    at: datetime
    data: dict[str, Any] = Field(description="The event's own fields, as the history gives them.")


class WebhookPayload(BaseModel):
    """The body of a webhook: the task as `GET /api/tasks/{id}?as_of_version=<event's
    version>` answers it, and the event that triggered it (docs/webhooks.md)."""

    type: str = Field(description="The triggering event's type, e.g. AttemptCompleted.")
    task: TaskOut
    event: WebhookEvent


class WorkerAttempt(BaseModel):
    task_id: UUID
    attempt: int
    language: str


class WorkerOut(BaseModel):
    """A worker, from its heartbeats."""

    worker_id: str
    host: str
    pid: int
    version: str
    state: str = Field(
        description="alive (renewing its leases), lost (silent longer than a lease: its "
        "attempts are taken and retried), stopped (shut down)"
    )
    slots: int = Field(description="programs it runs at once (--concurrency)")
    busy: int = Field(description="slots running a program at its last heartbeat")
    running: int = Field(description="attempts it held at its last heartbeat")
    attempts: list[WorkerAttempt] | None = Field(
        default=None, description="those attempts (admin keys only: they span tenants)"
    )
    started_at: datetime
    last_seen: datetime


class Workers(BaseModel):
    workers: list[WorkerOut]


class FieldProblem(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] | None = None
    request_id: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="degraded: only the broker fails; tasks are still accepted (200)"
    )
    checks: dict[str, str] = Field(default_factory=dict)


def dump_json(body: BaseModel, *, exclude_unset: bool = False) -> bytes:
    """`body` as JSON: its model's fields as validated, nested models too, written by orjson
    (times in UTC as "Z"). `exclude_unset`: the fields the body was not given are absent.

    Not model_dump() nor pydantic's to_json: both go value by value through every dict
    and list inside a field typed Any (a task's `data`, up to 256 KiB), 4 to 5 times
    slower than orjson for a task with 200 KB of data; orjson writes them as they are, and
    is faster on a task and on a 100-item page as well. Hence the response models must not
    change how a field is written (no serializers, aliases, excluded or computed fields):
    tests/integration/test_api_bodies.py holds them to it.
    """
    return orjson.dumps(
        body, default=_set_fields if exclude_unset else _fields, option=orjson.OPT_UTC_Z
    )


def _fields(value: object) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError(f"{type(value).__name__} is not a JSON type")


def _set_fields(value: object) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return {k: v for k, v in value.__dict__.items() if k in value.model_fields_set}
    raise TypeError(f"{type(value).__name__} is not a JSON type")
