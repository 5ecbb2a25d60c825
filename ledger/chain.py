"""The hash chain over the log: every stored event is covered by SHA-256 in position order.

    digest(e) = SHA-256(id (16 bytes) | version (8, big-endian) | len(topic) (4) | topic
                        (UTF-8) | len(state) (4) | state)
    chain(e)  = SHA-256(chain(the event before e in the log) | digest(e)),
                with 32 zero bytes before the first event

The recorder computes each digest before it saves (ledger.persistence); PostgreSQL links
them in the insert itself (`insert_statement`, a function over the library's array of
stored events and their digests). The insert runs under the events table's EXCLUSIVE lock
that every save takes, so the event before is the last one committed and the chain's
order is the position order. A group commit of many tasks' events is still one
statement: the chain costs a SHA-256 of 64 bytes per event and one index read per
transaction. (A set-based insert computing the chain with a window aggregate took 240 µs
more per one-event save, most of it planning; this function, 15-45 µs.)

What it proves, and what it cannot: docs/ledger.md, "Tamper evidence".
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

from psycopg import Connection, sql
from psycopg.rows import tuple_row

GENESIS = bytes(32)  # the chain before the first event


def digest(originator_id: UUID, version: int, topic: str, state: bytes) -> bytes:
    """An event's own digest: its id, version, topic and stored bytes."""
    encoded = topic.encode()
    return hashlib.sha256(
        originator_id.bytes
        + version.to_bytes(8, "big", signed=True)
        + len(encoded).to_bytes(4, "big")
        + encoded
        + len(state).to_bytes(4, "big")
        + state
    ).digest()


def link(previous: bytes, event_digest: bytes) -> bytes:
    """The chain at an event, from the chain at the event before it."""
    return hashlib.sha256(previous + event_digest).digest()


def insert_function(table: str) -> str:
    """One per events table: the function names the table it inserts into."""
    return f"{table}_insert"


def ddl(schema: str, table: str, stored_event_type: str) -> list[sql.Composed]:
    """The chain's columns and the insert function (idempotent)."""
    events = sql.Identifier(schema, table)
    return [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS digest bytea,"
            " ADD COLUMN IF NOT EXISTS chain bytea"
        ).format(events),
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {function}(events {type}[], digests bytea[])"
            " RETURNS SETOF bigint LANGUAGE plpgsql AS $$"
            " DECLARE previous bytea; chains bytea[] := '{{}}'; next bytea;"
            " BEGIN"
            "  SELECT e.chain INTO previous FROM {events} e"
            "   ORDER BY e.notification_id DESC LIMIT 1;"
            "  previous := coalesce(previous, {genesis});"
            "  FOREACH next IN ARRAY digests LOOP"
            "   previous := sha256(previous || next);"
            "   chains := chains || previous;"
            "  END LOOP;"
            "  RETURN QUERY INSERT INTO {events} AS t"
            "   (originator_id, originator_version, topic, state, digest, chain)"
            "   SELECT (events[i]).originator_id, (events[i]).originator_version,"
            "    (events[i]).topic, (events[i]).state, digests[i], chains[i]"
            "   FROM generate_subscripts(events, 1) AS i ORDER BY i"
            "   RETURNING t.notification_id;"
            " END $$"
        ).format(
            function=sql.Identifier(schema, insert_function(table)),
            type=sql.Identifier(schema, stored_event_type),
            events=events,
            genesis=sql.Literal(GENESIS),
        ),
    ]


def insert_statement(schema: str, table: str, stored_event_type: str) -> sql.Composed:
    """The save's insert: its stored events and their digests (two arrays, in order);
    returns their positions in order, as the library's insert does."""
    return sql.SQL(
        "SELECT position AS notification_id FROM {}(%s::{}[], %s::bytea[]) AS position"
    ).format(
        sql.Identifier(schema, insert_function(table)),
        sql.Identifier(schema, stored_event_type),
    )


def backfill(conn: Connection[Any], schema: str, table: str) -> int:
    """Chain the rows stored before the chain existed, in position order (under the
    table's lock, so no save interleaves); how many. Runs once, at the upgrade."""
    events = sql.Identifier(schema, table)
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(events))
        first = cur.execute(
            sql.SQL("SELECT min(notification_id) FROM {} WHERE chain IS NULL").format(events)
        ).fetchone()
        if first is None or first[0] is None:
            return 0
        row = cur.execute(
            sql.SQL(
                "SELECT chain FROM {} WHERE notification_id < %s"
                " ORDER BY notification_id DESC LIMIT 1"
            ).format(events),
            (first[0],),
        ).fetchone()
        previous = bytes(row[0]) if row is not None and row[0] is not None else GENESIS
        rows = cur.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM {} WHERE notification_id >= %s ORDER BY notification_id"
            ).format(events),
            (first[0],),
        ).fetchall()
        updates = []
        for position, originator_id, version, topic, state in rows:
            own = digest(originator_id, version, topic, bytes(state))
            previous = link(previous, own)
            updates.append((own, previous, position))
        cur.executemany(
            sql.SQL("UPDATE {} SET digest = %s, chain = %s WHERE notification_id = %s").format(
                events
            ),
            updates,
        )
        return len(updates)
