"""The OpenAPI 3.1 document, generated from the pydantic models and the route table."""

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
    Operation("get", "/api/stats", "stats", "Counts by status and projection lag", schemas.Stats),
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


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi() -> dict[str, Any]:
    components: dict[str, Any] = {}

    def register(model: type[BaseModel], mode: str) -> None:
        schema = model.model_json_schema(
            ref_template="#/components/schemas/{model}",
            mode=mode,  # type: ignore[arg-type]
        )
        for name, definition in schema.pop("$defs", {}).items():
            components[name] = definition
        components[model.__name__] = schema

    paths: dict[str, Any] = {}
    register(schemas.Problem, "serialization")
    for op in OPERATIONS:
        operation: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "parameters": [
                {
                    "name": p.name,
                    "in": p.location,
                    "required": p.required,
                    "description": p.description,
                    "schema": {"type": "array", "items": p.schema} if p.repeatable else p.schema,
                    **({"style": "form", "explode": True} if p.repeatable else {}),
                }
                for p in op.params
            ],
            "responses": {},
        }
        if op.body is not None:
            register(op.body, "validation")
            operation["requestBody"] = {
                "required": op.body_required,
                "content": {
                    "application/json": {"schema": _ref(op.body)},
                    **(
                        {"application/merge-patch+json": {"schema": _ref(op.body)}}
                        if op.method == "patch"
                        else {}
                    ),
                },
            }
        if op.response is not None:
            register(op.response, "serialization")
            headers = {}
            if op.response is schemas.TaskOut:
                headers["ETag"] = {
                    "description": "The task's version, for If-Match.",
                    "schema": {"type": "string"},
                }
            if op.status == 201:
                headers["Location"] = {"schema": {"type": "string"}}
            content: dict[str, Any] = {"application/json": {"schema": _ref(op.response)}}
            if op.event_stream:
                register(schemas.FeedEvent, "serialization")
                content["text/event-stream"] = {
                    "schema": {
                        "type": "string",
                        "description": "Server-Sent Events: per event `id: <position>`, "
                        "`event: <type>`, `data:` one FeedEvent as JSON; `: keep-alive` "
                        "comments when idle. Resume with the Last-Event-ID header.",
                    },
                    "x-item-schema": _ref(schemas.FeedEvent),
                }
            if op.exports is not None:
                register(op.exports, "serialization")
                content["application/x-ndjson"] = {
                    "schema": {"type": "string", "description": "one item per line"},
                    "x-item-schema": _ref(op.exports),
                }
                content["text/csv"] = {
                    "schema": {
                        "type": "string",
                        "description": "a header row of the item's fields, then one row "
                        "per item; data as a JSON string",
                    }
                }
            operation["responses"][str(op.status)] = {
                "description": "OK" if op.status == 200 else "Created",
                "headers": headers,
                "content": content,
            }
        for code, description in op.extra_responses.items():
            content_model = (
                op.response if code.startswith("2") or op.operation_id == "readyz" else None
            )
            operation["responses"][code] = {
                "description": description,
                "content": {"application/json": {"schema": _ref(content_model)}}
                if content_model is not None
                else {"application/problem+json": {"schema": _ref(schemas.Problem)}},
            }
        for code in op.problems:
            operation["responses"][code] = {
                "description": PROBLEM_RESPONSES[code],
                "content": {"application/problem+json": {"schema": _ref(schemas.Problem)}},
            }
        if op.auth:
            operation["security"] = [
                {"ApiKeyHeader": []},
                {"ApiKeyAuthorization": []},
                {"BearerAuth": []},
            ]
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskledger",
            "version": "1.0",
            "description": "Submit tasks (Python, C# or echo), follow their status, retry, "
            "cancel, and read the full audit trail of every transition.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "ApiKeyAuthorization": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`ApiKey <key>`",
                },
                # The same key as a bearer token: what generated clients send by default.
                "BearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <key>`, the same API key",
                },
            },
        },
    }
