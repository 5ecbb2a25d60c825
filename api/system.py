"""Audit, stats, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg import Connection
from starlette.requests import Request
from starlette.responses import Response

from api.auth import Principal
from api.context import ApiContext
from api.errors import ApiProblem
from api.exports import export, export_format
from api.http import (
    authenticate,
    choice_params,
    context,
    in_thread,
    int_param,
    model_response,
    param_problem,
    reject_unknown_params,
    time_param,
)
from api.schemas import (
    AuditItem,
    AuditList,
    Health,
    LedgerVerification,
    OutcomesPerMinute,
    Stats,
    Workers,
)
from ledger import verification
from ledger.keys import Role
from ledger.log import read_changes
from projections import all_projections, task_status
from projections.admin import status as projection_status
from projections.queries import (
    Page,
    audit_events,
    counts_by_status,
    outcomes_per_minute,
    queue_depth,
    run_times,
)

log = logging.getLogger(__name__)

# Checks whose failure leaves the API ready (status "degraded"): see readyz.
DEGRADING = frozenset({"broker"})

EXPORT_PAGE = 1_000  # audit events read at once while an export streams

# A readiness probe that takes longer than this is a problem in itself.
READY_PROBE_SECONDS = 3.0

EVENT_TYPES = (
    "TaskSubmitted",
    "AttemptScheduled",
    "AttemptStarted",
    "AttemptCompleted",
    "AttemptFailed",
    "TaskExpired",
    "TaskCancelled",
    "TaskUpdated",
    "WebhookAttempted",
)


@dataclass(frozen=True)
class AuditFilters:
    """What `GET /api/audit` (and the UI's audit page) filters the events on."""

    types: list[str]
    task_id: UUID | None
    worker_id: str | None
    since: datetime | None
    until: datetime | None


def audit_filters(request: Request) -> AuditFilters:
    """The audit's filters from the query; 422 naming a bad one."""
    types = choice_params(request, "type", EVENT_TYPES)
    task_id = request.query_params.get("task_id")
    parsed_task: UUID | None = None
    if task_id is not None:
        try:
            parsed_task = UUID(task_id)
        except ValueError:
            raise ApiProblem(
                422,
                "invalid-request",
                f"task_id {task_id!r} is not a UUID",
                errors=[{"field": "task_id", "message": "must be a UUID"}],
            ) from None
    return AuditFilters(
        types=types,
        task_id=parsed_task,
        worker_id=request.query_params.get("worker_id"),
        since=time_param(request, "since"),
        until=time_param(request, "until"),
    )


def audit_page(
    ctx: ApiContext,
    principal: Principal,
    filters: AuditFilters,
    limit: int,
    cursor: str | None,
) -> Page:
    """One page of the audit (blocking: run it with `in_thread`); items in the API's
    shape (the view keeps an event's own fields as `payload`; the API calls them `data`)."""
    with ctx.queries.connection() as conn:
        page = audit_events(
            conn,
            ctx.schema,
            tenant=principal.scope,
            types=filters.types,
            task_id=filters.task_id,
            worker_id=filters.worker_id,
            since=filters.since,
            until=filters.until,
            limit=limit,
            cursor=cursor,
        )
    return Page([{**row, "data": row["payload"]} for row in page.items], page.next_cursor)


def audit_export(
    request: Request, principal: Principal, filters: AuditFilters, kind: str
) -> Response:
    """Every matching event as a file of `kind` (ndjson or csv), streamed page by page."""
    ctx = context(request)

    async def pages() -> AsyncIterator[list[dict[str, Any]]]:
        after: str | None = None
        while True:
            page = await in_thread(
                request, functools.partial(audit_page, ctx, principal, filters, EXPORT_PAGE, after)
            )
            yield page.items
            if page.next_cursor is None:
                return
            after = page.next_cursor

    return export(kind, AuditItem, pages(), "audit")


async def audit(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    ctx = context(request)
    reject_unknown_params(
        request, {"type", "task_id", "worker_id", "since", "until", "limit", "cursor", "format"}
    )
    kind = export_format(request)
    if kind is not None:
        for name in ("limit", "cursor"):
            if name in request.query_params:
                raise param_problem(name, "does not apply to an export: it has every event")
    filters = audit_filters(request)
    limit = int_param(request, "limit", 100, 1, ctx.limits.max_page_size)
    cursor = request.query_params.get("cursor")
    if kind is not None:
        return audit_export(request, principal, filters, kind)
    page = await in_thread(request, lambda: audit_page(ctx, principal, filters, limit, cursor))
    return model_response(AuditList, {"items": page.items, "next_cursor": page.next_cursor})


@dataclass(frozen=True)
class ViewLag:
    """How far a view is behind the log (for /readyz, /api/stats and the metrics; the
    wire shape is api.schemas.ProjectionLag)."""

    name: str
    position: int
    events: int  # events in the log after its position (an upper bound: holes)
    seconds: float  # age of the oldest of them (0 when caught up)


def projection_lags(ctx: ApiContext, conn: Connection[Any]) -> list[ViewLag]:
    """Each live projection's lag, also set on the metrics' gauges."""
    now = ctx.ledger.clock.now()
    lags = []
    for row in projection_status(conn, ctx.schema):
        seconds = 0.0
        if row.lag:
            oldest = read_changes(conn, ctx.schema, row.position, 1)
            if oldest:
                seconds = max(0.0, (now - oldest[0].at).total_seconds())
        ctx.metrics.set_projection_lag(row.name, row.lag, seconds)
        lags.append(ViewLag(row.name, row.position, row.lag, seconds))
    return lags


async def stats(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    reject_unknown_params(request, set())
    ctx = context(request)

    def query() -> dict[str, Any]:
        now = ctx.ledger.clock.now()
        with ctx.queries.connection() as conn:
            counts = counts_by_status(conn, ctx.schema, tenant=principal.scope)
            lags = projection_lags(ctx, conn)
            depth = queue_depth(conn, ctx.schema, tenant=principal.scope, now=now)
            runs = run_times(conn, ctx.schema, tenant=principal.scope, since=now - RUN_TIME_WINDOW)
        return {
            "counts": counts,
            "projections": {r.name: {"position": r.position, "lag_events": r.events} for r in lags},
            "queue_depth": depth,
            "run_time": runs,
        }

    return model_response(Stats, await in_thread(request, query))


RUN_TIME_WINDOW = timedelta(hours=1)
MAX_MINUTES = 24 * 60


async def stats_minutes(request: Request) -> Response:
    """Attempt outcomes per minute over the last `minutes` (the dashboard's chart)."""
    principal = await authenticate(request, Role.READ)
    reject_unknown_params(request, {"minutes"})
    minutes = int_param(request, "minutes", 60, 1, MAX_MINUTES)
    ctx = context(request)

    def query() -> list[dict[str, Any]]:
        now = ctx.ledger.clock.now()
        with ctx.queries.connection() as conn:
            return outcomes_per_minute(
                conn,
                ctx.schema,
                tenant=principal.scope,
                since=now - timedelta(minutes=minutes - 1),
                until=now,
            )

    return model_response(OutcomesPerMinute, {"minutes": await in_thread(request, query)})


# Workers silent for longer than this are no longer listed.
WORKERS_REMEMBERED_SECONDS = 3600.0


async def verify_ledger(request: Request) -> Response:
    """Walk the whole hash chain (docs/ledger.md, Tamper evidence): admin keys only."""
    await authenticate(request, Role.ADMIN)
    reject_unknown_params(request, set())
    ctx = context(request)

    def walk() -> dict[str, Any]:
        with ctx.queries.connection() as conn:
            expected = task_status.versions(conn, ctx.schema)
            return verification.verify(conn, ctx.schema, expected_versions=expected).summary()

    report = await in_thread(request, walk)
    if report["status"] != "ok":
        log.error(
            "ledger verification found the log broken: run `taskledger ledger verify` "
            "for the task and what it means",
            extra={"problem": report["problem"]},
        )
    return model_response(LedgerVerification, report)


async def workers(request: Request) -> Response:
    """The workers from their heartbeats; the attempts they run only for admin keys."""
    principal = await authenticate(request, Role.READ)
    reject_unknown_params(request, set())
    ctx = context(request)
    listed = await in_thread(request, lambda: list_workers(ctx, principal))
    # Without an admin key `attempts` is absent, not null: the key may not see them.
    return model_response(Workers, {"workers": listed}, exclude_unset=True)


def list_workers(ctx: ApiContext, principal: Principal) -> list[dict[str, Any]]:
    """The workers seen within the last hour, each with its state (alive, lost,
    stopped); the attempts they run only for admins (blocking: run it with `in_thread`)."""
    leases = ctx.ledger.leases
    if leases is None:
        return []
    listed = []
    for row in leases.workers(WORKERS_REMEMBERED_SECONDS):
        silent = row["silence"].total_seconds()
        state = (
            "stopped"
            if row["stopped_at"]
            else "alive"
            if silent <= leases.lease_seconds
            else "lost"
        )
        item: dict[str, Any] = {
            "worker_id": row["worker_id"],
            "host": row["host"],
            "pid": row["pid"],
            "version": row["version"],
            "state": state,
            "slots": row["slots"],
            "busy": row["busy"],
            "running": len(row["running"]),
            "started_at": row["started_at"],
            "last_seen": row["last_seen"],
        }
        if principal.role is Role.ADMIN:
            item["attempts"] = row["running"]
        listed.append(item)
    return listed


async def healthz(request: Request) -> Response:
    return model_response(Health, {"status": "ok", "checks": {}})


async def readyz(request: Request) -> Response:
    ctx = context(request)

    def check() -> dict[str, str]:
        stalled = ctx.ledger.stalled_for()
        checks = {
            "ledger": f"stalled: a call has waited {stalled:.1f} s for the event store"
            if stalled
            else "ok"
        }
        try:
            with ctx.queries.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
                lags = {lag.name: lag for lag in projection_lags(ctx, conn)}
        except Exception as error:  # noqa: BLE001 - any failure means not ready, with its reason
            # The driver's words (host, port) go to the log: this answer is public.
            log.warning("readyz: the database is unreachable", extra={"error": str(error)})
            checks["database"] = "unreachable (the reason is in the log)"
            return checks
        checks["database"] = "ok"
        limit = ctx.limits.ready_max_projection_lag
        # Every view the API reads must exist: before its runner installed it, the task
        # list and the audit would fail.
        for name in sorted(set(all_projections()) | set(lags)):
            lag = lags.get(name)
            if lag is None:
                checks[f"projection:{name}"] = "not installed yet (its runner creates it)"
            elif lag.events > limit:
                checks[f"projection:{name}"] = (
                    f"behind by {lag.events} events, the oldest {lag.seconds:.1f} s old "
                    f"(limit {limit} events)"
                )
            else:
                checks[f"projection:{name}"] = "ok"
        return checks

    checks = await in_thread(request, check)
    for name, probe in ctx.readiness.items():
        try:
            problem = await asyncio.wait_for(probe(), READY_PROBE_SECONDS)
        except TimeoutError:
            problem = f"no answer within {READY_PROBE_SECONDS:g} s"
        except Exception as error:  # noqa: BLE001 - a failing probe is a reason, not a 500
            problem = f"check failed: {error}"
        checks[name] = "ok" if problem is None else problem
    # The broker is reported but does not take the API out of rotation: without it the API
    # still accepts tasks (they wait in the ledger; the dispatcher sends them once it is
    # back), and a load balancer that dropped every api would refuse them all.
    failing = {name for name, value in checks.items() if value != "ok"}
    if failing - DEGRADING:
        status, code = "unavailable", 503
    else:
        status, code = ("degraded" if failing else "ok"), 200
    return model_response(Health, {"status": status, "checks": checks}, code)


async def metrics(request: Request) -> Response:
    ctx = context(request)

    def refresh() -> None:
        """The projection lag as of this scrape (gone while the database does not answer:
        a stale figure would look healthy)."""
        try:
            with ctx.queries.connection(timeout=2) as conn:
                projection_lags(ctx, conn)
        except Exception as error:  # noqa: BLE001 - the rest of the metrics still answer
            ctx.metrics.projection_lag.clear()
            ctx.metrics.projection_lag_seconds.clear()
            log.warning("metrics: projection lag unavailable", extra={"error": str(error)})

    await in_thread(request, refresh)
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
