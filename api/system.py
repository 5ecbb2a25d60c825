"""Audit, stats, health, readiness and metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from api.errors import ApiProblem
from api.http import (
    authenticate,
    choice_params,
    context,
    in_thread,
    int_param,
    json_response,
    reject_unknown_params,
    time_param,
)
from ledger.keys import Role
from projections.admin import status as projection_status
from projections.queries import audit_events, counts_by_status

EVENT_TYPES = (
    "TaskSubmitted",
    "AttemptScheduled",
    "AttemptStarted",
    "AttemptCompleted",
    "AttemptFailed",
    "TaskExpired",
    "TaskCancelled",
    "TaskUpdated",
)


async def audit(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    ctx = context(request)
    reject_unknown_params(
        request, {"type", "task_id", "worker_id", "since", "until", "limit", "cursor"}
    )
    types = choice_params(request, "type", EVENT_TYPES)
    task_id = request.query_params.get("task_id")
    if task_id is not None:
        from uuid import UUID

        try:
            parsed_task: UUID | None = UUID(task_id)
        except ValueError:
            raise ApiProblem(
                422,
                "invalid-request",
                f"task_id {task_id!r} is not a UUID",
                errors=[{"field": "task_id", "message": "must be a UUID"}],
            ) from None
    else:
        parsed_task = None
    worker_id = request.query_params.get("worker_id")
    since, until = time_param(request, "since"), time_param(request, "until")
    limit = int_param(request, "limit", 100, 1, ctx.limits.max_page_size)
    cursor = request.query_params.get("cursor")

    def query() -> Any:
        with ctx.queries.connection() as conn:
            return audit_events(
                conn,
                ctx.schema,
                tenant=principal.scope,
                types=types,
                task_id=parsed_task,
                worker_id=worker_id,
                since=since,
                until=until,
                limit=limit,
                cursor=cursor,
            )

    page = await in_thread(request, query)
    items = [
        {
            "position": row["position"],
            "task_id": row["task_id"],
            "type": row["type"],
            "attempt": row["attempt"],
            "worker_id": row["worker_id"],
            "at": row["at"],
            "version": row["version"],
            "data": row["payload"],
        }
        for row in page.items
    ]
    return json_response({"items": items, "next_cursor": page.next_cursor})


async def stats(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    reject_unknown_params(request, set())
    ctx = context(request)

    def query() -> dict[str, Any]:
        with ctx.queries.connection() as conn:
            counts = counts_by_status(conn, ctx.schema, tenant=principal.scope)
            lags = projection_status(conn, ctx.schema)
        for row in lags:
            ctx.metrics.projection_lag.labels(row.name).set(row.lag)
        return {
            "counts": counts,
            "projections": {r.name: {"position": r.position, "lag_events": r.lag} for r in lags},
        }

    return json_response(await in_thread(request, query))


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok", "checks": {}})


async def readyz(request: Request) -> Response:
    ctx = context(request)

    def check() -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            with ctx.queries.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
                lags = projection_status(conn, ctx.schema)
            checks["database"] = "ok"
        except Exception as error:  # noqa: BLE001 - any failure means not ready, with its reason
            checks["database"] = f"unreachable: {error}"
            lags = []
        for row in lags:
            ctx.metrics.projection_lag.labels(row.name).set(row.lag)
            limit = ctx.limits.ready_max_projection_lag
            checks[f"projection:{row.name}"] = (
                "ok" if row.lag <= limit else f"behind by {row.lag} events (limit {limit})"
            )
        return checks

    checks = await in_thread(request, check)
    for name, probe in ctx.readiness.items():
        problem = await probe()
        checks[name] = "ok" if problem is None else problem
    ready = all(value == "ok" for value in checks.values())
    return json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
    )


async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(context(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
