"""The API keys view: one row per issued key (never its secret or digest), for the keys
page and `GET /api/keys`. Keys configured in settings are not events, so not here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import Cursor, sql

from ledger.log import Change
from projections import base
from projections.base import Projection

COLUMN_TYPES = {
    "stream_id": "uuid PRIMARY KEY",  # the ApiKey aggregate's id (KeyRevoked names only it)
    "key_id": "text NOT NULL",
    "tenant": "text NOT NULL",
    "role": "text NOT NULL",
    "label": "text NOT NULL",
    "issued_by": "text NOT NULL",
    "issued_at": "timestamptz NOT NULL",
    "revoked_at": "timestamptz",
    "revoked_by": "text",
}
COLUMNS = tuple(COLUMN_TYPES)
LISTED = COLUMNS[1:]


class ApiKeysProjection(Projection):
    name = "api_keys"
    streams = frozenset({"ApiKey"})

    def create_table(self, cur: Cursor[Any], table: sql.Identifier) -> None:
        base.create_table(cur, table, COLUMN_TYPES, (("tenant_issued", "tenant, issued_at", ""),))

    def apply(
        self, cur: Cursor[Any], schema: str, table: sql.Identifier, changes: Sequence[Change]
    ) -> None:
        for change in changes:
            data = change.data
            if change.type == "KeyIssued":
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {} ({}) VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, NULL)"
                    ).format(table, sql.SQL(", ").join(map(sql.Identifier, COLUMNS))),
                    (
                        change.task_id,
                        data["key_id"],
                        data["tenant"],
                        data["role"],
                        data["label"],
                        data["issued_by"],
                        change.at,
                    ),
                )
            elif change.type == "KeyRevoked":
                cur.execute(
                    sql.SQL(
                        "UPDATE {} SET revoked_at = %s, revoked_by = %s WHERE stream_id = %s"
                    ).format(table),
                    (change.at, data["by"], change.task_id),
                )
