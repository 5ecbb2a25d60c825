"""Wake long-polling requests when their task gets a new event, and event streams when
the log gets any.

One LISTEN connection per API process follows the event log's positions (ids only, no
payloads) and sets the waiters of the tasks that changed, and every stream's; a waiter
then rereads what it follows. A poll every `poll_interval` covers a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from uuid import UUID

import psycopg

from ledger import log as event_log

log = logging.getLogger(__name__)


class TaskWatcher:
    def __init__(self, database_url: str, schema: str, *, poll_interval: float = 1.0) -> None:
        self.database_url = database_url
        self.schema = schema
        self.poll_interval = poll_interval
        self._waiters: defaultdict[UUID, set[asyncio.Event]] = defaultdict(set)
        self._everyone: set[asyncio.Event] = set()  # the event streams: any change
        self._task: asyncio.Task[None] | None = None

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow())

    @contextlib.contextmanager
    def subscribe(self, task_id: UUID) -> Iterator[asyncio.Event]:
        """An event set whenever the task gets a new event, while the block runs.

        Subscribe before reading the task, so a change between the read and the wait
        still wakes the waiter.
        """
        self._ensure_running()
        event = asyncio.Event()
        self._waiters[task_id].add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[task_id]

    @contextlib.contextmanager
    def subscribe_all(self) -> Iterator[asyncio.Event]:
        """An event set whenever the log gets any new event, while the block runs."""
        self._ensure_running()
        event = asyncio.Event()
        self._everyone.add(event)
        try:
            yield event
        finally:
            self._everyone.discard(event)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _follow(self) -> None:
        while True:
            try:
                await self._follow_once()
            except (psycopg.Error, OSError) as error:
                log.warning(
                    "task watcher lost its connection; retrying", extra={"error": str(error)}
                )
                self._wake_all()  # waiters reread their task rather than miss a change
                await asyncio.sleep(self.poll_interval)

    async def _follow_once(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as conn:
            await conn.execute(event_log.listen())
            last = await event_log.head_position_async(conn, self.schema)
            # A change stored before `last` was read (while this connection was being
            # made) would never wake its waiter: they all reread once.
            self._wake_all()
            while True:
                before = last
                full = False
                if self._waiters:
                    changed = await event_log.tasks_changed_after(conn, self.schema, last)
                    full = len(changed) == event_log.CHANGED_LIMIT
                    for position, task_id in changed:
                        last = position
                        for event in self._waiters.get(task_id, ()):
                            event.set()
                else:
                    last = await event_log.head_position_async(conn, self.schema)
                    # Someone subscribed while we skipped ahead: they may have missed a
                    # change below `last`; a spurious wake only costs them a reread.
                    self._wake_all()
                if last != before:
                    for event in self._everyone:
                        event.set()
                if full:
                    continue  # more past the limit: read on before waiting
                async for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                    pass

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()
        for event in self._everyone:
            event.set()
