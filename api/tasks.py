"""The /api/tasks routes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import Response

from api.auth import Principal
from api.bulk import bulk_action
from api.context import ApiContext
from api.errors import ApiProblem
from api.exports import export, export_format
from api.http import (
    authenticate,
    choice_params,
    context,
    float_param,
    in_thread,
    int_param,
    model_response,
    param_problem,
    read_json,
    reject_unknown_params,
    task_id_param,
    time_param,
)
from api.schemas import (
    BulkOut,
    BulkRequest,
    CancelRequest,
    History,
    HistoryItem,
    RetryRequest,
    TaskCreate,
    TaskList,
    TaskOut,
    TaskPatch,
    TaskSummaryOut,
)
from ledger import Status, Submission, TaskState
from ledger.keys import Role
from ledger.service import SubmitRequest
from ledger.state import HistoryEntry
from projections.queries import TaskFilter, list_tasks

STATUSES = tuple(str(s) for s in Status)
LANGUAGES = ("python", "csharp", "echo")


def task_content(task: TaskState) -> dict[str, Any]:
    """What a `TaskOut` says of the task: its result only once it completed, the error of
    its last attempt only while it has not."""
    result = task.result
    error = task.error
    return {
        "id": task.id,
        "description": task.description,
        "language": task.language,
        "code": task.code,
        "data": task.data,
        "status": str(task.status),
        "attempt": task.attempt,
        "run_attempt": task.run_attempt,
        "max_attempts": task.max_attempts,
        "ttl_seconds": task.ttl_seconds,
        "deadline": task.deadline,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "worker_id": task.worker_id,
        "result": {
            "stdout": result.get("stdout", ""),
            "stderr": result.get("stderr", ""),
            "exit_code": result.get("exit_code", 0),
            "duration_ms": result.get("duration_ms", 0.0),
            "truncated": result.get("truncated", False),
        }
        if result is not None and task.status is Status.COMPLETED
        else None,
        "error": {"kind": error.get("kind", ""), "message": error.get("message", "")}
        if error is not None and task.status is not Status.COMPLETED
        else None,
        "version": task.version,
        "callback_url": task.callback_url,
        "callback_events": task.callback_events,
        "last_delivery": task.last_delivery,
    }


def task_response(
    task: TaskState, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return model_response(
        TaskOut, task_content(task), status, {"ETag": f'"{task.version}"', **(headers or {})}
    )


def _expected_version(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise ApiProblem(
            400,
            "invalid-if-match",
            f'If-Match must be the task\'s version as its ETag gives it, e.g. "3" (got {raw!r})',
            errors=[{"field": "If-Match", "message": "must be a version number"}],
        )
    return int(value)


async def submit_task(request: Request) -> Response:
    principal = await authenticate(request, Role.SUBMIT)
    reject_unknown_params(request, set())
    body = await read_json(request, TaskCreate)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise ApiProblem(
            422,
            "invalid-request",
            "Idempotency-Key must be 1 to 255 characters",
            errors=[{"field": "Idempotency-Key", "message": "must be 1 to 255 characters"}],
        )
    submission = await submit(context(request), principal, body, key)
    task = submission.task
    request.state.task_id = str(task.id)
    return task_response(
        task,
        201 if submission.created else 200,
        {"Location": f"/api/tasks/{task.id}"},
    )


async def submit(
    ctx: ApiContext, principal: Principal, body: TaskCreate, idempotency_key: str | None
) -> Submission:
    """Submit a checked task body for `principal` (the API's POST and the UI's form)."""
    submission = await ctx.submissions.run(
        SubmitRequest(
            description=body.description,
            language=body.language,
            code=body.code or "",
            data=body.data,
            ttl_seconds=body.ttl_seconds,
            max_attempts=body.max_attempts,
            tenant=principal.tenant,
            submitted_by=principal.key_id,
            idempotency_key=idempotency_key,
            callback_url=body.callback_url,
            callback_events=None if body.callback_events is None else list(body.callback_events),
        )
    )
    if submission.created:
        ctx.metrics.tasks_submitted.labels(submission.task.language).inc()
    return submission


async def get_task(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    reject_unknown_params(request, {"wait", "as_of", "as_of_version"})
    task_id = task_id_param(request)
    ctx = context(request)
    wait = float_param(request, "wait", 0.0, 0.0, ctx.limits.max_wait_seconds)
    as_of = time_param(request, "as_of")
    as_of_version = int_param(request, "as_of_version", 0, 1, 2**31 - 1)
    if as_of is not None or as_of_version:
        if as_of is not None and as_of_version:
            raise param_problem(
                "as_of_version", "cannot be combined with as_of: they name two points in time"
            )
        if "wait" in request.query_params:
            raise param_problem(
                "wait", "cannot be combined with as_of: it waits for a change to come"
            )
        past = await in_thread(
            request,
            lambda: ctx.ledger.get_as_of(
                task_id, tenant=principal.scope, at=as_of, version=as_of_version or None
            ),
        )
        return task_response(past)

    def load() -> TaskState:
        return ctx.ledger.get(task_id, tenant=principal.scope)

    if wait <= 0:
        return task_response(await in_thread(request, load))
    return task_response(
        await watch_task(request, task_id, load, lambda task: task.status.is_terminal, wait)
    )


async def watch_task(
    request: Request,
    task_id: UUID,
    load: Callable[[], TaskState],
    done: Callable[[TaskState], bool],
    seconds: float,
) -> TaskState:
    """The task as soon as `done` holds for it, or as it is after `seconds`: reread
    whenever the task gets an event (the API's `?wait=` and the UI's live status)."""
    deadline = time.monotonic() + seconds
    with context(request).watcher.subscribe(task_id) as changed:
        while True:
            changed.clear()
            task = await in_thread(request, load)
            remaining = deadline - time.monotonic()
            if done(task) or remaining <= 0:
                return task
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)


async def list_tasks_route(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    ctx = context(request)
    reject_unknown_params(
        request,
        {"status", "language", "created_after", "created_before", "q", "limit", "cursor", "as_of"},
    )
    filters = task_filters(request)
    limit = int_param(request, "limit", ctx.limits.page_size, 1, ctx.limits.max_page_size)
    as_of = time_param(request, "as_of")
    cursor = request.query_params.get("cursor")

    def query() -> Any:
        with ctx.queries.connection() as conn:
            return list_tasks(
                conn,
                ctx.schema,
                tenant=principal.scope,
                filters=filters,
                limit=limit,
                cursor=cursor,
                columns=LISTED_COLUMNS,
                as_of=as_of,
            )

    page = await in_thread(request, query)
    return model_response(TaskList, {"items": page.items, "next_cursor": page.next_cursor})


def task_filters(request: Request) -> TaskFilter:
    """The task list's filters from the query (`status`, `language`, `created_after`,
    `created_before`, `q`): the API's list and the UI's pages; 422 naming a bad one."""
    statuses = choice_params(request, "status", STATUSES)
    languages = choice_params(request, "language", LANGUAGES)
    if len(languages) > 1:
        raise param_problem("language", "give at most one")
    text = request.query_params.get("q")
    if text is not None and not 1 <= len(text) <= MAX_TEXT:
        raise param_problem("q", f"must be 1 to {MAX_TEXT} characters")
    return TaskFilter(
        statuses=tuple(statuses),
        language=languages[0] if languages else None,
        created_after=time_param(request, "created_after"),
        created_before=time_param(request, "created_before"),
        text=text,
    )


MAX_TEXT = 200  # characters of `q`

# The list reads from the view what its items show, no more.
LISTED_COLUMNS = tuple(TaskSummaryOut.model_fields)


async def patch_task(request: Request) -> Response:
    principal = await authenticate(request, Role.SUBMIT)
    reject_unknown_params(request, set())
    task_id = task_id_param(request)
    expected = _expected_version(request)
    body = await read_json(request, TaskPatch)
    patch = {name: getattr(body, name) for name in body.model_fields_set}
    if not patch:
        raise ApiProblem(
            422,
            "invalid-request",
            "the patch is empty; send the fields to change",
            errors=[{"field": "body", "message": "must change at least one field"}],
        )
    ctx = context(request)
    task = await in_thread(
        request,
        lambda: ctx.ledger.update(
            task_id,
            patch,
            by=principal.key_id,
            expected_version=expected,
            tenant=principal.scope,
        ),
    )
    return task_response(task)


async def retry_task(request: Request) -> Response:
    principal = await authenticate(request, Role.SUBMIT)
    reject_unknown_params(request, set())
    task_id = task_id_param(request)
    body = await read_json(request, RetryRequest, optional=True)
    ctx = context(request)
    task = await in_thread(
        request,
        lambda: ctx.ledger.retry(
            task_id, by=principal.key_id, ttl_seconds=body.ttl_seconds, tenant=principal.scope
        ),
    )
    return task_response(task)


async def cancel_task(request: Request) -> Response:
    principal = await authenticate(request, Role.SUBMIT)
    reject_unknown_params(request, set())
    task_id = task_id_param(request)
    body = await read_json(request, CancelRequest, optional=True)
    ctx = context(request)
    task = await in_thread(
        request,
        lambda: ctx.ledger.cancel(
            task_id, by=principal.key_id, reason=body.reason, tenant=principal.scope
        ),
    )
    ctx.metrics.tasks_cancelled.labels(task.language).inc()
    return task_response(task)


async def bulk_tasks(request: Request) -> Response:
    principal = await authenticate(request, Role.SUBMIT)
    reject_unknown_params(request, set())
    body = await read_json(request, BulkRequest)
    given = body.filter
    filters = TaskFilter(
        statuses=tuple(given.status),
        language=given.language,
        created_after=given.created_after,
        created_before=given.created_before,
        text=given.q,
    )
    ctx = context(request)
    result = await in_thread(
        request,
        lambda: bulk_action(
            ctx, principal, body.action, filters, reason=body.reason, limit=body.limit
        ),
    )
    return model_response(BulkOut, result.body())


async def task_history(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    reject_unknown_params(request, {"format"})
    task_id = task_id_param(request)
    kind = export_format(request)
    ctx = context(request)
    entries = await in_thread(request, lambda: ctx.ledger.history(task_id, tenant=principal.scope))
    if kind is not None:

        async def one_batch() -> AsyncIterator[list[HistoryEntry]]:
            yield entries

        return export(kind, HistoryItem, one_batch(), f"task-{task_id}-history")
    return model_response(History, {"items": entries}, from_attributes=True)
