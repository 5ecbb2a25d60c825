"""The webhooks owed: one row per delivery a task's events call for, and where each stands.

A delivery is owed when a task event is one its subscription names (the task's
`callback_events`, else its tenant's default's, else the terminal transitions:
AttemptCompleted, TaskExpired, TaskCancelled, and AttemptFailed when no automatic retry
follows it) and there is a URL to send it to (the task's `callback_url`, else the tenant's
default callback in force at that event). Its id is uuid5(task id, trigger version)
(ledger.webhooks.delivery_id): the `webhook-id` header, the same on every re-send.
`WebhookAttempted` moves it: pending (attempts, next_at, last status and error),
delivered, or gave-up. The deliverer (api/delivery.py) reads the due rows.

To decide that, the view also keeps, in the same table, a `task` row per task that has a
subscription of its own (its tenant, URL and events) and a `tenant` row per tenant with
settings (its default). A task with neither a subscription nor a tenant default costs one
index probe per batch, no row: most tasks have no webhook, and a row for each, read back
on every later event, cost the api 1 ms of CPU per task. When some tenant has a default,
the tenant of a task without a row is read from its TaskSubmitted in the log. So the view
is a function of its own rows and the log, rebuildable like every view. Readers of
deliveries select `kind = 'delivery'`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from psycopg import Connection, Cursor, sql
from psycopg.types.json import Jsonb

from ledger import log as event_log
from ledger.log import Change
from ledger.targets import TERMINAL_EVENTS
from ledger.webhooks import delivery_id
from projections import base
from projections.base import Projection

COLUMN_TYPES = {
    "id": "uuid PRIMARY KEY",  # delivery id; task id (kind task); settings stream (tenant)
    "kind": "text NOT NULL",  # delivery | task | tenant
    "tenant": "text NOT NULL",
    "task_id": "uuid",
    "trigger_version": "int",
    "trigger_type": "text",
    "trigger_at": "timestamptz",
    "url": "text",  # delivery: where it goes; task, tenant: the callback URL (or NULL)
    "callback_events": "jsonb",  # task, tenant: the events named (NULL: the default)
    "state": "text",  # delivery: pending | delivered | gave-up
    "attempts": "int NOT NULL DEFAULT 0",
    "next_at": "timestamptz",
    "last_status": "int",
    "last_error": "text",
    "updated_at": "timestamptz NOT NULL",
}
COLUMNS = tuple(COLUMN_TYPES)
DELIVERY_COLUMNS = (
    "id",
    "task_id",
    "tenant",
    "trigger_version",
    "trigger_type",
    "trigger_at",
    "url",
    "state",
    "attempts",
    "next_at",
    "last_status",
    "last_error",
    "updated_at",
)
# Task events no subscription sends: they only move a task's own row or a delivery.
_NEVER_SENT = frozenset({"TaskSubmitted", "TaskUpdated", "WebhookAttempted"})
_OUTCOME_STATE = {"delivered": "delivered", "failed": "pending", "gave-up": "gave-up"}


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value, dumps=lambda v: orjson.dumps(v).decode())


def triggers(events: list[str] | None, change: Change, retried: bool) -> bool:
    """Whether `change` is an event a subscription naming `events` (None: the default,
    the terminal transitions) is sent; `retried`: an automatic retry follows it."""
    if events is None:
        return change.type in TERMINAL_EVENTS and not (change.type == "AttemptFailed" and retried)
    return change.type in events


class WebhookDeliveriesProjection(Projection):
    name = "webhook_deliveries"
    streams = frozenset({"Task", "TenantSettings"})

    def create_table(self, cur: Cursor[Any], table: sql.Identifier) -> None:
        indexes = (
            # The deliverer's due rows, soonest first.
            ("due", "next_at", " WHERE kind = 'delivery' AND state = 'pending'"),
            ("task", "task_id, trigger_version", " WHERE kind = 'delivery'"),
            ("tenant", "tenant", " WHERE kind = 'tenant'"),
        )
        base.create_table(cur, table, COLUMN_TYPES, indexes)

    def apply(
        self, cur: Cursor[Any], schema: str, table: sql.Identifier, changes: Sequence[Change]
    ) -> None:
        submitted = {c.task_id: c.data for c in changes if c.type == "TaskSubmitted"}
        in_batch = {c.task_id for c in changes if c.stream == "Task"}
        tasks = self._rows(cur, table, "task", in_batch - submitted.keys())
        # A task without a row of its own can only owe webhooks to its tenant's default.
        # Most tasks have neither: then no event of theirs costs more than the probe.
        defaults_exist = any(
            c.type == "WebhookDefaultSet" and c.data["callback_url"] is not None for c in changes
        ) or (
            cur.execute(
                sql.SQL(
                    "SELECT 1 FROM {} WHERE kind = 'tenant' AND url IS NOT NULL LIMIT 1"
                ).format(table)
            ).fetchone()
            is not None
        )
        subscribing = {
            c.task_id
            for c in changes
            if c.type == "TaskUpdated"
            and {"callback_url", "callback_events"} & c.data["changes"].keys()
        }
        unknown = (
            {
                c.task_id
                for c in changes
                if c.task_id in subscribing
                or (defaults_exist and c.stream == "Task" and c.type not in _NEVER_SENT)
            }
            - tasks.keys()
            - submitted.keys()
        )
        if unknown:
            submitted |= event_log.submissions(cur, schema, list(unknown))
        tenant_of = {task_id: data["tenant"] for task_id, data in submitted.items()}
        tenant_of |= {task_id: row["tenant"] for task_id, row in tasks.items()}
        settings_ids = {c.task_id for c in changes if c.stream == "TenantSettings"}
        tenants: dict[UUID, dict[str, Any]] = {}
        # A default without a URL sends nothing: the tenants' rows are read only when some
        # default has one, or when this batch changes settings.
        if defaults_exist or settings_ids:
            cur.execute(
                sql.SQL(
                    "SELECT {} FROM {} WHERE kind = 'tenant' AND (tenant = ANY(%s) OR id = ANY(%s))"
                ).format(sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), table),
                (list(set(tenant_of.values())), list(settings_ids)),
            )
            tenants = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in cur.fetchall()}
        default_of = {row["tenant"]: row for row in tenants.values()}
        # AttemptFailed followed by an automatic retry, saved together (a batch never ends
        # between them: runner.extend_to_transaction_end).
        retried = {
            (c.task_id, c.version - 1)
            for c in changes
            if c.type == "AttemptScheduled" and c.data.get("reason") == "auto-retry"
        }
        changed: dict[UUID, dict[str, Any]] = {}  # task and tenant rows to write
        deliveries: dict[UUID, dict[str, Any]] = {}  # new in this batch
        moved: dict[UUID, dict[str, Any]] = {}  # delivery rows already stored
        for change in changes:
            data = change.data
            if change.stream == "TenantSettings":
                if change.type == "SettingsCreated":
                    row = dict.fromkeys(COLUMNS)
                    row.update(id=change.task_id, kind="tenant", tenant=data["tenant"], attempts=0)
                    tenants[change.task_id] = row
                    default_of[row["tenant"]] = row
                else:
                    row = tenants[change.task_id]
                if change.type == "WebhookDefaultSet":
                    row.update(url=data["callback_url"], callback_events=data["callback_events"])
                row["updated_at"] = change.at
                changed[change.task_id] = row
                continue
            task = tasks.get(change.task_id)
            if change.type == "TaskSubmitted":
                url, events = data.get("callback_url"), data.get("callback_events")
                if url is not None or events is not None:
                    tasks[change.task_id] = changed[change.task_id] = self._task_row(
                        change, data["tenant"], url, events
                    )
                continue
            if change.type == "TaskUpdated":
                updates = data["changes"]
                if "callback_url" in updates or "callback_events" in updates:
                    if task is None:
                        task = tasks[change.task_id] = self._task_row(
                            change, self._tenant(tenant_of, change), None, None
                        )
                    task["url"] = updates.get("callback_url", task["url"])
                    task["callback_events"] = updates.get(
                        "callback_events", task["callback_events"]
                    )
                    task["updated_at"] = change.at
                    changed[change.task_id] = task
                continue
            if change.type == "WebhookAttempted":
                key = data["delivery_id"]
                target = deliveries.get(key) or moved.setdefault(key, {"id": key})
                target.update(
                    state=_OUTCOME_STATE.get(data["outcome"], "pending"),
                    attempts=data["delivery_attempt"],
                    next_at=data["next_attempt_at"],
                    last_status=data["status_code"],
                    last_error=data["error"],
                    updated_at=change.at,
                )
                continue
            if task is None:
                if not defaults_exist:
                    continue
                task = self._task_row(change, self._tenant(tenant_of, change), None, None)
            default = default_of.get(task["tenant"])
            url = task["url"] or (default["url"] if default is not None else None)
            if url is None:
                continue
            events = task["callback_events"]
            if events is None and task["url"] is None and default is not None:
                events = default["callback_events"]
            if not triggers(events, change, (change.task_id, change.version) in retried):
                continue
            key = delivery_id(change.task_id, change.version)
            row = dict.fromkeys(COLUMNS)
            row.update(
                id=key,
                kind="delivery",
                tenant=task["tenant"],
                task_id=change.task_id,
                trigger_version=change.version,
                trigger_type=change.type,
                trigger_at=change.at,
                url=url,
                state="pending",
                attempts=0,
                next_at=change.at,
                updated_at=change.at,
            )
            deliveries[key] = row
        upsert = base.upsert(table, COLUMNS)
        rows = [*changed.values(), *deliveries.values()]
        if rows:
            cur.executemany(
                upsert,
                [
                    tuple(_jsonb(row[c]) if c == "callback_events" else row[c] for c in COLUMNS)
                    for row in rows
                ],
            )
        if moved:
            cur.executemany(
                sql.SQL(
                    "UPDATE {} SET state = %(state)s, attempts = %(attempts)s,"
                    " next_at = %(next_at)s, last_status = %(last_status)s,"
                    " last_error = %(last_error)s, updated_at = %(updated_at)s"
                    " WHERE id = %(id)s AND kind = 'delivery'"
                ).format(table),
                list(moved.values()),
            )

    @staticmethod
    def _task_row(
        change: Change, tenant: str, url: str | None, events: list[str] | None
    ) -> dict[str, Any]:
        row = dict.fromkeys(COLUMNS)
        row.update(
            id=change.task_id,
            kind="task",
            tenant=tenant,
            task_id=change.task_id,
            url=url,
            callback_events=events,
            attempts=0,
            updated_at=change.at,
        )
        return row

    @staticmethod
    def _tenant(tenant_of: dict[UUID, str], change: Change) -> str:
        try:
            return tenant_of[change.task_id]
        except KeyError:
            raise LookupError(
                f"{change.type} at position {change.position} for unknown task"
            ) from None

    def _rows(
        self, cur: Cursor[Any], table: sql.Identifier, kind: str, ids: set[UUID]
    ) -> dict[UUID, dict[str, Any]]:
        if not ids:
            return {}
        cur.execute(
            sql.SQL(
                "SELECT {} FROM unnest(%s::uuid[]) AS wanted(id) CROSS JOIN LATERAL ("
                " SELECT * FROM {} t WHERE t.id = wanted.id AND t.kind = %s OFFSET 0) found"
            ).format(sql.SQL(", ").join(sql.Identifier("found", c) for c in COLUMNS), table),
            (list(ids), kind),
        )
        return {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in cur.fetchall()}


# -- what the deliverer asks of the view ---------------------------------------------------------


def _view(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, WebhookDeliveriesProjection.name)


def due(conn: Connection[Any], schema: str, now: datetime, limit: int) -> list[dict[str, Any]]:
    """The pending deliveries due by `now`, soonest first."""
    rows = conn.execute(
        sql.SQL(
            "SELECT {} FROM {} WHERE kind = 'delivery' AND state = 'pending'"
            " AND next_at <= %s ORDER BY next_at LIMIT %s"
        ).format(sql.SQL(", ").join(map(sql.Identifier, DELIVERY_COLUMNS)), _view(schema)),
        (now, limit),
    ).fetchall()
    return [dict(zip(DELIVERY_COLUMNS, row, strict=True)) for row in rows]


def next_due(conn: Connection[Any], schema: str) -> datetime | None:
    """When the soonest pending delivery is due (None: none is pending)."""
    row = conn.execute(
        sql.SQL("SELECT min(next_at) FROM {} WHERE kind = 'delivery' AND state = 'pending'").format(
            _view(schema)
        )
    ).fetchone()
    return None if row is None else row[0]


def deliveries_of(conn: Connection[Any], schema: str, task_id: UUID) -> list[dict[str, Any]]:
    """A task's deliveries, in the order of their triggers."""
    rows = conn.execute(
        sql.SQL(
            "SELECT {} FROM {} WHERE kind = 'delivery' AND task_id = %s ORDER BY trigger_version"
        ).format(sql.SQL(", ").join(map(sql.Identifier, DELIVERY_COLUMNS)), _view(schema)),
        (task_id,),
    ).fetchall()
    return [dict(zip(DELIVERY_COLUMNS, row, strict=True)) for row in rows]
