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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from importlib import metadata
from uuid import UUID

from ledger import AttemptError, Ledger, Status, TaskState
from ledger.application import Command
from ledger.batching import Batcher
from ledger.domain import Task
from ledger.errors import (
    AttemptAlreadyStarted,
    AttemptLeaseLost,
    DeadlinePassed,
    LedgerUnavailable,
    TaskNotFound,
    TransitionRefused,
)
from ledger.leases import WorkerInfo
from workers.broker import Broker, Delivery
from workers.executors.base import Executor, RunOutcome, RunRequest
from workers.metrics import WorkerMetrics
from workers.sandbox import SandboxError

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """`host-pid-random`: readable, and unique per process even where hosts share a name
    and pids repeat (containers on the host network were all `vm-6`; the id keys a
    worker's leases and heartbeat row, so two workers with one id would renew each
    other's leases)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class _Started:
    value = False


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
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.grace_seconds = grace_seconds
        # Five heartbeats to a lease: a late one or two lose nothing.
        lease = ledger.leases.lease_seconds if ledger.leases is not None else 10.0
        self.heartbeat_seconds = heartbeat_seconds or lease / 5
        self.started_at = datetime.now(UTC)
        self._host, self._version = socket.gethostname(), _version()  # for the heartbeats
        self.busy = 0
        self.handled = 0
        # task id -> its cancel event and attempt
        self._running: dict[str, tuple[asyncio.Event, int]] = {}
        # Attempts this worker started and has not settled: their leases are renewed.
        self._held: dict[tuple[UUID, int], str] = {}  # (task, attempt) -> language
        self._lease_lost: set[tuple[UUID, int]] = set()
        self._shutting_down = False
        self._slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(concurrency):
            self._slots.put_nowait(slot)
        # Commands held at once. More than the slots: a command waiting for a slot is not
        # started yet, and echo commands need none; with many in flight, their ledger
        # writes share transactions (group commit).
        self.prefetch = prefetch or max(32, concurrency * 4)
        self._batcher: Batcher[Command, TaskState] = Batcher(ledger.execute_many)
        self.metrics = metrics or WorkerMetrics()
        self.metrics.worker_started(self.worker_id, concurrency, lambda: self.busy)
        self.log_context = log_context

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
        cancels = asyncio.create_task(self._follow_cancels())
        heartbeat = asyncio.create_task(self._keep_leases())
        consumer = asyncio.create_task(self._consume(handlers))
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
            await self._beat(stopped=True)
        log.info("worker stopped", extra={"worker_id": self.worker_id, "handled": self.handled})

    async def _consume(self, handlers: set[asyncio.Task[None]]) -> None:
        """Take commands for as long as the worker runs: a broker out of reach at the
        start, or a consumer it ends, is retried every second (a worker started while
        RabbitMQ was down never consumed at all)."""
        while True:
            try:
                async for delivery in self.broker.consume(prefetch=self.prefetch):
                    task = asyncio.create_task(self._handle(delivery))
                    handlers.add(task)
                    task.add_done_callback(handlers.discard)
                log.warning("the broker ended this worker's consumer; consuming again")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a worker must outlive its broker
                log.warning(
                    "cannot take commands from the broker; retrying in 1 s. Running "
                    "attempts go on; check TASKLEDGER_BROKER_URL and RabbitMQ",
                    extra={"worker_id": self.worker_id, "error": str(error)},
                )
            await asyncio.sleep(1)

    async def _follow_cancels(self) -> None:
        while True:
            try:
                async for task_id in self.broker.cancels():
                    running = self._running.get(str(task_id))
                    if running is not None:
                        event, attempt = running
                        log.info(
                            "cancelling a running attempt",
                            extra={"task_id": str(task_id), "attempt": attempt},
                        )
                        event.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - keep listening whatever the broker did
                log.warning("cancel listener failed; retrying", extra={"error": str(error)})
                await asyncio.sleep(1)

    async def _ledger(self, command: Command) -> TaskState:
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
            started = _Started()
            task = await self._start(delivery, self._start_unless_slot(delivery, started), started)
            if task is not None and not started.value:
                # Started only once it can run; or, past its deadline while it waited for
                # a slot, the start is refused and the worker records the expiry.
                slot = await self._slot_or_deadline(task.deadline)
                task = await self._start(delivery, self._start_command(delivery))
            # Started (or not ours): the ledger owns the attempt now, not the broker.
            acked = True
            await self._let_go(delivery, "ack", context)
            if task is None:
                return
            held = (task.id, task.attempt)
            self._held[held] = task.language
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
                if held in self._lease_lost:
                    log.warning(
                        "lease lost while running: the run was killed, nothing is recorded "
                        "(the leader records the attempt as worker_lost)",
                        extra=context,
                    )
                else:
                    await self._record(task, outcome)
            finally:
                self._held.pop(held, None)
                self._lease_lost.discard(held)
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

    def _needs_slot(self, language: str) -> bool:
        executor = self.executors.get(language)
        return executor is not None and executor.needs_slot

    def _start_command(self, delivery: Delivery) -> Command:
        command = delivery.command
        return self.ledger.start_command(command.task_id, command.attempt, self.worker_id)

    def _start_unless_slot(self, delivery: Delivery, started: _Started) -> Command:
        """Read the task from the store; start it unless it must wait for a slot."""
        start = self._start_command(delivery).decide
        attempt = delivery.command.attempt

        def decide(task: Task) -> None:
            started.value = False  # a decision taken again (stale copy, lost race) resets
            runnable = (
                task.status is Status.PENDING
                and task.current.number == attempt
                and self.ledger.clock.now() < task.current.deadline
            )
            if runnable and self._needs_slot(task.language):
                return  # to be started once a slot is free
            # Not runnable (started elsewhere, cancelled, past its deadline, ...): refused,
            # or expired by us, at once, without waiting for a slot.
            start(task)
            started.value = True

        return Command(delivery.command.task_id, decide, fresh=True)

    async def _start(
        self, delivery: Delivery, start: Command, started: _Started | None = None
    ) -> TaskState | None:
        """The task once `start` ran, or None when the command is not ours to run.
        `start` appends AttemptStarted, or, with `started`, may (and says so there)."""
        command = delivery.command
        task_id, attempt = command.task_id, command.attempt
        context = {"task_id": str(task_id), "attempt": attempt}
        try:
            task = await self._ledger(start)
            if started is None or started.value:
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
            await self._settle(
                self.ledger.expire_command(task_id, attempt, detected_by="worker"), context
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

    async def _record(self, task: TaskState, outcome: RunOutcome) -> None:
        task_id, attempt = task.id, task.attempt
        context = {"task_id": str(task_id), "attempt": attempt, "outcome": outcome.kind}
        if outcome.kind == "completed":
            assert outcome.result is not None
            result = outcome.result
            await self._settle(self.ledger.complete_command(task_id, attempt, result), context)
        elif outcome.kind == "failed":
            assert outcome.error is not None
            error = outcome.error
            await self._settle(
                self.ledger.fail_command(task_id, attempt, error, retryable=outcome.retryable),
                context,
            )
        elif outcome.kind == "expired":
            await self._settle(
                self.ledger.expire_command(task_id, attempt, detected_by="worker"), context
            )
        # "cancelled": the TaskCancelled event is already there; nothing to add.
        log.info("attempt finished", extra=context)

    async def _settle(self, command: Command, context: dict[str, object]) -> None:
        """Record an outcome; if the rules refuse it, someone else recorded one first."""
        try:
            self.metrics.outcome_recorded(await self._ledger(command))
        except AttemptLeaseLost as lost:
            log.warning(
                "outcome not recorded: this worker no longer holds the attempt's lease",
                extra={**context, "reason": str(lost)},
            )
        except TransitionRefused as refused:
            log.info(
                "outcome not recorded: another came first",
                extra={**context, "reason": str(refused)},
            )

    # -- leases -----------------------------------------------------------------------------

    def _info(self) -> WorkerInfo:
        running = [
            {"task_id": str(task_id), "attempt": attempt, "language": language}
            for (task_id, attempt), language in self._held.items()
        ]
        return WorkerInfo(
            worker_id=self.worker_id,
            host=self._host,
            pid=os.getpid(),
            version=self._version,
            slots=self.concurrency,
            busy=self.busy,
            running=running,
            started_at=self.started_at,
        )

    async def _beat(self, *, stopped: bool = False) -> set[tuple[UUID, int]] | None:
        """One heartbeat: the leases still held, or None when the store did not answer."""
        leases = self.ledger.leases
        if leases is None:
            return set(self._held)
        info = self._info()
        try:
            when = datetime.now(UTC) if stopped else None
            return await asyncio.to_thread(leases.heartbeat, info, stopped=when)
        except Exception as error:  # noqa: BLE001 - the next beat tries again
            log.warning(
                "heartbeat failed: leases not renewed",
                extra={"worker_id": self.worker_id, "error": str(error)},
            )
            return None

    async def _keep_leases(self) -> None:
        """Renew the leases of the running attempts; kill the runs whose lease is lost,
        and every run once no renewal has got through for nearly a whole lease.

        A beat that gets no answer (a partition, a store that stopped answering) counts
        as a failed renewal after `heartbeat_seconds`, and no second beat is begun while
        it hangs: the check that fences the runs must not wait on the call it judges (it
        did, and a partitioned worker ran its programs on while the leader handed their
        attempts to another worker). Renewals count from when their beat began, and the
        runs are killed a heartbeat before the lease lapses by this clock, so they are
        gone by the time the leader can take the lease."""
        leases = self.ledger.leases
        if leases is None:
            return
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        fence_after = max(leases.lease_seconds - self.heartbeat_seconds, self.heartbeat_seconds)
        beat: asyncio.Task[set[tuple[UUID, int]] | None] | None = None
        began = renewed_at
        asked: set[tuple[UUID, int]] = set()
        try:
            while True:
                if beat is None:
                    # What this beat renews: an attempt started while it hangs is not in
                    # its answer, and must not be taken for lost when the answer comes.
                    asked = set(self._held)
                    beat, began = asyncio.create_task(self._beat()), loop.time()
                done, _ = await asyncio.wait({beat}, timeout=self.heartbeat_seconds)
                held = None
                if done:
                    held, beat = beat.result(), None
                if held is not None:
                    renewed_at = began
                    lost = asked - held
                elif loop.time() - renewed_at > fence_after:
                    lost = set(self._held)  # cut off from the store: the leader takes them
                else:
                    lost = set()
                for task_id, attempt in lost & set(self._held):
                    if (task_id, attempt) in self._lease_lost:
                        continue
                    self._lease_lost.add((task_id, attempt))
                    running = self._running.get(str(task_id))
                    log.warning(
                        "lease lost: killing the run",
                        extra={"task_id": str(task_id), "attempt": attempt},
                    )
                    if running is not None and running[1] == attempt:
                        running[0].set()
                if done:
                    await asyncio.sleep(self.heartbeat_seconds)
        finally:
            if beat is not None:
                beat.cancel()


def _version() -> str:
    try:
        return metadata.version("taskledger")
    except metadata.PackageNotFoundError:
        return "unknown"
