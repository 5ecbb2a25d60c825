"""The worker: takes attempt commands from the broker, runs them, records their outcome.

For each command: append AttemptStarted (losing that race means someone else has it:
drop), acknowledge the command, run the program in the sandbox, append the outcome.
Once AttemptStarted is stored the ledger owns the attempt, not the broker: the worker
holds a lease on it (granted with AttemptStarted) and renews it with a heartbeat every
`heartbeat_seconds`. A worker that dies or is cut off stops renewing; when the lease
lapses, the leader (the reaper) records AttemptFailed(kind=worker_lost) and the normal
retry rule applies. A worker that learns it lost a lease (or cannot renew for a whole
lease) kills the run; the ledger refuses an outcome from a worker that no longer holds
the lease. A redelivered command for an attempt that already started is dropped: a
broker restart or its consumer_timeout loses nothing.

Shutdown (SIGTERM): stop taking commands, let running attempts finish for up to
`grace_seconds`, then kill them and record them as worker_lost (retried by the normal
rule); commands still waiting for a slot go back to the broker.

Its parts: `consumer.py` takes commands and cancel notices from the broker,
`lease_keeper.py` beats the heartbeat, `recorder.py` records outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from uuid import UUID

from ledger import AttemptError, Decision, Ledger, Status, TaskState
from ledger.batching import Batcher
from ledger.errors import (
    AttemptAlreadyStarted,
    DeadlinePassed,
    LedgerUnavailable,
    TaskNotFound,
    TransitionRefused,
)
from workers.broker import Broker, Delivery
from workers.consumer import consume, follow_cancels
from workers.executors.base import Executor, RunOutcome, RunRequest
from workers.lease_keeper import LeaseKeeper
from workers.metrics import WorkerMetrics
from workers.recorder import OutcomeRecorder
from workers.sandbox import SandboxError

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """`host-pid-random`: readable, and unique per process even where hosts share a name
    and pids repeat (containers on the host network were all `vm-6`; the id keys a
    worker's leases and heartbeat row, so two workers with one id would renew each
    other's leases)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


# `log_context(**fields)`: a block whose log lines all carry `fields`. The composition root
# hands in its own (`taskledger.logs`); the worker does not know how lines are written.
LogContext = Callable[..., AbstractContextManager[None]]


def no_log_context(**fields: object) -> AbstractContextManager[None]:
    """Adds nothing (a worker built without the composition root, in a test)."""
    return contextlib.nullcontext()


class Worker:
    def __init__(
        self,
        ledger: Ledger,
        broker: Broker,
        executors: Mapping[str, Executor],
        *,
        concurrency: int = 2,
        prefetch: int | None = None,
        worker_id: str | None = None,
        grace_seconds: float = 30.0,
        heartbeat_seconds: float | None = None,
        metrics: WorkerMetrics | None = None,
        log_context: LogContext = no_log_context,
    ) -> None:
        self.ledger = ledger
        self.broker = broker
        self.executors = executors
        # The languages whose attempts wait for a sandbox slot before they start.
        self._waits = frozenset(name for name, e in executors.items() if e.needs_slot)
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.grace_seconds = grace_seconds
        # Five heartbeats to a lease: a late one or two lose nothing.
        lease = ledger.leases.lease_seconds if ledger.leases is not None else 10.0
        self.heartbeat_seconds = heartbeat_seconds or lease / 5
        self.busy = 0
        self.handled = 0
        # task id -> its cancel event and attempt
        self._running: dict[str, tuple[asyncio.Event, int]] = {}
        self._shutting_down = False
        self._slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(concurrency):
            self._slots.put_nowait(slot)
        # Commands held at once. More than the slots: a command waiting for a slot is not
        # started yet, and echo commands need none; with many in flight, their ledger
        # writes share transactions (group commit).
        self.prefetch = prefetch or max(32, concurrency * 4)
        self._batcher: Batcher[Decision, TaskState] = Batcher(ledger.execute_many)
        self.metrics = metrics or WorkerMetrics()
        self.metrics.worker_started(self.worker_id, concurrency, lambda: self.busy)
        self.outcomes = OutcomeRecorder(ledger, self._ledger, self.metrics)
        self.log_context = log_context
        self.lease_keeper = LeaseKeeper(
            ledger.leases,
            worker_id=self.worker_id,
            slots=concurrency,
            heartbeat_seconds=self.heartbeat_seconds,
            busy=lambda: self.busy,
            kill=self._kill,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then drain (see the module docstring)."""
        log.info(
            "worker started", extra={"worker_id": self.worker_id, "concurrency": self.concurrency}
        )
        for executor in {id(e): e for e in self.executors.values()}.values():
            try:
                await executor.start()  # the sandbox checks and logs its layers now
            except SandboxError as error:  # its tasks fail with the reason, retryably
                log.error(
                    "the %s executor cannot start: %s",
                    executor.language,
                    error,
                    extra={"language": executor.language},
                )
        handlers: set[asyncio.Task[None]] = set()
        cancels = asyncio.create_task(follow_cancels(self.broker, self._cancel))
        heartbeat = asyncio.create_task(self.lease_keeper.keep())
        consumer = asyncio.create_task(
            consume(self.broker, self.prefetch, self._handle, handlers, self.worker_id)
        )
        try:
            await stop.wait()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            if handlers:
                log.info(
                    "worker stopping: waiting for running attempts",
                    extra={"running": len(handlers), "grace_seconds": self.grace_seconds},
                )
                _, pending = await asyncio.wait(handlers, timeout=self.grace_seconds)
                if pending:
                    self._shutting_down = True
                    for event, _ in self._running.values():
                        event.set()
                    await asyncio.wait(pending)
        finally:
            # Also when run() itself is cancelled: nothing it started may outlive it.
            children = [consumer, cancels, heartbeat, *handlers]
            for child in children:
                child.cancel()
            await asyncio.gather(*children, return_exceptions=True)
            await self._batcher.close()
            for executor in {id(e): e for e in self.executors.values()}.values():
                await executor.close()
            await self.lease_keeper.beat(stopped=True)
        log.info("worker stopped", extra={"worker_id": self.worker_id, "handled": self.handled})

    def _cancel(self, task_id: UUID) -> None:
        running = self._running.get(str(task_id))
        if running is not None:
            event, attempt = running
            log.info(
                "cancelling a running attempt",
                extra={"task_id": str(task_id), "attempt": attempt},
            )
            event.set()

    def _kill(self, task_id: UUID, attempt: int) -> None:
        """Kill the run of `attempt` of the task, if this worker runs it (lease lost)."""
        running = self._running.get(str(task_id))
        if running is not None and running[1] == attempt:
            running[0].set()

    async def _ledger(self, command: Decision) -> TaskState:
        return await self._batcher.run(command)

    async def _handle(self, delivery: Delivery) -> None:
        command = delivery.command
        context = {"task_id": str(command.task_id), "attempt": command.attempt}
        with self.log_context(**context):  # the sandbox's lines, too, say which attempt
            await self._handle_in_context(delivery, context)

    async def _handle_in_context(self, delivery: Delivery, context: dict[str, object]) -> None:
        slot: int | None = None
        acked = False
        try:
            # One round trip reads the task and, when it needs no sandbox slot (echo, an
            # unknown language that fails at once), starts it too.
            task = await self._start(delivery, self._start_decision(delivery, self._waits))
            if task is not None and task.status is Status.PENDING:
                # Started only once it can run; or, past its deadline while it waited for
                # a slot, the start is refused and the worker records the expiry.
                slot = await self._slot_or_deadline(task.deadline)
                task = await self._start(delivery, self._start_decision(delivery))
            # Started (or not ours): the ledger owns the attempt now, not the broker.
            acked = True
            await self._let_go(delivery, "ack", context)
            if task is None:
                return
            held = (task.id, task.attempt)
            self.lease_keeper.held[held] = task.language
            try:
                outcome = await self._run(task, slot)
                if outcome is None:  # shutting down, killed: the attempt is lost
                    outcome = RunOutcome(
                        "failed",
                        error=AttemptError(
                            "worker_lost",
                            f"worker {self.worker_id} stopped (SIGTERM) before attempt "
                            f"{task.attempt} finished; it was killed after the "
                            f"{self.grace_seconds:g} s grace",
                        ),
                        retryable=True,
                    )
                if held in self.lease_keeper.lost:
                    log.warning(
                        "lease lost while running: the run was killed, nothing is recorded "
                        "(the leader records the attempt as worker_lost)",
                        extra=context,
                    )
                else:
                    await self.outcomes.record(task, outcome)
            finally:
                self.lease_keeper.held.pop(held, None)
                self.lease_keeper.lost.discard(held)
            self.handled += 1
        except LedgerUnavailable as error:
            if acked:
                log.error(
                    "ledger unavailable while recording an outcome: the lease will lapse and "
                    "the leader record the attempt as worker_lost",
                    extra={**context, "error": str(error)},
                )
                return
            log.error(
                "ledger unavailable: the command goes back to the queue",
                extra={**context, "error": str(error)},
            )
            await asyncio.sleep(1)
            await self._let_go(delivery, "requeue", context)
        except Exception:
            if acked:
                log.exception(
                    "worker failed on a started attempt; its lease will lapse", extra=context
                )
                return
            log.exception("worker failed on a command; it goes back to the queue", extra=context)
            await self._let_go(delivery, "requeue", context)
        finally:
            if slot is not None:
                self._slots.put_nowait(slot)

    async def _let_go(self, delivery: Delivery, how: str, context: dict[str, object]) -> None:
        """Ack or requeue a delivery. If its channel is gone (a broker restart), the broker
        redelivers the command by itself, and a started attempt's command is then dropped:
        that is no reason to stop the run."""
        try:
            await (delivery.ack() if how == "ack" else delivery.requeue())
        except Exception as error:  # noqa: BLE001 - any broker failure means the same here
            log.info(
                "could not %s a command (its channel is gone); the broker will deliver it again",
                how,
                extra={**context, "error": repr(error)},
            )

    async def _slot_or_deadline(self, deadline: datetime) -> int | None:
        """A free sandbox slot, or None once `deadline` has passed."""
        while True:
            remaining = (deadline - self.ledger.clock.now()).total_seconds()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                # Queue.get gives up cleanly on a timeout: no slot is lost.
                return await asyncio.wait_for(self._slots.get(), remaining + 0.001)

    def _start_decision(self, delivery: Delivery, waits: Collection[str] = ()) -> Decision:
        command = delivery.command
        return self.ledger.start_decision(
            command.task_id, command.attempt, self.worker_id, waits=waits
        )

    async def _start(self, delivery: Delivery, start: Decision) -> TaskState | None:
        """The task once `start` ran (InProgress; or Pending, waiting for a slot), or None
        when the command is not ours to run."""
        command = delivery.command
        task_id, attempt = command.task_id, command.attempt
        context = {"task_id": str(task_id), "attempt": attempt}
        try:
            task = await self._ledger(start)
            if task.status is not Status.PENDING:
                self.metrics.attempt_started(task)
            return task
        except AttemptAlreadyStarted:
            # A duplicate, or redelivered after a broker restart or its consumer_timeout:
            # the worker that started it holds its lease; if that worker is gone, the lease
            # lapses and the leader records the attempt as worker_lost.
            log.info(
                "command for an attempt that already started: dropped",
                extra={**context, "redelivered": delivery.redelivered},
            )
        except DeadlinePassed:
            await self.outcomes.settle(
                self.ledger.expire_decision(task_id, attempt, detected_by="worker"), context
            )
        except (TransitionRefused, TaskNotFound) as refused:
            log.info("stale command dropped", extra={**context, "reason": str(refused)})
        return None

    async def _run(self, task: TaskState, slot: int | None) -> RunOutcome | None:
        executor = self.executors.get(task.language)
        if executor is None:
            return RunOutcome(
                "failed",
                error=AttemptError(
                    "unknown_language",
                    f"no executor for language {task.language!r} on worker {self.worker_id}",
                ),
                retryable=False,
            )
        if executor.needs_slot and slot is None:  # the language changed since the read
            raise RuntimeError(f"{task.language} needs a sandbox slot and none was taken")
        cancelled = asyncio.Event()
        key = str(task.id)
        self._running[key] = (cancelled, task.attempt)
        if slot is not None:
            self.busy += 1
        started = time.perf_counter()
        try:
            outcome = await executor.run(
                RunRequest(task.id, task.attempt, task.code, task.data, task.deadline, slot or 0),
                cancelled,
            )
            self.metrics.attempt_ran(task.language, outcome.kind, time.perf_counter() - started)
        finally:
            if slot is not None:
                self.busy -= 1
            self._running.pop(key, None)
        if outcome.kind == "cancelled" and self._shutting_down:
            return None
        return outcome
