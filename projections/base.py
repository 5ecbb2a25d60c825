"""What a projection is, and the catalog that tracks every projection's generations.

A projection owns one table per *generation*: `<name>_g<N>`. A SQL view named `<name>`
always points at the current generation, so readers never see a table being rebuilt.
The tracking position of each generation lives in `projection_tracking`
(projections.tracking), and a batch of view rows is written in the same transaction as the
tracking row's new position, after the tracking row is locked and its position checked: a
batch can never be applied twice.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any
from uuid import UUID

from psycopg import Connection, Cursor, sql

from ledger.log import Change
from projections.tracking import catalog_ddl, generation_table

log = logging.getLogger(__name__)


class Projection(ABC):
    """A view of the event log, applied a batch of changes at a time."""

    name: str  # also the name of the SQL view readers query
    # The aggregates whose events it applies (Change.stream); the others pass it by.
    streams: frozenset[str] = frozenset({"Task"})
    # Its columns and their SQL types, when a release may add some: a nullable column a
    # new release adds is added to the live generation at start (ensure_installed).
    column_types: dict[str, str] | None = None

    @abstractmethod
    def create_table(self, cur: Cursor[Any], table: sql.Identifier) -> None:
        """Create an empty generation table (and its indexes)."""

    @abstractmethod
    def apply(
        self, cur: Cursor[Any], schema: str, table: sql.Identifier, changes: Sequence[Change]
    ) -> None:
        """Apply changes (in position order) to the generation table; `schema` is where
        the log is, for a view that must read an earlier event again."""


def ensure_installed(conn: Connection[Any], schema: str, projection: Projection) -> None:
    """Create the catalog and generation 1 of the projection if they do not exist yet."""
    # Processes that start together take turns: CREATE ... IF NOT EXISTS is not safe
    # against itself in two sessions at once.
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{schema}.projections",))
        for statement in catalog_ddl(schema):
            conn.execute(statement)
        row = conn.execute(
            sql.SQL("SELECT generation FROM {}.projection_current WHERE projection = %s").format(
                sql.Identifier(schema)
            ),
            (projection.name,),
        ).fetchone()
        if row is None:
            create_generation(conn, schema, projection, 1)
            switch_to(conn, schema, projection, 1)
        elif add_new_columns(conn, schema, projection, row[0]):
            switch_to(conn, schema, projection, row[0])  # the view's * was fixed at creation


def add_new_columns(
    conn: Connection[Any], schema: str, projection: Projection, generation: int
) -> list[str]:
    """Add to a generation made by an earlier release the nullable columns this release
    declares and it lacks; which were added. Such a column is NULL on the rows already
    there, which is right when the events that fill it are new in this release too; a
    column that cannot be NULL, or a changed fold, still needs a rebuild."""
    if projection.column_types is None:
        return []
    table = generation_table(projection.name, generation)
    present = {
        name
        for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s",
            (schema, table),
        ).fetchall()
    }
    added = []
    for name, column_type in projection.column_types.items():
        if name in present:
            continue
        if "NOT NULL" in column_type.upper() or "PRIMARY KEY" in column_type.upper():
            raise RuntimeError(
                f"view {projection.name}: this release adds column {name} ({column_type}), "
                f"which cannot be added in place: run `taskledger projections rebuild "
                f"{projection.name}`"
            )
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN {} " + column_type).format(
                sql.Identifier(schema, table), sql.Identifier(name)
            )
        )
        added.append(name)
    if added:
        log.warning(
            "a view got this release's new columns, NULL on its existing rows",
            extra={"view": projection.name, "generation": generation, "columns": added},
        )
    return added


def create_generation(
    conn: Connection[Any], schema: str, projection: Projection, generation: int
) -> None:
    table = sql.Identifier(schema, generation_table(projection.name, generation))
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        projection.create_table(cur, table)
        cur.execute(
            sql.SQL(
                "INSERT INTO {}.projection_tracking (projection, generation, position)"
                " VALUES (%s, %s, 0)"
                " ON CONFLICT (projection, generation) DO UPDATE SET position = 0,"
                " updated_at = now()"
            ).format(sql.Identifier(schema)),
            (projection.name, generation),
        )


def switch_to(conn: Connection[Any], schema: str, projection: Projection, generation: int) -> None:
    """Point the projection's view and catalog entry at `generation` (call in a transaction)."""
    s = sql.Identifier(schema)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.projection_current (projection, generation) VALUES (%s, %s)"
            " ON CONFLICT (projection) DO UPDATE SET generation = EXCLUDED.generation"
        ).format(s),
        (projection.name, generation),
    )
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier(schema, projection.name)))
    conn.execute(
        sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
            sql.Identifier(schema, projection.name),
            sql.Identifier(schema, generation_table(projection.name, generation)),
        )
    )


def create_table(
    cur: Cursor[Any],
    table: sql.Identifier,
    column_types: dict[str, str],
    indexes: Sequence[tuple[str, str, str]],
    constraint: str = "",
) -> None:
    """A generation table from its columns (name -> SQL type), with its indexes, each
    (name suffix, columns, WHERE clause or ""): fixed strings of ours, not input."""
    columns: list[sql.Composable] = [
        sql.SQL("{} " + column_type).format(sql.Identifier(name))
        for name, column_type in column_types.items()
    ]
    if constraint:
        columns.append(sql.SQL(constraint))
    cur.execute(sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(", ").join(columns)))
    base = table.as_string().replace('"', "").replace(".", "_")
    for suffix, indexed, where in indexes:
        cur.execute(
            sql.SQL("CREATE INDEX {} ON {} (" + indexed + ")" + where).format(
                sql.Identifier(f"{base}_{suffix}"), table
            )
        )


def upsert(table: sql.Identifier, columns: Sequence[str]) -> sql.Composed:
    """INSERT of a row of `columns` that, when a row with its key (the first column, `id`)
    exists, replaces that row's other columns."""
    return sql.SQL(
        "INSERT INTO {table} ({columns}) VALUES ({values})"
        " ON CONFLICT ({key}) DO UPDATE SET {updates}"
    ).format(
        table=table,
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        values=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        key=sql.Identifier(columns[0]),
        updates=sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns[1:]
        ),
    )


def copy_rows(
    cur: Cursor[Any], table: sql.Identifier, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Insert `rows` (values in `columns` order) with COPY: about twice the rows per second
    of INSERT, and the views that write a row per event (audit, task_periods) spend most
    of a rebuild here."""
    with cur.copy(
        sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns))
        )
    ) as copy:
        for row in rows:
            copy.write_row(row)


def rows_of_changed_tasks(
    cur: Cursor[Any],
    table: sql.Identifier,
    columns: Sequence[str],
    changes: Sequence[Change],
    pick: sql.SQL,
) -> dict[UUID, dict[str, Any]]:
    """The rows, by task id, of the tasks `changes` touch that were not submitted in them.
    `pick` chooses a task's row among its own.

    One index lookup per id (LATERAL, kept from being flattened): with `id = ANY(...)`
    the planner chose a sequential scan of the whole view for a few hundred ids while the
    table was young, ~10 ms per batch and growing with it."""
    created = {c.task_id for c in changes if c.type == "TaskSubmitted"}
    wanted = list({c.task_id for c in changes} - created)
    if not wanted:
        return {}
    cur.execute(
        sql.SQL(
            "SELECT {} FROM unnest(%s::uuid[]) AS wanted(id) CROSS JOIN LATERAL ("
            " SELECT * FROM {} t WHERE t.id = wanted.id {}) found"
        ).format(sql.SQL(", ").join(sql.Identifier("found", c) for c in columns), table, pick),
        (wanted,),
    )
    return {row[0]: dict(zip(columns, row, strict=True)) for row in cur.fetchall()}
