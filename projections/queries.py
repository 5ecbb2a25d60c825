"""The queries the API asks of the views. Parameterised SQL only; sort keys are fixed.

Lists are newest first with keyset cursors: a cursor is the sort key of the last row
returned, so pages stay stable while new tasks arrive and deep pages cost no OFFSET.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg import Connection, sql
from psycopg.rows import dict_row

from ledger.log import EVENTS_TABLE
from projections import api_keys, audit, task_periods, task_status
from projections.tracking import listen_to_views, view_position


class InvalidCursor(ValueError):
    """A pagination cursor that this service did not issue (or that was altered)."""


def _encode_cursor(*key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def _decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise InvalidCursor("cursor is not one this service issued") from None
    if not isinstance(key, list) or len(key) != arity:
        raise InvalidCursor("cursor is not one this service issued")
    return key


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def _page(
    conn: Connection[Any],
    view: sql.Identifier,
    columns: Sequence[str],
    where: list[sql.Composable],
    params: list[Any],
    order_by: sql.SQL,  # a fixed sort key of ours, never caller input
    limit: int,
    cursor_of: Callable[[dict[str, Any]], str],
) -> Page:
    """One page of a keyset-paginated query: one row more than asked tells whether a
    next page exists; its cursor is the sort key of the page's last row."""
    query = sql.SQL("SELECT {} FROM {} {} ORDER BY {} LIMIT %s").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        view,
        sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        order_by,
    )
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, [*params, limit + 1]).fetchall()
    if len(rows) <= limit:
        return Page(rows, None)
    rows = rows[:limit]
    return Page(rows, cursor_of(rows[-1]))


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a list shows (GET /api/tasks, a bulk action, the dashboard's list).

    `text`: the description contains it, ignoring case (a scan of the tenant's rows the
    other filters leave: no index serves a substring).
    """

    statuses: Sequence[str] = ()
    language: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    text: str | None = None


def list_tasks(
    conn: Connection[Any],
    schema: str,
    *,
    tenant: str | None,
    filters: TaskFilter = TaskFilter(),
    limit: int = 50,
    cursor: str | None = None,
    columns: Sequence[str] = task_status.COLUMNS,
    as_of: datetime | None = None,
) -> Page:
    """Tasks newest first. `tenant=None` lists every tenant's (admins only).

    `columns`: what to read of each row (by default all of them); `created_at` and `id`
    are always read, as the cursor is made of them. `as_of`: the tasks created by then,
    as they were then (the task_periods view; filters apply to those states).
    """
    where: list[sql.Composable] = []
    params: list[Any] = []
    view = task_status.TaskStatusProjection.name
    if as_of is not None:
        view = task_periods.TaskPeriodsProjection.name
        where.append(
            sql.SQL("created_at <= %s AND valid_from <= %s AND (valid_to IS NULL OR valid_to > %s)")
        )
        params.extend((as_of, as_of, as_of))
    if tenant is not None:
        where.append(sql.SQL("tenant = %s"))
        params.append(tenant)
    if filters.statuses:
        where.append(sql.SQL("status = ANY(%s)"))
        params.append(list(filters.statuses))
    if filters.language is not None:
        where.append(sql.SQL("language = %s"))
        params.append(filters.language)
    if filters.created_after is not None:
        where.append(sql.SQL("created_at > %s"))
        params.append(filters.created_after)
    if filters.created_before is not None:
        where.append(sql.SQL("created_at < %s"))
        params.append(filters.created_before)
    if filters.text:
        where.append(sql.SQL("description ILIKE %s"))
        params.append(contains_pattern(filters.text))
    if cursor is not None:
        created_at, task_id = _decode_cursor(cursor, 2)
        if not (isinstance(created_at, str) and isinstance(task_id, str)):
            raise InvalidCursor("cursor is not one this service issued")
        try:
            key = (datetime.fromisoformat(created_at), UUID(task_id))
        except ValueError:
            raise InvalidCursor("cursor is not one this service issued") from None
        where.append(sql.SQL("(created_at, id) < (%s, %s)"))
        params.extend(key)
    return _page(
        conn,
        sql.Identifier(schema, view),
        tuple(dict.fromkeys((*columns, "created_at", "id"))),
        where,
        params,
        sql.SQL("created_at DESC, id DESC"),
        limit,
        lambda last: _encode_cursor(last["created_at"].isoformat(), str(last["id"])),
    )


def contains_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, its own % _ and \\ taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def counts_by_status(conn: Connection[Any], schema: str, *, tenant: str | None) -> dict[str, int]:
    query = sql.SQL("SELECT status, count(*) FROM {} {} GROUP BY status").format(
        sql.Identifier(schema, task_status.TaskStatusProjection.name),
        sql.SQL("WHERE tenant = %s") if tenant is not None else sql.SQL(""),
    )
    rows = conn.execute(query, [tenant] if tenant is not None else []).fetchall()
    return {status: int(count) for status, count in rows}


# The attempt outcomes the per-minute counts report, by their event type.
OUTCOME_EVENTS = {
    "AttemptCompleted": "completed",
    "AttemptFailed": "failed",
    "TaskExpired": "expired",
}


def outcomes_per_minute(
    conn: Connection[Any], schema: str, *, tenant: str | None, since: datetime, until: datetime
) -> list[dict[str, Any]]:
    """Attempts completed, failed and expired in each minute from the one `since` falls in
    to the one `until` falls in, oldest first; a minute without any has zeros. Counted
    from the audit view, so a task that failed twice and then completed counts three."""
    first = since.replace(second=0, microsecond=0)
    last = until.replace(second=0, microsecond=0)
    counts = sql.SQL(", ").join(
        sql.SQL("count(*) FILTER (WHERE type = {}) AS {}").format(
            sql.Literal(kind), sql.Identifier(name)
        )
        for kind, name in OUTCOME_EVENTS.items()
    )
    query = sql.SQL(
        "WITH counted AS ("
        " SELECT date_trunc('minute', at) AS minute, {counts} FROM {audit}"
        " WHERE type = ANY(%s) AND at >= %s AND at < %s {tenant} GROUP BY 1)"
        " SELECT series.minute, {totals}"
        " FROM generate_series(%s::timestamptz, %s::timestamptz, interval '1 minute')"
        " AS series(minute) LEFT JOIN counted USING (minute) ORDER BY series.minute"
    ).format(
        counts=counts,
        audit=sql.Identifier(schema, audit.AuditProjection.name),
        tenant=sql.SQL("AND tenant = %s") if tenant is not None else sql.SQL(""),
        totals=sql.SQL(", ").join(
            sql.SQL("coalesce({0}, 0) AS {0}").format(sql.Identifier(name))
            for name in OUTCOME_EVENTS.values()
        ),
    )
    params: list[Any] = [list(OUTCOME_EVENTS), first, last + timedelta(minutes=1)]
    if tenant is not None:
        params.append(tenant)
    params.extend((first, last))
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def run_times(
    conn: Connection[Any], schema: str, *, tenant: str | None, since: datetime
) -> dict[str, Any]:
    """The median and 95th percentile, in ms, of the time from start to finish of the
    tasks completed since `since` (their last attempt), and how many there were."""
    query = sql.SQL(
        "SELECT count(*),"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY run_ms),"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY run_ms)"
        " FROM (SELECT extract(epoch FROM finished_at - started_at) * 1000 AS run_ms"
        " FROM {} WHERE status = 'Completed' AND finished_at >= %s {}) runs"
    ).format(
        sql.Identifier(schema, task_status.TaskStatusProjection.name),
        sql.SQL("AND tenant = %s") if tenant is not None else sql.SQL(""),
    )
    row = conn.execute(query, [since, *([tenant] if tenant is not None else [])]).fetchone()
    assert row is not None  # an aggregate always answers one row
    count, p50, p95 = row
    return {
        "count": int(count),
        "p50_ms": None if p50 is None else round(float(p50), 1),
        "p95_ms": None if p95 is None else round(float(p95), 1),
    }


def queue_depth(conn: Connection[Any], schema: str, *, tenant: str | None, now: datetime) -> int:
    """Pending tasks that may start now (not those waiting out a retry's backoff)."""
    query = sql.SQL(
        "SELECT count(*) FROM {} WHERE status = 'Pending'"
        " AND (not_before IS NULL OR not_before <= %s) {}"
    ).format(
        sql.Identifier(schema, task_status.TaskStatusProjection.name),
        sql.SQL("AND tenant = %s") if tenant is not None else sql.SQL(""),
    )
    row = conn.execute(query, [now, *([tenant] if tenant is not None else [])]).fetchone()
    return int(row[0]) if row else 0


def list_keys(conn: Connection[Any], schema: str, *, tenant: str | None) -> list[dict[str, Any]]:
    """Issued API keys, oldest first; `tenant=None`: every tenant's."""
    query = sql.SQL("SELECT {} FROM {} {} ORDER BY issued_at, key_id").format(
        sql.SQL(", ").join(map(sql.Identifier, api_keys.LISTED)),
        sql.Identifier(schema, api_keys.ApiKeysProjection.name),
        sql.SQL("WHERE tenant = %s") if tenant is not None else sql.SQL(""),
    )
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, [tenant] if tenant is not None else []).fetchall()


def audit_events(
    conn: Connection[Any],
    schema: str,
    *,
    tenant: str | None,
    types: Sequence[str] = (),
    task_id: UUID | None = None,
    worker_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page:
    """Events newest first (by global position)."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in (("tenant", tenant), ("task_id", task_id), ("worker_id", worker_id)):
        if value is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if types:
        where.append(sql.SQL("type = ANY(%s)"))
        params.append(list(types))
    if since is not None:
        where.append(sql.SQL("at >= %s"))
        params.append(since)
    if until is not None:
        where.append(sql.SQL("at < %s"))
        params.append(until)
    if cursor is not None:
        (position,) = _decode_cursor(cursor, 1)
        if type(position) is not int:  # a bool is an int to isinstance
            raise InvalidCursor("cursor is not one this service issued")
        where.append(sql.SQL("position < %s"))
        params.append(position)
    return _page(
        conn,
        sql.Identifier(schema, audit.AuditProjection.name),
        audit.COLUMNS,
        where,
        params,
        sql.SQL("position DESC"),
        limit,
        lambda last: _encode_cursor(last["position"]),
    )


def wait_for_position(
    database_url: str, schema: str, name: str, position: int, timeout: float
) -> bool:
    """Wait (at most `timeout` s) until projection `name` has applied `position`.

    For read-your-writes: a caller that wrote an event at `position` waits before
    reading the view. Woken by the runners' NOTIFY; polls too, in case one is lost.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(listen_to_views())
        while True:
            if view_position(conn, schema, name) >= position:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for _ in conn.notifies(timeout=min(remaining, 0.25), stop_after=1):
                pass


def events_after(
    conn: Connection[Any], schema: str, *, tenant: str | None, after: int, limit: int
) -> list[dict[str, Any]]:
    """The events past position `after`, oldest first, as the audit view has applied them
    (it applies in position order, so a reader resuming from its last position misses
    none), each with the hash chain at its position (ledger.chain)."""
    query = sql.SQL(
        "SELECT a.position, a.task_id, a.version, a.type, a.at, a.payload AS data,"
        " encode(e.chain, 'hex') AS hash"
        " FROM {audit} a JOIN {events} e ON e.notification_id = a.position"
        " WHERE a.position > %s {tenant} ORDER BY a.position LIMIT %s"
    ).format(
        audit=sql.Identifier(schema, audit.AuditProjection.name),
        events=sql.Identifier(schema, EVENTS_TABLE),
        tenant=sql.SQL("AND a.tenant = %s") if tenant is not None else sql.SQL(""),
    )
    params: list[Any] = [after, *([tenant] if tenant is not None else []), limit]
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()
