"""Every error as RFC 9457 problem details (application/problem+json).

Domain errors get their HTTP meaning here and only here.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from eventsourcing import persistence as store
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from api.schemas import Problem, dump_json
from ledger.errors import (
    ContentionExhausted,
    IdempotencyConflict,
    InvalidTask,
    KeyNotFound,
    LedgerError,
    LedgerUnavailable,
    TaskNotFound,
    TransitionRefused,
    VersionMismatch,
)
from projections.queries import InvalidCursor

log = logging.getLogger("api")

PROBLEM_BASE = "https://taskledger.dev/problems/"
PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    412: "Precondition failed",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid request",
    500: "Internal server error",
    503: "Service unavailable",
}


def problem_title(status: int) -> str:
    """The title of a problem of this status (the JSON problems' and the UI's pages')."""
    return _TITLES.get(status, "Error")


class ApiProblem(Exception):
    """Raise to answer with a problem response."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.errors = errors
        self.headers = headers


def problem_response(
    request: Request | None,
    status: int,
    kind: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + kind,
        "title": problem_title(status),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    if request_id:
        body["request_id"] = request_id
    # Through its model, as every body; the fields it was not given are absent, not null.
    problem = dump_json(Problem.model_validate(body), exclude_unset=True)
    return Response(problem, status, headers=headers, media_type=PROBLEM_JSON)


def validation_errors(error: ValidationError) -> list[dict[str, str]]:
    problems = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append({"field": location, "message": item["msg"]})
    return problems


def ledger_problem(error: LedgerError) -> ApiProblem:
    if isinstance(error, TaskNotFound):
        return ApiProblem(404, "task-not-found", str(error))
    if isinstance(error, KeyNotFound):
        return ApiProblem(404, "key-not-found", str(error))
    if isinstance(error, InvalidTask):
        return ApiProblem(
            422,
            "invalid-task",
            str(error),
            errors=[{"field": error.field, "message": error.message}],
        )
    if isinstance(error, TransitionRefused):
        return ApiProblem(409, error.rule, str(error))
    if isinstance(error, VersionMismatch):
        return ApiProblem(412, "version-mismatch", str(error))
    if isinstance(error, IdempotencyConflict):
        return ApiProblem(409, "idempotency-key-reused", str(error))
    if isinstance(error, LedgerUnavailable):
        # The driver's text (host names, SQL) is for the log, not for clients.
        log.error("the event store is unavailable", extra={"error": str(error)})
        return ApiProblem(
            503,
            "ledger-unavailable",
            "the event store is not available right now; retry in a moment",
            headers={"Retry-After": "1"},
        )
    if isinstance(error, ContentionExhausted):
        return ApiProblem(503, "ledger-unavailable", str(error), headers={"Retry-After": "1"})
    return ApiProblem(400, "ledger-error", str(error))


async def handle_api_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    return problem_response(
        request, exc.status, exc.kind, exc.detail, errors=exc.errors, headers=exc.headers
    )


async def handle_ledger_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LedgerError)
    return await handle_api_problem(request, ledger_problem(exc))


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """The views' database out of reach (no pooled connection within its wait, a broken
    connection, a statement timeout): the same 503 as the event store's."""
    return await handle_ledger_error(request, LedgerUnavailable(f"database error: {exc}"))


async def handle_invalid_cursor(request: Request, exc: Exception) -> Response:
    return problem_response(
        request, 400, "invalid-cursor", str(exc), errors=[{"field": "cursor", "message": str(exc)}]
    )


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    errors = validation_errors(exc)
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem_response(request, 422, "invalid-request", detail, errors=errors)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kinds = {404: "not-found", 405: "method-not-allowed"}
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem_response(
        request,
        exc.status_code,
        kinds.get(exc.status_code, "http-error"),
        detail,
        headers=dict(exc.headers) if exc.headers else None,
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.error(
        "unhandled error answering a request",
        exc_info=exc,
        extra={
            "request_id": getattr(request.state, "request_id", None),
            "path": request.url.path,
            # The task the request was about, when the route knew it (the path's id).
            "task_id": getattr(request.state, "task_id", None)
            or request.path_params.get("task_id"),
        },
    )
    return problem_response(
        request,
        500,
        "internal-error",
        "the server failed to answer; the error is logged under this request_id",
    )


EXCEPTION_HANDLERS = {
    ApiProblem: handle_api_problem,
    LedgerError: handle_ledger_error,
    psycopg.OperationalError: handle_database_error,
    psycopg.InterfaceError: handle_database_error,
    store.OperationalError: handle_database_error,
    store.InterfaceError: handle_database_error,
    InvalidCursor: handle_invalid_cursor,
    ValidationError: handle_validation_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
