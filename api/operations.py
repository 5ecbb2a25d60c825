"""The API's operations as data: paths, parameters, bodies, answers. api/openapi.py makes
the OpenAPI document of them; the routes themselves are in api/app.py."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from api import schemas
from api.system import EVENT_TYPES

PROBLEM_RESPONSES = {
    "400": "Malformed parameter or header",
    "401": "Missing or invalid API key",
    "403": "The key's role does not allow this",
    "404": "No such task (or not this tenant's, or the id is not a UUID)",
    "409": "The task's state forbids this",
    "412": "If-Match names another version",
    "413": "Request body too large",
    "415": "Body is not JSON",
    "422": "Invalid field (named in `errors`)",
    "429": "Too many event streams open for this key",
    "503": "The event store is unavailable",
}


@dataclass(frozen=True)
class Param:
    name: str
    location: str  # "query" | "path" | "header"
    schema: dict[str, Any]
    description: str
    required: bool = False
    repeatable: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    response: type[BaseModel] | None
    status: int = 200
    body: type[BaseModel] | None = None
    body_required: bool = True
    params: tuple[Param, ...] = ()
    problems: tuple[str, ...] = ("401", "403", "422")
    auth: bool = True
    extra_responses: dict[str, str] = field(default_factory=dict)
    event_stream: bool = False  # also answers text/event-stream (Accept), one item per event
    exports: type[BaseModel] | None = None  # ?format=ndjson|csv streams these items


FORMAT = Param(
    "format",
    "query",
    {"type": "string", "enum": ["json", "ndjson", "csv"], "default": "json"},
    "ndjson or csv: every matching event, streamed as a file (one item per line, or a "
    "header row and one row per item with `data` as a JSON string); not with limit/cursor.",
)
TASK_ID = Param(
    "task_id",
    "path",
    {"type": "string", "format": "uuid"},
    "The task's id. One that is not a UUID names no task: 404, like an unknown one.",
    True,
)
WEBHOOK_TENANT = Param(
    "tenant",
    "query",
    {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,100}$"},
    "The tenant (default: the admin key's own).",
)
TIME = {"type": "string", "format": "date-time"}
CURSOR = {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9_-]+$"}

OPERATIONS = (
    Operation(
        "post",
        "/api/tasks",
        "submitTask",
        "Submit a task",
        schemas.TaskOut,
        201,
        body=schemas.TaskCreate,
        params=(
            Param(
                "Idempotency-Key",
                "header",
                {"type": "string", "maxLength": 255},
                "Repeat a request safely: the same key and body return the same task.",
            ),
        ),
        problems=("401", "403", "409", "413", "415", "422", "503"),
        extra_responses={"200": "The task an earlier request with this Idempotency-Key created"},
    ),
    Operation(
        "get",
        "/api/tasks",
        "listTasks",
        "List tasks, newest first",
        schemas.TaskList,
        params=(
            Param(
                "status",
                "query",
                {"type": "string", "enum": list(typing.get_args(schemas.StatusName))},
                "Only tasks in this status (repeatable).",
                repeatable=True,
            ),
            Param(
                "language",
                "query",
                {"type": "string", "enum": ["python", "csharp", "echo"]},
                "Only tasks in this language.",
            ),
            Param("created_after", "query", TIME, "Created after this time (RFC 3339)."),
            Param("created_before", "query", TIME, "Created before this time (RFC 3339)."),
            Param(
                "q",
                "query",
                {"type": "string", "minLength": 1, "maxLength": 200},
                "Only tasks whose description contains this text (any case).",
            ),
            Param(
                "limit",
                "query",
                {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                "Page size.",
            ),
            Param("cursor", "query", CURSOR, "`next_cursor` of the previous page."),
            Param(
                "as_of",
                "query",
                TIME,
                "The tasks created by this time (RFC 3339), each as it was then; the filters "
                "apply to those states. From the task_periods view (one row per version).",
            ),
        ),
        problems=("400", "401", "403", "422"),
    ),
    Operation(
        "get",
        "/api/tasks/{task_id}",
        "getTask",
        "Get a task (from the event store)",
        schemas.TaskOut,
        params=(
            TASK_ID,
            Param(
                "wait",
                "query",
                {"type": "number", "minimum": 0, "maximum": 60},
                "Long-poll: answer once the task is terminal, or after this many seconds.",
            ),
            Param(
                "as_of",
                "query",
                TIME,
                "The task exactly as it was at this time (RFC 3339), replayed from its events "
                "up to then; 404 if it did not exist yet. Not with `wait`.",
            ),
            Param(
                "as_of_version",
                "query",
                {"type": "integer", "minimum": 1},
                "The task as it was at this version (its first N events). Not with `as_of`.",
            ),
        ),
        problems=("401", "403", "404", "422", "503"),
    ),
    Operation(
        "patch",
        "/api/tasks/{task_id}",
        "updateTask",
        "Update a task (JSON merge patch)",
        schemas.TaskOut,
        body=schemas.TaskPatch,
        params=(
            TASK_ID,
            Param(
                "If-Match",
                "header",
                {"type": "string", "pattern": '^(W/)?"?[0-9]+"?$'},
                "The version (ETag) you read; 412 if the task has changed since.",
            ),
        ),
        problems=("400", "401", "403", "404", "409", "412", "413", "415", "422", "503"),
    ),
    Operation(
        "post",
        "/api/tasks/{task_id}/retry",
        "retryTask",
        "Retry a Failed, Expired or Cancelled task (a new attempt, a new deadline)",
        schemas.TaskOut,
        body=schemas.RetryRequest,
        body_required=False,
        params=(TASK_ID,),
        problems=("401", "403", "404", "409", "413", "415", "422", "503"),
    ),
    Operation(
        "post",
        "/api/tasks/{task_id}/cancel",
        "cancelTask",
        "Cancel a task that is not terminal",
        schemas.TaskOut,
        body=schemas.CancelRequest,
        body_required=False,
        params=(TASK_ID,),
        problems=("401", "403", "404", "409", "413", "415", "422", "503"),
    ),
    Operation(
        "post",
        "/api/tasks/bulk",
        "bulkTasks",
        "Retry or cancel every task a filter selects (at most 1,000); each acted-on task's "
        "event carries the answer's bulk_id, and each refused one is counted with why",
        schemas.BulkOut,
        body=schemas.BulkRequest,
        problems=("401", "403", "413", "415", "422", "503"),
    ),
    Operation(
        "get",
        "/api/tasks/{task_id}/history",
        "taskHistory",
        "Every event of a task, in order",
        schemas.History,
        params=(TASK_ID, FORMAT),
        problems=("401", "403", "404", "422", "503"),
        exports=schemas.HistoryItem,
    ),
    Operation(
        "get",
        "/api/audit",
        "audit",
        "Events across tasks, newest first",
        schemas.AuditList,
        exports=schemas.AuditItem,
        params=(
            FORMAT,
            Param(
                "type",
                "query",
                {"type": "string", "enum": list(EVENT_TYPES)},
                "Only events of this type (repeatable).",
                repeatable=True,
            ),
            Param(
                "task_id", "query", {"type": "string", "format": "uuid"}, "Only this task's events."
            ),
            Param("worker_id", "query", {"type": "string"}, "Only events of attempts it ran."),
            Param("since", "query", TIME, "At or after this time."),
            Param("until", "query", TIME, "Before this time."),
            Param(
                "limit",
                "query",
                {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                "Page size.",
            ),
            Param("cursor", "query", CURSOR, "`next_cursor` of the previous page."),
        ),
        problems=("400", "401", "403", "422"),
    ),
    Operation(
        "get",
        "/api/stats",
        "stats",
        "Counts by status, queue depth, run time p50/p95 (last hour), projection lag",
        schemas.Stats,
    ),
    Operation(
        "get",
        "/api/stats/minutes",
        "statsMinutes",
        "Attempts completed, failed and expired per minute (the dashboard's chart)",
        schemas.OutcomesPerMinute,
        params=(
            Param(
                "minutes",
                "query",
                {"type": "integer", "minimum": 1, "maximum": 1440, "default": 60},
                "How many minutes back, the current one included.",
            ),
        ),
    ),
    Operation(
        "get",
        "/api/keys",
        "listKeys",
        "API keys (admin): configured and issued, never their secrets",
        schemas.KeyList,
        problems=("401", "403", "422"),
    ),
    Operation(
        "post",
        "/api/keys",
        "issueKey",
        "Issue an API key (admin); the answer holds the key, the one time it is shown",
        schemas.IssuedKey,
        201,
        body=schemas.KeyCreate,
        problems=("401", "403", "413", "415", "422", "503"),
    ),
    Operation(
        "post",
        "/api/keys/{key_id}/revoke",
        "revokeKey",
        "Revoke an issued API key (admin); it stops working within 10 s",
        schemas.KeyOut,
        params=(Param("key_id", "path", {"type": "string"}, "The key's id.", True),),
        problems=("401", "403", "404", "409", "422", "503"),
    ),
    Operation(
        "get",
        "/api/webhooks/secret",
        "getWebhookSecret",
        "The tenant's webhook signing secret (admin; made on first need), and whether the "
        "previous one still signs and until when",
        schemas.WebhookSecretOut,
        params=(WEBHOOK_TENANT,),
        problems=("400", "401", "403", "422", "503"),
    ),
    Operation(
        "post",
        "/api/webhooks/secret",
        "rotateWebhookSecret",
        "Rotate the tenant's webhook signing secret (admin): the new one signs at once, the "
        "previous one beside it for 24 h",
        schemas.WebhookSecretOut,
        params=(WEBHOOK_TENANT,),
        problems=("400", "401", "403", "422", "503"),
    ),
    Operation(
        "get",
        "/api/webhooks/default",
        "getWebhookDefault",
        "The tenant's default callback (admin): for its tasks without one of their own",
        schemas.WebhookDefaultOut,
        params=(WEBHOOK_TENANT,),
        problems=("400", "401", "403", "422", "503"),
    ),
    Operation(
        "put",
        "/api/webhooks/default",
        "setWebhookDefault",
        "Set the tenant's default callback (admin); a null callback_url clears it",
        schemas.WebhookDefaultOut,
        body=schemas.WebhookDefaultIn,
        params=(WEBHOOK_TENANT,),
        problems=("400", "401", "403", "413", "415", "422", "503"),
    ),
    Operation(
        "get",
        "/api/workers",
        "workers",
        "Workers from their heartbeats: slots, busy, attempts, last seen",
        schemas.Workers,
    ),
    Operation(
        "get",
        "/api/events",
        "events",
        "The ledger's events after a position, oldest first (the caller's tenant's); with "
        "Accept: text/event-stream, a live stream resumable with Last-Event-ID",
        schemas.EventFeed,
        params=(
            Param(
                "after",
                "query",
                {"type": "integer", "minimum": 0, "default": 0},
                "Events past this position (`next_after` of the previous page; a stream's "
                "Last-Event-ID header takes its place).",
            ),
            Param(
                "limit",
                "query",
                {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                "Page size (JSON pages only).",
            ),
        ),
        problems=("400", "401", "403", "422", "429"),
        event_stream=True,
    ),
    Operation(
        "get",
        "/api/ledger/verify",
        "verifyLedger",
        "Walk the ledger's hash chain (admin): ok, or the first broken position",
        schemas.LedgerVerification,
    ),
    Operation("get", "/healthz", "healthz", "Liveness", schemas.Health, auth=False, problems=()),
    Operation(
        "get",
        "/readyz",
        "readyz",
        "Readiness: database, broker, projections",
        schemas.Health,
        auth=False,
        problems=(),
        extra_responses={"503": "Not ready (see `checks`)"},
    ),
)
