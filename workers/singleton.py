"""Roles of which one process per deployment is active: the dispatcher and the reaper.

Each runs turn after turn: a turn waits to lead (projections.leadership), works until its
session ends (it died, or the database went away), and then stands down; the next
standby takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psycopg

log = logging.getLogger(__name__)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def keep_running(
    role: str,
    once: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
    standby_interval: float,
    on_stand_down: Callable[[], None],
) -> None:
    """Run `once` again and again until stopped, logging why each turn ended."""
    while not stop.is_set():
        try:
            await once(stop)
        except (psycopg.OperationalError, OSError) as error:
            log.warning(f"{role} lost a connection; retrying", extra={"error": str(error)})
        except Exception:
            log.exception(f"{role} failed; retrying in 2 s")
            await sleep_or_stop(stop, 2.0)
        on_stand_down()
        await sleep_or_stop(stop, standby_interval)
