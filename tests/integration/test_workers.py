"""Dispatcher, workers and reaper against real PostgreSQL and RabbitMQ (in-process roles).

Programs are stood in for by small executors (the real ones have their own tests): the
subject here is delivery, outcomes, retries, lost workers, cancels and expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from ledger import AttemptError, AttemptResult, Ledger, Status
from projections import all_projections
from projections.runner import ProjectionRunner
from tests import services
from workers.broker import Broker, RunAttempt
from workers.dispatcher import Dispatcher
from workers.executors.base import RunOutcome, RunRequest
from workers.memory import MemoryBroker
from workers.rabbitmq import RabbitMQBroker
from workers.reaper import Reaper
from workers.worker import Worker

pytestmark = [pytest.mark.postgres, pytest.mark.asyncio]


class StandIn:
    """An executor whose behaviour the test picks by the task's code."""

    language = "python"
    needs_slot = True

    def __init__(self) -> None:
        self.runs: list[tuple[uuid.UUID, int, str]] = []  # (task, attempt, worker slot)
        self.started = asyncio.Event()

    async def run(self, request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        self.runs.append((request.task_id, request.attempt, str(request.slot)))
        self.started.set()
        if request.code == "fail":
            return RunOutcome(
                "failed", error=AttemptError("program_error", "boom", exit_code=1), retryable=True
            )
        if request.code == "compile-error":
            return RunOutcome(
                "failed", error=AttemptError("compile_error", "CS1002"), retryable=False
            )
        if request.code == "hang":
            timeout = (request.deadline - datetime.now(UTC)).total_seconds()
            try:
                await asyncio.wait_for(cancelled.wait(), max(0.0, timeout))
            except TimeoutError:
                return RunOutcome("expired")
            return RunOutcome("cancelled")
        return RunOutcome("completed", result=AttemptResult(stdout=str(request.data)))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest_asyncio.fixture
async def rabbitmq(schema: str) -> AsyncIterator[Callable[[], RabbitMQBroker]]:
    problem = services.broker_problem()
    if problem:
        services.unavailable("RabbitMQ", problem)
    made: list[RabbitMQBroker] = []

    def make() -> RabbitMQBroker:
        broker = RabbitMQBroker(services.BROKER_URL, namespace=f"test.{schema}")
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()
    if made:  # a closed broker does not reconnect: the queues go with a client of their own
        cleaner = RabbitMQBroker(services.BROKER_URL, namespace=f"test.{schema}")
        try:
            await cleaner.delete_all()
        finally:
            await cleaner.close()


@contextlib.asynccontextmanager
async def running(
    *roles: Callable[[asyncio.Event], Awaitable[None]],
) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(role(stop)) for role in roles]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


@contextlib.contextmanager
def projections(database_url: str, schema: str) -> Any:
    runners = [
        ProjectionRunner(database_url, schema, p, poll_interval=0.2, standby_interval=0.1)
        for p in all_projections().values()
    ]
    for runner in runners:
        runner.start()
    try:
        yield runners
    finally:
        for runner in runners:
            runner.stop()


async def settled(ledger: Ledger, ids: list[uuid.UUID], timeout: float = 60) -> list[Any]:
    """Wait until every task is terminal (polling the ledger: the state under test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        states = [await asyncio.to_thread(ledger.get, i) for i in ids]
        if all(s.status.is_terminal for s in states):
            return states
        if loop.time() > deadline:
            raise AssertionError(
                f"not terminal after {timeout} s: {[str(s.status) for s in states]}"
            )
        await asyncio.sleep(0.05)


def submit(ledger: Ledger, code: str = "ok", **fields: Any) -> uuid.UUID:
    values: dict[str, Any] = {
        "description": code,
        "language": "python",
        "code": code,
        "data": {"n": 1},
        "ttl_seconds": 30,
        "max_attempts": 3,
        "tenant": "acme",
        "submitted_by": "key",
    }
    values.update(fields)
    return ledger.submit(**values).task.id


def roles(
    ledger: Ledger, database_url: str, schema: str, broker: Broker, executor: StandIn, **worker: Any
) -> tuple[Dispatcher, Worker]:
    dispatcher = Dispatcher(database_url, schema, broker, ledger.clock, poll_interval=0.5)
    options = {"concurrency": 4, "worker_id": "worker-a", "grace_seconds": 5.0, **worker}
    return dispatcher, Worker(ledger, broker, {"python": executor}, **options)


async def test_submitted_tasks_are_dispatched_run_and_completed(
    live_ledger: Ledger, database_url: str, schema: str, rabbitmq: Callable[[], RabbitMQBroker]
) -> None:
    executor = StandIn()
    dispatcher, worker = roles(live_ledger, database_url, schema, rabbitmq(), executor)
    async with running(dispatcher.run, worker.run):
        ids = [submit(live_ledger, data={"n": n}) for n in range(25)]
        states = await settled(live_ledger, ids)
    assert {s.status for s in states} == {Status.COMPLETED}
    assert sorted(s.result["stdout"] for s in states) == sorted(str({"n": n}) for n in range(25))
    assert all(s.worker_id == "worker-a" for s in states)
    assert len(executor.runs) == 25, "each task ran exactly once"


async def test_a_failing_task_runs_max_attempts_times_with_growing_delays(
    live_ledger: Ledger, database_url: str, schema: str, rabbitmq: Callable[[], RabbitMQBroker]
) -> None:
    executor = StandIn()
    dispatcher, worker = roles(live_ledger, database_url, schema, rabbitmq(), executor)
    async with running(dispatcher.run, worker.run):
        failing = submit(live_ledger, "fail", max_attempts=4)
        permanent = submit(live_ledger, "compile-error", max_attempts=4)
        states = await settled(live_ledger, [failing, permanent])
    assert [s.status for s in states] == [Status.FAILED, Status.FAILED]
    assert [run[1] for run in executor.runs if run[0] == failing] == [1, 2, 3, 4]
    assert [run[1] for run in executor.runs if run[0] == permanent] == [1]
    history = await asyncio.to_thread(live_ledger.history, failing)
    scheduled = [h for h in history if h.type == "AttemptScheduled"]
    failed_at = [h.at for h in history if h.type == "AttemptFailed"]
    delays = [
        (s.data["not_before"] - f).total_seconds()
        for s, f in zip(scheduled[1:], failed_at, strict=False)
    ]
    assert len(delays) == 3
    assert delays == sorted(delays), f"backoff delays must grow: {delays}"
    assert all(s.data["deadline"] == scheduled[0].data["deadline"] for s in scheduled)


async def test_a_lost_worker_s_attempt_fails_as_worker_lost_and_is_retried(
    live_ledger: Ledger, database_url: str, schema: str, rabbitmq: Callable[[], RabbitMQBroker]
) -> None:
    doomed_broker = rabbitmq()
    doomed = StandIn()
    _, doomed_worker = roles(
        live_ledger, database_url, schema, doomed_broker, doomed, worker_id="worker-doomed"
    )
    # The dispatcher is not part of the lost worker: it has a connection of its own.
    dispatcher = Dispatcher(database_url, schema, rabbitmq(), live_ledger.clock, poll_interval=0.5)
    task_id = submit(live_ledger, "hang-then-ok")
    stop_dispatcher = asyncio.Event()
    dispatching = asyncio.create_task(dispatcher.run(stop_dispatcher))
    # The doomed worker starts the attempt and hangs in "hang" until its channel dies.
    doomed.run = _hang_forever(doomed)  # type: ignore[method-assign]
    doomed_stop = asyncio.Event()
    doomed_task = asyncio.create_task(doomed_worker.run(doomed_stop))
    await asyncio.wait_for(doomed.started.wait(), 30)
    doomed_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await doomed_task
    await doomed_broker.close()  # its channel closes with the message unacknowledged

    # Its command was acknowledged when the attempt started: nothing comes back from the
    # broker. Its lease lapses (nobody renews it) and the leader records the loss.
    rescuer = StandIn()
    _, worker = roles(live_ledger, database_url, schema, rabbitmq(), rescuer, worker_id="worker-b")
    reaper = Reaper(database_url, schema, live_ledger, live_ledger.clock, poll_interval=0.2)
    async with running(worker.run, reaper.run):
        (state,) = await settled(live_ledger, [task_id])
    stop_dispatcher.set()
    await dispatching
    assert state.status is Status.COMPLETED
    assert state.worker_id == "worker-b"
    history = await asyncio.to_thread(live_ledger.history, task_id)
    lost = [h for h in history if h.type == "AttemptFailed"]
    assert len(lost) == 1
    assert lost[0].data["error"]["kind"] == "worker_lost"
    assert "worker-doomed stopped renewing its lease" in lost[0].data["error"]["message"]
    assert reaper.lost == 1
    assert [h.data["worker_id"] for h in history if h.type == "AttemptStarted"] == [
        "worker-doomed",
        "worker-b",
    ]


def _hang_forever(
    executor: StandIn,
) -> Callable[[RunRequest, asyncio.Event], Awaitable[RunOutcome]]:
    async def run(request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        executor.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return run


async def test_cancel_reaches_the_running_program(
    live_ledger: Ledger, database_url: str, schema: str, rabbitmq: Callable[[], RabbitMQBroker]
) -> None:
    executor = StandIn()
    dispatcher, worker = roles(live_ledger, database_url, schema, rabbitmq(), executor)
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, "hang", ttl_seconds=60)
        await asyncio.wait_for(executor.started.wait(), 30)
        await asyncio.to_thread(live_ledger.cancel, task_id, by="key", reason="stop it")
        loop = asyncio.get_running_loop()
        started = loop.time()
        while worker.busy:  # the cancel broadcast must end the run well before the ttl
            assert loop.time() - started < 20, "the running program was not cancelled"
            await asyncio.sleep(0.02)
    state = await asyncio.to_thread(live_ledger.get, task_id)
    assert state.status is Status.CANCELLED


async def test_a_worker_expires_what_outlives_its_deadline(
    live_ledger: Ledger, database_url: str, schema: str, rabbitmq: Callable[[], RabbitMQBroker]
) -> None:
    executor = StandIn()
    dispatcher, worker = roles(live_ledger, database_url, schema, rabbitmq(), executor)
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, "hang", ttl_seconds=1)
        (state,) = await settled(live_ledger, [task_id])
    assert state.status is Status.EXPIRED
    history = await asyncio.to_thread(live_ledger.history, task_id)
    assert [h.data["detected_by"] for h in history if h.type == "TaskExpired"] == ["worker"]


async def test_a_held_command_past_its_deadline_expires_without_waiting_for_a_slot(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    """One slot, busy with a long program; the worker also holds a second command whose
    deadline passes meanwhile: it records the expiry at once, not when the slot frees."""
    executor = StandIn()
    dispatcher, worker = roles(
        live_ledger, database_url, schema, MemoryBroker(), executor, concurrency=1
    )
    async with running(dispatcher.run, worker.run):
        busy = submit(live_ledger, "hang", ttl_seconds=60)
        await asyncio.wait_for(executor.started.wait(), 30)
        short = submit(live_ledger, ttl_seconds=0.5)
        (state,) = await settled(live_ledger, [short], timeout=20)
        assert (await asyncio.to_thread(live_ledger.get, busy)).status is Status.IN_PROGRESS
        await asyncio.to_thread(live_ledger.cancel, busy, by="test")
    assert state.status is Status.EXPIRED
    history = await asyncio.to_thread(live_ledger.history, short)
    assert [h.data["detected_by"] for h in history if h.type == "TaskExpired"] == ["worker"]
    assert [run[0] for run in executor.runs] == [busy]


async def test_with_no_worker_the_reaper_expires_queued_tasks(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    # More tasks due together than one look takes (batch_size): it looks again at once.
    reaper = Reaper(
        database_url, schema, live_ledger, live_ledger.clock, poll_interval=0.5, batch_size=16
    )
    with projections(database_url, schema):
        async with running(reaper.run):
            ids = [submit(live_ledger, ttl_seconds=0.5) for _ in range(40)]
            states = await settled(live_ledger, ids, timeout=30)
    assert {s.status for s in states} == {Status.EXPIRED}
    assert reaper.expired == 40
    for task_id in ids:
        history = await asyncio.to_thread(live_ledger.history, task_id)
        assert [h.data["detected_by"] for h in history if h.type == "TaskExpired"] == ["reaper"]


async def test_shutdown_records_running_attempts_lost_and_they_are_retried(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    broker = MemoryBroker()
    executor = StandIn()
    dispatcher, worker = roles(
        live_ledger, database_url, schema, broker, executor, grace_seconds=0.2
    )
    async with running(dispatcher.run) as _:
        stop = asyncio.Event()
        working = asyncio.create_task(worker.run(stop))
        task_id = submit(live_ledger, "hang", ttl_seconds=60)
        await asyncio.wait_for(executor.started.wait(), 30)
        stop.set()
        await asyncio.wait_for(working, 30)
    state = await asyncio.to_thread(live_ledger.get, task_id)
    assert state.status is Status.PENDING  # attempt 2, scheduled by the retry rule
    assert state.attempt == 2
    history = await asyncio.to_thread(live_ledger.history, task_id)
    (failed,) = [h for h in history if h.type == "AttemptFailed"]
    assert failed.data["error"]["kind"] == "worker_lost"
    assert "stopped (SIGTERM)" in failed.data["error"]["message"]


async def test_the_command_is_acknowledged_once_the_attempt_starts(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    """The ledger owns a started attempt, not the broker: a run longer than RabbitMQ's
    consumer_timeout (or a broker restart) cannot bring the command back."""
    broker = MemoryBroker()
    executor = StandIn()
    dispatcher, worker = roles(live_ledger, database_url, schema, broker, executor)
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, "hang", ttl_seconds=60)
        await asyncio.wait_for(executor.started.wait(), 30)
        assert not broker._unsettled, "the delivery is settled while the program runs"
        await asyncio.to_thread(live_ledger.cancel, task_id, by="test")


async def test_a_redelivered_command_for_a_started_attempt_is_dropped(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    """After a broker restart the same command may come again, to the same worker or
    another: it marks nothing lost (it used to record worker_lost over a healthy run)."""
    broker = MemoryBroker()
    executor = StandIn()
    release = asyncio.Event()

    async def hang_until_released(request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        executor.runs.append((request.task_id, request.attempt, str(request.slot)))
        executor.started.set()
        await release.wait()
        return RunOutcome("completed", result=AttemptResult(stdout="done"))

    executor.run = hang_until_released  # type: ignore[method-assign]
    dispatcher, worker = roles(live_ledger, database_url, schema, broker, executor)
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, "hang", ttl_seconds=60)
        await asyncio.wait_for(executor.started.wait(), 30)
        broker._queue.put_nowait((RunAttempt(task_id, 1), True))  # redelivered
        while broker._queue.qsize() or broker._unsettled:  # taken, and dropped
            await asyncio.sleep(0.01)
        release.set()
        (state,) = await settled(live_ledger, [task_id])
    assert state.status is Status.COMPLETED
    history = await asyncio.to_thread(live_ledger.history, task_id)
    assert [h.type for h in history].count("AttemptFailed") == 0
    assert len(executor.runs) == 1


async def test_a_worker_that_loses_its_lease_kills_the_run_and_records_nothing(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    broker = MemoryBroker()
    executor = StandIn()
    dispatcher, worker = roles(
        live_ledger, database_url, schema, broker, executor, heartbeat_seconds=0.1
    )
    reaper = Reaper(database_url, schema, live_ledger, live_ledger.clock, poll_interval=0.2)
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, "hang", ttl_seconds=60, max_attempts=1)
        await asyncio.wait_for(executor.started.wait(), 30)
        # The leader takes the lease (as if this worker had been cut off meanwhile).
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET state = 'lost' WHERE task_id = %s").format(
                    sql.Identifier(schema, "attempt_leases")
                ),
                (task_id,),
            )
        while worker.busy:  # the next heartbeat learns it and kills the run
            await asyncio.sleep(0.02)
        assert (await asyncio.to_thread(live_ledger.get, task_id)).status is Status.IN_PROGRESS
        async with running(reaper.run):
            (state,) = await settled(live_ledger, [task_id])
    assert state.status is Status.FAILED
    history = await asyncio.to_thread(live_ledger.history, task_id)
    (failed,) = [h for h in history if h.type == "AttemptFailed"]
    assert failed.data["error"]["kind"] == "worker_lost"
    assert [h.type for h in history].count("AttemptCompleted") == 0
