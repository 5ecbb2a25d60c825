"""The task status view: one row per task, everything the task list shows and filters on."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg import Connection, Cursor, sql

from ledger.log import Change
from projections import base
from projections.base import Projection

SUMMARY_CHARS = 200

# The view's columns and their SQL types, in table order: the table, its upsert and every
# read of it take their names from here.
COLUMN_TYPES = {
    "id": "uuid PRIMARY KEY",
    "tenant": "text NOT NULL",
    "description": "text NOT NULL",
    "language": "text NOT NULL",
    "status": "text NOT NULL",
    "attempt": "int NOT NULL",
    "max_attempts": "int NOT NULL",
    "ttl_seconds": "double precision NOT NULL",
    "scheduled_at": "timestamptz",
    "deadline": "timestamptz",
    "not_before": "timestamptz",
    "created_at": "timestamptz NOT NULL",
    "updated_at": "timestamptz NOT NULL",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "worker_id": "text",
    "summary": "text",
    "error_kind": "text",
    "version": "int NOT NULL",
    "position": "bigint NOT NULL",
    # The last webhook delivery attempt (WebhookAttempted), if any.
    "last_delivery_id": "uuid",
    "last_delivery_outcome": "text",
    "last_delivery_at": "timestamptz",
}
COLUMNS = tuple(COLUMN_TYPES)

_OUTCOME_STATUS = {
    "AttemptCompleted": "Completed",
    "AttemptFailed": "Failed",
    "TaskExpired": "Expired",
    "TaskCancelled": "Cancelled",
}


def _summary(text: str | None) -> str | None:
    if not text:
        return None
    text = text.strip()
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def fold(row: dict[str, Any] | None, change: Change) -> dict[str, Any]:
    """The row after `change` (pure; the view's whole logic)."""
    data = change.data
    if change.type == "TaskSubmitted":
        row = dict.fromkeys(COLUMNS)
        row.update(
            id=change.task_id,
            tenant=data["tenant"],
            description=data["description"],
            language=data["language"],
            status="Pending",
            attempt=0,
            max_attempts=data["max_attempts"],
            ttl_seconds=data["ttl_seconds"],
            created_at=change.at,
        )
    elif row is None:
        raise LookupError(f"{change.type} at position {change.position} for unknown task")
    else:
        row = dict(row)
    kind = change.type
    if kind == "AttemptScheduled":
        row.update(
            status="Pending",
            attempt=data["attempt"],
            deadline=data["deadline"],
            not_before=data["not_before"],
            started_at=None,
            finished_at=None,
            worker_id=None,
            summary=None,
            error_kind=None,
        )
        if data["reason"] != "auto-retry":
            row.update(ttl_seconds=data["ttl_seconds"], scheduled_at=change.at)
    elif kind == "AttemptStarted":
        row.update(status="InProgress", started_at=change.at, worker_id=data["worker_id"])
    elif kind in _OUTCOME_STATUS:
        row.update(status=_OUTCOME_STATUS[kind], finished_at=change.at)
        if kind == "AttemptCompleted":
            row["summary"] = _summary(data["result"].get("stdout"))
        elif kind == "AttemptFailed":
            row.update(
                summary=_summary(data["error"].get("message")),
                error_kind=data["error"].get("kind"),
            )
    elif kind == "TaskUpdated":
        for name in ("description", "max_attempts", "ttl_seconds"):
            if name in data["changes"]:
                row[name] = data["changes"][name]
        if "ttl_seconds" in data["changes"]:
            row["deadline"] = row["scheduled_at"] + timedelta(seconds=row["ttl_seconds"])
    elif kind == "WebhookAttempted":
        # A fact about a delivery, not a transition: the status stays as it is.
        row.update(
            last_delivery_id=data["delivery_id"],
            last_delivery_outcome=data["outcome"],
            last_delivery_at=change.at,
        )
    row.update(updated_at=change.at, version=change.version, position=change.position)
    return row


class TaskStatusProjection(Projection):
    name = "task_status"
    column_types = COLUMN_TYPES

    def create_table(self, cur: Cursor[Any], table: sql.Identifier) -> None:
        indexes = (
            # Keyset pagination, newest first, per tenant; with and without a status filter.
            ("tenant_created", "tenant, created_at DESC, id DESC", ""),
            ("tenant_status_created", "tenant, status, created_at DESC, id DESC", ""),
            # Admins list across tenants.
            ("created", "created_at DESC, id DESC", ""),
            # The reaper's nearest deadline among unfinished tasks.
            ("open_deadline", "deadline", " WHERE status IN ('Pending', 'InProgress')"),
            # Run times of the tasks finished lately (queries.run_times).
            ("finished", "finished_at", " WHERE finished_at IS NOT NULL"),
        )
        base.create_table(cur, table, COLUMN_TYPES, indexes)

    def apply(
        self, cur: Cursor[Any], schema: str, table: sql.Identifier, changes: Sequence[Change]
    ) -> None:
        rows = base.rows_of_changed_tasks(cur, table, COLUMNS, changes, sql.SQL("OFFSET 0"))
        for change in changes:
            rows[change.task_id] = fold(rows.get(change.task_id), change)
        touched = {c.task_id for c in changes}
        upsert = base.upsert(table, COLUMNS)
        cur.executemany(upsert, [tuple(rows[t][c] for c in COLUMNS) for t in touched if t in rows])


# -- what the dispatcher and the reaper ask of the view ---------------------------------------


def _view(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, TaskStatusProjection.name)


def waiting_retries(
    conn: Connection[Any], schema: str, now: datetime
) -> list[tuple[UUID, int, datetime]]:
    """(task id, attempt, not_before) of each Pending attempt still in its backoff."""
    rows = conn.execute(
        sql.SQL(
            "SELECT id, attempt, not_before FROM {} WHERE status = 'Pending' AND not_before > %s"
        ).format(_view(schema)),
        (now,),
    ).fetchall()
    return [(task_id, int(attempt), due) for task_id, attempt, due in rows]


def due_for_expiry(
    conn: Connection[Any], schema: str, now: datetime, graced: datetime, limit: int
) -> list[tuple[UUID, int]]:
    """(task id, attempt) of unfinished tasks past their deadline, soonest first: Pending
    ones at their deadline, InProgress ones once `graced` (now less the worker's grace)
    has passed it too. Uses the view's partial index on unfinished tasks' deadlines."""
    rows = conn.execute(
        sql.SQL(
            "SELECT id, attempt FROM {} WHERE status IN ('Pending', 'InProgress')"
            " AND deadline <= %(now)s AND (status = 'Pending' OR deadline <= %(graced)s)"
            " ORDER BY deadline LIMIT %(limit)s"
        ).format(_view(schema)),
        {"now": now, "graced": graced, "limit": limit},
    ).fetchall()
    return [(task_id, int(attempt)) for task_id, attempt in rows]


def next_deadlines(
    conn: Connection[Any], schema: str, now: datetime, graced: datetime
) -> list[tuple[str, datetime]]:
    """(status, deadline) of the unfinished tasks due next and not yet due by the rule of
    `due_for_expiry`: InProgress ones get their grace, so the next to come due is among
    the first few."""
    rows = conn.execute(
        sql.SQL(
            "SELECT status, deadline FROM {} WHERE status IN ('Pending', 'InProgress')"
            " AND deadline > %(graced)s AND (deadline > %(now)s OR status = 'InProgress')"
            " ORDER BY deadline LIMIT 16"
        ).format(_view(schema)),
        {"now": now, "graced": graced},
    ).fetchall()
    return [(str(status), deadline) for status, deadline in rows]


def versions(conn: Connection[Any], schema: str) -> dict[UUID, int] | None:
    """Each task's version as the view last applied it; None when the view is not installed
    (ledger verification checks the log against it)."""
    view = conn.execute("SELECT to_regclass(%s)", (f"{schema}.{TaskStatusProjection.name}",))
    row = view.fetchone()
    if row is None or row[0] is None:
        return None
    rows = conn.execute(sql.SQL("SELECT id, version FROM {}").format(_view(schema))).fetchall()
    return {task_id: int(version) for task_id, version in rows}
