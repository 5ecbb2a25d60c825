"""The hash chain over the log: every stored event is covered by SHA-256 in position order.

    digest(e) = SHA-256(id (16 bytes) | version (8, big-endian) | len(topic) (4) | topic
                        (UTF-8) | len(state) (4) | state)
    chain(e)  = SHA-256(chain(the event before e in the log) | digest(e)),
                with 32 zero bytes before the first event

PostgreSQL computes both in the insert itself (`insert_statement`): the statement runs
under the events table's EXCLUSIVE lock that every save takes, so the event before is the
last one committed, and the chain's order is the position order. A group commit of many
tasks' events is still one statement: the chain costs a digest per event and one index
read per transaction.

What it proves, and what it cannot: docs/ledger.md, "Tamper evidence".
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

from psycopg import Connection, sql
from psycopg.rows import tuple_row

GENESIS = bytes(32)  # the chain before the first event
STEP_FUNCTION = "taskledger_chain_step"
CHAIN_AGGREGATE = "taskledger_chain"

# The digest of a stored row, as SQL over the columns of `e` (the same bytes as `digest`).
_DIGEST = (
    "sha256(uuid_send(e.originator_id) || int8send(e.originator_version)"
    " || int4send(octet_length(convert_to(e.topic, 'UTF8'))) || convert_to(e.topic, 'UTF8')"
    " || int4send(octet_length(e.state)) || e.state)"
)


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


def ddl(schema: str, table: str) -> list[sql.Composed]:
    """The chain's columns and the running aggregate the insert uses (idempotent)."""
    step = sql.Identifier(schema, STEP_FUNCTION)
    return [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS digest bytea,"
            " ADD COLUMN IF NOT EXISTS chain bytea"
        ).format(sql.Identifier(schema, table)),
        # NULL state: the first row of the sequence is the chain to continue from.
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}(state bytea, next bytea) RETURNS bytea"
            " LANGUAGE sql IMMUTABLE PARALLEL SAFE"
            " AS $$ SELECT CASE WHEN state IS NULL THEN next ELSE sha256(state || next) END $$"
        ).format(step),
        sql.SQL("CREATE OR REPLACE AGGREGATE {}(bytea) (SFUNC = {}, STYPE = bytea)").format(
            sql.Identifier(schema, CHAIN_AGGREGATE), step
        ),
    ]


def insert_statement(schema: str, table: str, stored_event_type: str) -> sql.Composed:
    """The library's insert (one parameter: its array of stored events; RETURNING their
    positions in order), writing each event's digest and chain as well."""
    events = sql.Identifier(schema, table)
    return sql.SQL(
        "WITH new AS ("
        " SELECT e.originator_id, e.originator_version, e.topic, e.state, e.n, {digest} AS digest"
        " FROM unnest(%s::{type}[]) WITH ORDINALITY"
        " AS e(originator_id, originator_version, topic, state, n)"
        "), links AS ("
        " SELECT n, {chain}(x) OVER (ORDER BY n) AS chain FROM ("
        "  SELECT 0::bigint AS n, coalesce("
        "   (SELECT chain FROM {events} ORDER BY notification_id DESC LIMIT 1), {genesis}) AS x"
        "  UNION ALL SELECT n, digest FROM new) sequence"
        ")"
        " INSERT INTO {events} AS t"
        " (originator_id, originator_version, topic, state, digest, chain)"
        " SELECT new.originator_id, new.originator_version, new.topic, new.state, new.digest,"
        " links.chain FROM new JOIN links USING (n) ORDER BY n"
        " RETURNING notification_id"
    ).format(
        digest=sql.SQL(_DIGEST),
        type=sql.Identifier(schema, stored_event_type),
        chain=sql.Identifier(schema, CHAIN_AGGREGATE),
        events=events,
        genesis=sql.Literal(GENESIS),
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
