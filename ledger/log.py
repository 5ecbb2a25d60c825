"""The ledger's log: every stored event in global position order (the events table, and
the channel PostgreSQL notifies on each insert). The one place that reads it for
followers: the views' runner, the dispatcher, and the API's task watcher."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from psycopg import AsyncConnection, Connection, Cursor, sql

from ledger.jsonvalue import without_nul
from ledger.persistence import stored_fields

# The library names the table after the application: "TaskLedger".lower() + "_events".
EVENTS_TABLE = "taskledger_events"
# The channel the library NOTIFYs on each insert into that table.
EVENTS_CHANNEL = EVENTS_TABLE

_ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


def event_payload(event: object) -> dict[str, Any]:
    """An event's own fields, without the envelope (task id, version, time, topic)."""
    return {k: v for k, v in vars(event).items() if k not in _ENVELOPE}


class Change(NamedTuple):
    """One stored event as projections see it. A tuple, not a frozen dataclass: a rebuild
    makes one per event, and the dataclass's __init__ was 6 % of it."""

    position: int  # the event's global position (notification id)
    stream: str  # the aggregate class: "Task" (or "ApiKey", which views skip)
    task_id: UUID
    version: int
    type: str  # the event class name, e.g. "AttemptStarted"
    at: datetime
    data: dict[str, Any]  # the event's own fields (datetimes as datetime)
    size: int = 0  # bytes stored (how full a batch is)


# A batch holds at most about this many bytes of stored events (and at least one
# event): with outputs at their 1 MiB cap, 2,000 events read at once held 2.5 GB.
BATCH_BYTES = 64 * 1024 * 1024


def read_changes(
    conn: Connection[Any], schema: str, after: int, limit: int, max_bytes: int | None = None
) -> list[Change]:
    """Up to `limit` events with position > `after`, oldest first, and no more than
    `max_bytes` (BATCH_BYTES) of them but the one that crosses it.

    Positions can have holes (rolled-back inserts); the ledger's insert path commits in
    position order (table lock), so reading `> after` never skips a later-committed event.
    """
    # octet_length of a stored value reads its header only: the events past the bound
    # are never fetched nor decompressed.
    rows = conn.execute(
        sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM ("
            " SELECT notification_id, originator_id, originator_version, topic, state,"
            " sum(octet_length(state)) OVER (ORDER BY notification_id) AS upto"
            " FROM {} WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
            ") batch WHERE upto - octet_length(state) < %s ORDER BY notification_id"
        ).format(sql.Identifier(schema, EVENTS_TABLE)),
        (after, limit, BATCH_BYTES if max_bytes is None else max_bytes),
        prepare=True,
    ).fetchall()
    changes = []
    for position, task_id, version, topic, state in rows:
        kind, data = stored_fields(topic, state)
        at = data.pop("timestamp")
        if b"\\u0000" in state:
            # The ledger refuses NUL in what clients send and replaces it in program output,
            # but a view must never stall on one: PostgreSQL text cannot hold it.
            data = without_nul_deep(data)
        changes.append(
            Change(
                position=position,
                stream=topic.partition(":")[2].partition(".")[0],
                task_id=task_id,
                version=version,
                type=kind,
                at=at,
                data=data,
                size=len(state),
            )
        )
    return changes


def submissions(cur: Cursor[Any], schema: str, task_ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
    """The TaskSubmitted fields (a task's version 1) of each of `task_ids` that exists."""
    cur.execute(
        sql.SQL(
            "SELECT originator_id, originator_version, topic, state FROM {}"
            " WHERE originator_id = ANY(%s) AND originator_version = 1"
        ).format(sql.Identifier(schema, EVENTS_TABLE)),
        (task_ids,),
    )
    found = {}
    for task_id, _, topic, state in cur.fetchall():
        _, fields = stored_fields(topic, state)
        fields.pop("timestamp")
        found[task_id] = fields
    return found


def without_nul_deep(value: Any) -> Any:
    if isinstance(value, str):
        return without_nul(value)
    if isinstance(value, list):
        return [without_nul_deep(v) for v in value]
    if isinstance(value, dict):
        return {without_nul(k): without_nul_deep(v) for k, v in value.items()}
    return value


def _head(schema: str) -> sql.Composed:
    return sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {}").format(
        sql.Identifier(schema, EVENTS_TABLE)
    )


def head_position(conn: Connection[Any], schema: str) -> int:
    """The highest position in the log (0 when empty)."""
    row = conn.execute(_head(schema)).fetchone()
    return int(row[0]) if row else 0


async def head_position_async(conn: AsyncConnection[Any], schema: str) -> int:
    """`head_position` on an asyncio connection."""
    row = await (await conn.execute(_head(schema))).fetchone()
    return int(row[0]) if row else 0


# At most this many rows a `tasks_changed_after` reads (its caller asks again when full).
CHANGED_LIMIT = 5_000


async def tasks_changed_after(
    conn: AsyncConnection[Any], schema: str, after: int
) -> list[tuple[int, UUID]]:
    """(position, task id) of the events past `after`, oldest first, at most
    CHANGED_LIMIT of them: who changed, without reading what.

    The LIMIT keeps its plan on the position index. Without one, the generic plan that
    PostgreSQL caches for a statement run often (psycopg prepares it after five runs)
    estimated a third of the log past any `after` and scanned and sorted the whole
    table, on every commit, until autovacuum's statistics replaced the plan: a soak fell
    behind for a minute or more, reading 2 million rows a second at 30,000 events."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT notification_id, originator_id FROM {}"
            " WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
        ).format(sql.Identifier(schema, EVENTS_TABLE)),
        (after, CHANGED_LIMIT),
    )
    return [(int(position), task_id) for position, task_id in await cur.fetchall()]


def listen() -> sql.Composed:
    """The statement that subscribes a connection to the log's insert notifications."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(EVENTS_CHANNEL))
