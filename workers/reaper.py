"""The reaper: expires tasks past their deadline that no worker is handling.

A worker running an attempt kills it at the deadline and records TaskExpired itself; the
reaper covers the rest: commands still queued, workers that died, no worker at all. It
sleeps until the nearest deadline among unfinished tasks (from the task status view's
deadline index), and wakes early when the view changes (a new, nearer deadline).
InProgress tasks get `worker_grace` seconds past their deadline so their worker can record
the expiry (and its `detected_by: worker`); either way, the first writer wins.

It also takes the attempt leases that lapsed (their worker died, or cannot reach the
store) and records those attempts as AttemptFailed(worker_lost); the normal retry rule
then applies. It looks every `lease_interval` seconds, or at the latest every
`poll_interval`: leases lapse on a scale of seconds, deadlines on one of milliseconds.

One reaper per deployment is active (a PostgreSQL advisory lock); the others wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg

from ledger import AttemptError, Ledger, TaskState
from ledger.clock import Clock
from ledger.errors import LedgerError, TransitionRefused
from projections import leadership, task_status, tracking
from workers.metrics import WorkerMetrics
from workers.singleton import keep_running

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
        min_interval: float = 0.02,
        lease_interval: float = 0.5,
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
        self.lost = 0  # attempts recorded as worker_lost
        self.lease_interval = lease_interval
        self._leases_taken_at = float("-inf")  # time.monotonic() of the last look
        self.is_leader = asyncio.Event()
        self.metrics = metrics or WorkerMetrics()
        self.min_interval = min_interval

    async def run(self, stop: asyncio.Event) -> None:
        await keep_running(
            "reaper", self._run_once, stop, self.standby_interval, self.is_leader.clear
        )

    async def _run_once(self, stop: asyncio.Event) -> None:
        key = leadership.lock_key("reaper", self.schema)
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as session:
            if not await leadership.wait_to_lead_async(session, key, stop, self.standby_interval):
                return
            await session.execute(tracking.listen_to_views())
            self.is_leader.set()
            log.info("reaper active")
            loop = asyncio.get_running_loop()
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                while not stop.is_set():
                    reaped_at = loop.time()
                    next_deadline = await asyncio.to_thread(self._reap, conn)
                    timeout = self.poll_interval
                    if next_deadline is not None:
                        timeout = max(0.0, min(timeout, next_deadline))
                    notified = False
                    async for _ in session.notifies(timeout=timeout, stop_after=1):
                        notified = True
                    if notified:
                        # Under load the view changes hundreds of times a second; one look
                        # per `min_interval` is enough, but never past a known deadline.
                        wake = min(reaped_at + self.min_interval, reaped_at + timeout)
                        await asyncio.sleep(max(0.0, wake - loop.time()))

    def _reap(self, conn: psycopg.Connection[Any]) -> float | None:
        """Expire what is due; return seconds until the next deadline (None: none known)."""
        now = self.clock.now()
        graced = now - timedelta(seconds=self.worker_grace)
        due = task_status.due_for_expiry(conn, self.schema, now, graced, self.batch_size)
        self._take_lapsed_leases()
        if due:
            # One read and one transaction for all that are due together: 200 due at once
            # were expired 175 ms p99 late by eight threads sharing group commits, 10 ms
            # late this way (python -m bench --scenarios ttl).
            decisions = [self.ledger.expire_decision(t, a, detected_by="reaper") for t, a in due]
            for (task_id, attempt), outcome in zip(
                due, self.ledger.execute_many(decisions), strict=True
            ):
                self._expired(task_id, attempt, outcome)
        if len(due) == self.batch_size:
            return 0.0
        upcoming = task_status.next_deadlines(conn, self.schema, now, graced)
        if not upcoming:
            return None
        grace = timedelta(seconds=self.worker_grace)
        first: datetime = min(d + (grace if s == "InProgress" else 0 * grace) for s, d in upcoming)
        return max(0.0, (first - now).total_seconds())

    def _take_lapsed_leases(self) -> None:
        leases = self.ledger.leases
        now = time.monotonic()
        if leases is None or now - self._leases_taken_at < self.lease_interval:
            return
        self._leases_taken_at = now
        try:
            lapsed = leases.take_lapsed()
        except Exception as failure:  # noqa: BLE001 - the next pass tries again
            log.warning("reaper could not read the leases", extra={"error": str(failure)})
            return
        for lease in lapsed:
            context = {"task_id": str(lease.task_id), "attempt": lease.attempt}
            lost = AttemptError(
                "worker_lost",
                f"worker {lease.worker_id} stopped renewing its lease on attempt "
                f"{lease.attempt} (it lapsed at {lease.expires_at.isoformat()}): the worker "
                "died, or cannot reach the database",
            )
            try:
                task = self.ledger.fail_attempt(lease.task_id, lease.attempt, lost, retryable=True)
            except TransitionRefused:
                leases.drop(lease.task_id, lease.attempt)  # it ended some other way meanwhile
                continue
            except LedgerError as problem:
                log.warning(
                    "reaper could not record a lost worker",
                    extra={**context, "error": str(problem)},
                )
                continue
            self.lost += 1
            self.metrics.outcome_recorded(task)
            log.warning(
                "attempt's worker lost: its lease lapsed",
                extra={**context, "worker_id": lease.worker_id},
            )

    def _expired(self, task_id: UUID, attempt: int, outcome: TaskState | Exception) -> None:
        if isinstance(outcome, TransitionRefused):
            return  # it finished, or moved on, since the view saw it
        if isinstance(outcome, Exception):
            log.warning(
                "reaper could not expire a task; it tries again at its next pass",
                extra={"task_id": str(task_id), "attempt": attempt, "error": str(outcome)},
            )
            return
        self.expired += 1
        self.metrics.outcome_recorded(outcome)
        log.info("task expired by the reaper", extra={"task_id": str(task_id), "attempt": attempt})
