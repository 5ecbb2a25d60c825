"""The reaper: expires tasks past their deadline that no worker is handling.

A worker running an attempt kills it at the deadline and records TaskExpired itself; the
reaper covers the rest: commands still queued, workers that died, no worker at all. It
sleeps until the nearest deadline among unfinished tasks (from the task status view's
deadline index), and wakes early when the view changes (a new, nearer deadline).
InProgress tasks get `worker_grace` seconds past their deadline so their worker can record
the expiry (and its `detected_by: worker`); either way, the first writer wins.

One reaper per deployment is active (a PostgreSQL advisory lock); the others wait.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from ledger import Ledger
from ledger.clock import Clock
from ledger.errors import LedgerError, TransitionRefused
from projections.runner import PROJECTION_CHANNEL
from workers.metrics import WorkerMetrics
from workers.singleton import acquire, keep_running

log = logging.getLogger(__name__)


class Reaper:
    def __init__(
        self,
        database_url: str,
        schema: str,
        ledger: Ledger,
        clock: Clock,
        *,
        worker_grace: float = 0.25,
        poll_interval: float = 1.0,
        standby_interval: float = 0.5,
        batch_size: int = 200,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.database_url = database_url
        self.schema = schema
        self.ledger = ledger
        self.clock = clock
        self.worker_grace = worker_grace
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.batch_size = batch_size
        self.expired = 0
        self.is_leader = asyncio.Event()
        self.metrics = metrics or WorkerMetrics()

    async def run(self, stop: asyncio.Event) -> None:
        await keep_running(
            "reaper", self._run_once, stop, self.standby_interval, self.is_leader.clear
        )

    async def _run_once(self, stop: asyncio.Event) -> None:
        key = f"taskledger.reaper.{self.schema}"
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as session:
            if not await acquire(session, key, stop, self.standby_interval):
                return
            await session.execute(sql.SQL("LISTEN {}").format(sql.Identifier(PROJECTION_CHANNEL)))
            self.is_leader.set()
            log.info("reaper active")
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                while not stop.is_set():
                    next_deadline = await asyncio.to_thread(self._reap, conn)
                    timeout = self.poll_interval
                    if next_deadline is not None:
                        timeout = max(0.0, min(timeout, next_deadline))
                    async for _ in session.notifies(timeout=timeout, stop_after=1):
                        pass

    def _reap(self, conn: psycopg.Connection[Any]) -> float | None:
        """Expire what is due; return seconds until the next deadline (None: none known)."""
        now = self.clock.now()
        rows = conn.execute(
            sql.SQL(
                "SELECT id, attempt, status, deadline FROM {}"
                " WHERE status IN ('Pending', 'InProgress') ORDER BY deadline LIMIT %s"
            ).format(sql.Identifier(self.schema, "task_status")),
            (self.batch_size,),
        ).fetchall()
        for task_id, attempt, status, deadline in rows:
            grace = timedelta(seconds=self.worker_grace if status == "InProgress" else 0)
            due = deadline + grace
            if due > now:
                seconds: float = (due - now).total_seconds()
                return seconds
            self._expire(task_id, attempt)
        return 0.0 if len(rows) == self.batch_size else None

    def _expire(self, task_id: UUID, attempt: int) -> None:
        try:
            task = self.ledger.expire(task_id, attempt, detected_by="reaper")
        except TransitionRefused:
            return  # it finished, or moved on, since the view saw it
        except LedgerError as error:
            log.warning(
                "reaper could not expire a task",
                extra={"task_id": str(task_id), "error": str(error)},
            )
            return
        self.expired += 1
        self.metrics.outcome_recorded(task)
        log.info("task expired by the reaper", extra={"task_id": str(task_id), "attempt": attempt})
