"""Leader election for the roles of which one process per deployment is active: each
view's runner (threads), the dispatcher and the reaper (asyncio).

A candidate tries a PostgreSQL advisory lock on a session of its own every `interval`;
the holder leads until that session ends (its process died, or lost the database), when
PostgreSQL releases the lock and the next try of a standby takes it. The same election in
both flavours, so the keys and the statement are written once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from psycopg import AsyncConnection, Connection

TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(%s))"


def lock_key(role: str, schema: str, name: str | None = None) -> str:
    """`taskledger.<role>.<schema>[.<name>]`: one leader per role (and view) per schema."""
    return f"taskledger.{role}.{schema}" + (f".{name}" if name else "")


def try_lead(session: Connection[Any], key: str) -> bool:
    """Take the lock `key` on `session` (autocommit) if it is free."""
    row = session.execute(TRY_LOCK, (key,)).fetchone()
    return bool(row and row[0])


async def wait_to_lead_async(
    session: AsyncConnection[Any], key: str, stop: asyncio.Event, interval: float
) -> bool:
    """Hold the lock `key` on `session` (autocommit) once it is free; False if stopped."""
    while not stop.is_set():
        row = await (await session.execute(TRY_LOCK, (key,))).fetchone()
        if row and row[0]:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return False
