"""The audit view: one row per event, for queries across tasks (type, task, worker, time)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import orjson
from psycopg import Cursor, sql
from psycopg.types.json import Jsonb

from ledger.log import Change
from projections import base
from projections.base import Projection

COLUMNS = (
    "position",
    "task_id",
    "tenant",
    "type",
    "attempt",
    "worker_id",
    "at",
    "version",
    "payload",
)

# Events that belong to an attempt a worker ran: the row names that worker.
_RUN_EVENTS = frozenset({"AttemptCompleted", "AttemptFailed", "TaskExpired", "TaskCancelled"})


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class AuditProjection(Projection):
    name = "audit"

    def create_table(self, cur: Cursor[Any], table: sql.Identifier) -> None:
        cur.execute(
            sql.SQL(
                "CREATE TABLE {} ("
                " position bigint PRIMARY KEY,"
                " task_id uuid NOT NULL,"
                " tenant text NOT NULL,"
                " type text NOT NULL,"
                " attempt int,"
                " worker_id text,"
                " at timestamptz NOT NULL,"
                " version int NOT NULL,"
                " payload jsonb NOT NULL)"
            ).format(table)
        )
        base = table.as_string().replace('"', "").replace(".", "_")
        for suffix, columns, where in (
            ("tenant_position", "tenant, position DESC", ""),
            ("tenant_type_position", "tenant, type, position DESC", ""),
            ("task_position", "task_id, position DESC", ""),
            ("worker_position", "worker_id, position DESC", " WHERE worker_id IS NOT NULL"),
            ("tenant_at", "tenant, at", ""),
            # The outcomes per minute across tenants (queries.outcomes_per_minute).
            ("at", "at", ""),
        ):
            cur.execute(
                sql.SQL("CREATE INDEX {} ON {} (" + columns + ")" + where).format(
                    sql.Identifier(f"{base}_{suffix}"), table
                )
            )

    def apply(
        self, cur: Cursor[Any], schema: str, table: sql.Identifier, changes: Sequence[Change]
    ) -> None:
        tenants, workers = self._known(cur, table, changes)
        rows = []
        for change in changes:
            data = change.data
            attempt: int | None = data.get("attempt")
            if change.type == "TaskSubmitted":
                tenants[change.task_id] = data["tenant"]
            worker = None
            if change.type == "AttemptStarted" and attempt is not None:
                worker = workers[(change.task_id, attempt)] = data["worker_id"]
            elif change.type in _RUN_EVENTS and attempt is not None:
                worker = workers.get((change.task_id, attempt))
            rows.append(
                (
                    change.position,
                    change.task_id,
                    tenants[change.task_id],
                    change.type,
                    attempt,
                    worker,
                    change.at,
                    change.version,
                    Jsonb(data, dumps=_dumps),
                )
            )
        base.copy_rows(cur, table, COLUMNS, rows)

    def _known(
        self, cur: Cursor[Any], table: sql.Identifier, changes: Sequence[Change]
    ) -> tuple[dict[UUID, str], dict[tuple[UUID, int], str]]:
        """Tenants and attempt workers of the batch's tasks, from rows already applied."""
        created = {c.task_id for c in changes if c.type == "TaskSubmitted"}
        earlier = list({c.task_id for c in changes} - created)
        tenants: dict[UUID, str] = {}
        workers: dict[tuple[UUID, int], str] = {}
        if earlier:
            # One index lookup per task (see TaskStatusProjection._existing_rows: `= ANY`
            # got a sequential scan of the whole view).
            cur.execute(
                sql.SQL(
                    "SELECT e.task_id, e.tenant, e.type, e.attempt, e.worker_id"
                    " FROM unnest(%s::uuid[]) AS wanted(id) CROSS JOIN LATERAL ("
                    "  SELECT * FROM {} a WHERE a.task_id = wanted.id"
                    "  AND a.type IN ('TaskSubmitted', 'AttemptStarted') OFFSET 0) e"
                ).format(table),
                (earlier,),
            )
            for task_id, tenant, kind, attempt, worker in cur.fetchall():
                tenants[task_id] = tenant
                if kind == "AttemptStarted":
                    workers[(task_id, attempt)] = worker
        return tenants, workers
