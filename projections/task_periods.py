"""The task list as of any time: one row per version of each task, with the period it held.

Each row is the task status view's row (`task_status.fold`, the same columns) at one
version, valid from the time of its event until the next event of the task (`valid_to`
NULL: still current). `GET /api/tasks?as_of=T` reads the rows whose period holds T,
through an index on (tenant, created_at DESC, id DESC): the page's tasks are the newest
created at or before T, and a task's few rows (one per event) are all that is checked
beyond them. The table has as many rows as the log has task events.

A period starts at its event's time, or at the previous period's start if that is later:
another process's clock may put an event a moment before the one it follows, and a state
is only ever a prefix of the history (as `Ledger.get_as_of` replays it).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from psycopg import Cursor, sql

from ledger.log import Change
from projections import base, task_status
from projections.base import Projection

COLUMN_TYPES = {
    **task_status.COLUMN_TYPES,
    "id": "uuid NOT NULL",
    "valid_from": "timestamptz NOT NULL",
    "valid_to": "timestamptz",
}
COLUMNS = tuple(COLUMN_TYPES)
_columns = operator.itemgetter(*COLUMNS)  # a row's values, in COLUMNS order


class TaskPeriodsProjection(Projection):
    name = "task_periods"
    column_types = COLUMN_TYPES

    def create_table(self, cur: Cursor[Any], table: sql.Identifier) -> None:
        indexes = (
            ("tenant_created", "tenant, created_at DESC, id DESC, valid_from", ""),
            ("created", "created_at DESC, id DESC, valid_from", ""),  # admins, all tenants
        )
        base.create_table(cur, table, COLUMN_TYPES, indexes, "PRIMARY KEY (id, version)")

    def apply(
        self, cur: Cursor[Any], schema: str, table: sql.Identifier, changes: Sequence[Change]
    ) -> None:
        current = base.rows_of_changed_tasks(
            cur, table, COLUMNS, changes, sql.SQL("ORDER BY t.version DESC LIMIT 1")
        )
        closed: list[tuple[Any, UUID, int]] = []  # (valid_to, id, version)
        opened: dict[tuple[UUID, int], dict[str, Any]] = {}
        for change in changes:
            previous = current.get(change.task_id)
            # fold copies the row it is given: the period's own columns come along and are
            # set again below.
            row = task_status.fold(previous, change)
            start = change.at
            if previous is not None:
                start = max(start, previous["valid_from"])
                key = (change.task_id, previous["version"])
                if key in opened:
                    opened[key]["valid_to"] = start  # opened and closed in this batch
                else:
                    closed.append((start, change.task_id, previous["version"]))
            row.update(valid_from=start, valid_to=None)
            current[change.task_id] = row
            opened[(change.task_id, row["version"])] = row
        if closed:
            cur.executemany(
                sql.SQL("UPDATE {} SET valid_to = %s WHERE id = %s AND version = %s").format(table),
                closed,
            )
        base.copy_rows(cur, table, COLUMNS, map(_columns, opened.values()))
