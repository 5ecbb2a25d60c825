"""The dispatcher: the outbox relay from the event log to the broker.

Commands are derived from the log, never sent by the API directly, so a crash between a
commit and a publish loses nothing: the dispatcher's position (a follower's row in
`projection_tracking`, see projections.tracking) only moves after the broker confirmed
the commands up to it, and after a restart it publishes again from there. A command
published twice is harmless: the worker drops a command whose attempt is not the current
one, or already started.

- `AttemptScheduled` due now → publish at once (woken by the ledger's NOTIFY, so a
  submitted task reaches a worker within milliseconds, not on a poll);
- `AttemptScheduled` with a later `not_before` (a retry's backoff) → a timer, published
  when due; the timers are rebuilt from the task status view after a restart;
- `TaskCancelled` → a cancel broadcast, so the worker running it kills the program.

One dispatcher per deployment is active (a PostgreSQL advisory lock); the others wait.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from ledger import log as event_log
from ledger.clock import Clock
from ledger.log import read_changes
from projections import leadership, task_status, tracking
from workers.broker import Broker, RunAttempt
from workers.metrics import WorkerMetrics
from workers.singleton import keep_running

log = logging.getLogger(__name__)

NAME = "dispatcher"


class Dispatcher:
    def __init__(
        self,
        database_url: str,
        schema: str,
        broker: Broker,
        clock: Clock,
        *,
        batch_size: int = 1_000,
        poll_interval: float = 1.0,
        standby_interval: float = 0.5,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.database_url = database_url
        self.schema = schema
        self.broker = broker
        self.clock = clock
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.position = 0
        self.published = 0
        self.is_leader = asyncio.Event()
        self._timers: list[tuple[datetime, str, int]] = []  # (due, task id, attempt)
        self.metrics = metrics or WorkerMetrics()
        self._published_before = 0  # the saved position at start: up to it, a replay

    async def run(self, stop: asyncio.Event) -> None:
        await keep_running(
            "dispatcher", self._run_once, stop, self.standby_interval, self.is_leader.clear
        )

    async def _run_once(self, stop: asyncio.Event) -> None:
        key = leadership.lock_key("dispatcher", self.schema)
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as session:
            if not await leadership.wait_to_lead_async(session, key, stop, self.standby_interval):
                return
            await session.execute(event_log.listen())
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                await asyncio.to_thread(self._start, conn)
                self.is_leader.set()
                log.info("dispatcher active", extra={"position": self.position})
                await self._follow(stop, session, conn)

    def _start(self, conn: psycopg.Connection[Any]) -> None:
        """Load the position and the timers of retries still waiting for their backoff."""
        saved = tracking.follower_position(conn, self.schema, NAME)
        self._published_before = saved
        # Timers come from the view; whatever the view has not applied yet is replayed
        # from the log (a due command published twice is harmless, a lost one is not).
        view = tracking.view_position(conn, self.schema, task_status.TaskStatusProjection.name)
        self.position = min(saved, view)
        waiting = task_status.waiting_retries(conn, self.schema, self.clock.now())
        self._timers = [(due, str(task_id), attempt) for task_id, attempt, due in waiting]
        heapq.heapify(self._timers)

    async def _follow(
        self,
        stop: asyncio.Event,
        session: psycopg.AsyncConnection[Any],
        conn: psycopg.Connection[Any],
    ) -> None:
        while not stop.is_set():
            applied = await self._dispatch_batch(conn)
            await self._publish_due()
            if applied >= self.batch_size:
                continue
            timeout = self.poll_interval
            if self._timers:
                until_due = (self._timers[0][0] - self.clock.now()).total_seconds()
                timeout = max(0.0, min(timeout, until_due))
            gen = session.notifies(timeout=timeout, stop_after=1)
            async for _ in gen:
                pass

    async def _dispatch_batch(self, conn: psycopg.Connection[Any]) -> int:
        changes = await asyncio.to_thread(
            read_changes, conn, self.schema, self.position, self.batch_size
        )
        if not changes:
            return 0
        now = self.clock.now()
        due: list[RunAttempt] = []
        due_since: list[datetime] = []  # when each command (not replayed) became due
        cancelled: list[UUID] = []
        for change in changes:
            if change.type == "AttemptScheduled":
                not_before = change.data["not_before"]
                if not_before <= now:
                    due.append(RunAttempt(change.task_id, change.data["attempt"]))
                    if change.position > self._published_before:
                        due_since.append(max(change.at, not_before))
                else:
                    heapq.heappush(
                        self._timers, (not_before, str(change.task_id), change.data["attempt"])
                    )
            elif change.type == "TaskCancelled":
                cancelled.append(change.task_id)
        if due:
            await self.broker.publish(due)
            self.published += len(due)
            self.metrics.commands_dispatched(self.clock.now(), due_since)
        for task_id in cancelled:
            await self.broker.broadcast_cancel(task_id)
        new_position = changes[-1].position
        await asyncio.to_thread(
            tracking.save_follower_position, conn, self.schema, NAME, new_position
        )
        self.position = new_position
        return len(changes)

    async def _publish_due(self) -> None:
        now = self.clock.now()
        due = []
        due_since = []
        while self._timers and self._timers[0][0] <= now:
            since, task_id, attempt = heapq.heappop(self._timers)
            due.append(RunAttempt(UUID(task_id), attempt))
            due_since.append(since)
        if due:
            await self.broker.publish(due)
            self.published += len(due)
            self.metrics.commands_dispatched(self.clock.now(), due_since)
