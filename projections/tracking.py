"""Where each follower of the log stands: a row per (follower, generation) in
`projection_tracking`, and which generation of each view is current in
`projection_current`. A view has generations (projections.base); a follower with no view
of its own (the dispatcher) keeps generation 0. Every position query lives here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import Connection, sql

# NOTIFYed with "<schema>:<view>:<position>" in the transaction of each applied batch.
PROJECTION_CHANNEL = "taskledger_projections"


def listen_to_views() -> sql.Composed:
    """The statement that subscribes a connection to the views' progress notifications."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(PROJECTION_CHANNEL))


def catalog_ddl(schema: str) -> list[sql.Composed]:
    s = sql.Identifier(schema)
    return [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.projection_current ("
            " projection text PRIMARY KEY,"
            " generation int NOT NULL)"
        ).format(s),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.projection_tracking ("
            " projection text NOT NULL,"
            " generation int NOT NULL,"
            " position bigint NOT NULL DEFAULT 0,"
            " updated_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (projection, generation))"
        ).format(s),
    ]


def generation_table(name: str, generation: int) -> str:
    return f"{name}_g{generation}"


@dataclass(frozen=True)
class Generation:
    projection: str
    generation: int
    position: int

    @property
    def table(self) -> str:
        return generation_table(self.projection, self.generation)


# Each view's current generation with its tracking row.
_CURRENT = (
    "SELECT c.projection, c.generation, t.position, t.updated_at"
    " FROM {s}.projection_current c JOIN {s}.projection_tracking t"
    " ON t.projection = c.projection AND t.generation = c.generation"
)


def views(conn: Connection[Any], schema: str) -> list[tuple[Generation, datetime]]:
    """Every installed view's current generation, and when its position last moved."""
    rows = conn.execute(
        sql.SQL(_CURRENT + " ORDER BY c.projection").format(s=sql.Identifier(schema))
    ).fetchall()
    return [(Generation(name, int(gen), int(pos)), at) for name, gen, pos, at in rows]


def view_position(conn: Connection[Any], schema: str, name: str) -> int:
    """How far view `name` has applied the log (0 when it is not installed)."""
    row = conn.execute(
        sql.SQL(_CURRENT + " WHERE c.projection = %s").format(s=sql.Identifier(schema)), (name,)
    ).fetchone()
    return int(row[2]) if row else 0


def current_generation(conn: Connection[Any], schema: str, name: str) -> Generation:
    """The current generation and its position (lock_current_generations to apply to it)."""
    row = conn.execute(
        sql.SQL(_CURRENT + " WHERE c.projection = %s").format(s=sql.Identifier(schema)), (name,)
    ).fetchone()
    if row is None:
        raise LookupError(f"projection {name!r} is not installed in schema {schema!r}")
    return Generation(name, int(row[1]), int(row[2]))


def lock_current_generations(
    conn: Connection[Any], schema: str, names: Sequence[str]
) -> list[Generation]:
    """The current generation and position of each of `names`, in that order, in one
    query; their tracking rows locked (FOR UPDATE) until the transaction ends, so that no
    one else applies a batch to them meanwhile."""
    rows = conn.execute(
        sql.SQL(
            _CURRENT + " WHERE c.projection = ANY(%s) ORDER BY c.projection FOR UPDATE OF c, t"
        ).format(s=sql.Identifier(schema)),
        (list(names),),
    ).fetchall()
    found = {name: Generation(name, int(gen), int(pos)) for name, gen, pos, _ in rows}
    for name in names:
        if name not in found:
            raise LookupError(f"projection {name!r} is not installed in schema {schema!r}")
    return [found[name] for name in names]


def lock_generation(conn: Connection[Any], schema: str, name: str, generation: int) -> int:
    """Lock a generation's tracking row for this transaction and return its position."""
    row = conn.execute(
        sql.SQL(
            "SELECT position FROM {}.projection_tracking"
            " WHERE projection = %s AND generation = %s FOR UPDATE"
        ).format(sql.Identifier(schema)),
        (name, generation),
    ).fetchone()
    if row is None:
        raise LookupError(f"projection {name!r} has no generation {generation}")
    return int(row[0])


def advance_many(
    conn: Connection[Any], schema: str, moves: Sequence[tuple[Generation, int]]
) -> None:
    """Move each generation's tracking position to its new one, and NOTIFY the views'
    channel of it, in one statement; refuse anything else: PositionConflict unless every
    generation was still at the position read."""
    moved = conn.execute(
        sql.SQL(
            "UPDATE {}.projection_tracking t SET position = m.new, updated_at = now()"
            " FROM unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[])"
            " AS m(projection, generation, old, new)"
            " WHERE t.projection = m.projection AND t.generation = m.generation"
            " AND t.position = m.old"
            " RETURNING t.projection, pg_notify(%s, %s || ':' || m.projection || ':' || m.new)"
        ).format(sql.Identifier(schema)),
        (
            [gen.projection for gen, _ in moves],
            [gen.generation for gen, _ in moves],
            [gen.position for gen, _ in moves],
            [new for _, new in moves],
            PROJECTION_CHANNEL,
            schema,
        ),
    ).fetchall()
    if len(moved) != len(moves):
        lost = sorted({gen.projection for gen, _ in moves} - {name for name, _ in moved})
        raise PositionConflict(
            f"projections {', '.join(lost)} are no longer at the positions read; "
            "another process applied these events"
        )


class PositionConflict(Exception):
    """A batch was about to be applied at a position that was already moved past."""


def follower_position(conn: Connection[Any], schema: str, name: str) -> int:
    """The saved position of follower `name` (generation 0; made at 0 the first time)."""
    s = sql.Identifier(schema)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.projection_tracking (projection, generation, position)"
            " VALUES (%s, 0, 0) ON CONFLICT DO NOTHING"
        ).format(s),
        (name,),
    )
    row = conn.execute(
        sql.SQL(
            "SELECT position FROM {}.projection_tracking WHERE projection = %s AND generation = 0"
        ).format(s),
        (name,),
    ).fetchone()
    return int(row[0]) if row else 0


def save_follower_position(conn: Connection[Any], schema: str, name: str, position: int) -> None:
    conn.execute(
        sql.SQL(
            "UPDATE {}.projection_tracking SET position = %s, updated_at = now()"
            " WHERE projection = %s AND generation = 0"
        ).format(sql.Identifier(schema)),
        (position, name),
    )
