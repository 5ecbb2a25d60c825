"""Prometheus metrics: the worker's, the dispatcher's and the reaper's on real tasks against
real PostgreSQL (in-process roles, memory broker), the API's through its /metrics, a
`taskledger worker --metrics-port` process over RabbitMQ, and what /readyz reports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from api.metrics import ApiMetrics
from ledger import Ledger, Status
from ledger.clock import ManualClock
from taskledger.bootstrap import bootstrap
from taskledger.settings import Settings
from tests import services
from tests.integration.conftest import Api
from tests.integration.test_workers import StandIn, projections, running, settled, submit
from tests.processes import free_port
from workers.broker import RunAttempt
from workers.dispatcher import Dispatcher
from workers.executors.base import RunOutcome, RunRequest
from workers.memory import MemoryBroker
from workers.metrics import WorkerMetrics
from workers.rabbitmq import RabbitMQBroker
from workers.reaper import Reaper
from workers.worker import Worker

pytestmark = [pytest.mark.postgres]

WORKER_NAMES = (
    "taskledger_tasks_completed_total",
    "taskledger_tasks_failed_total",
    "taskledger_attempts_failed_total",
    "taskledger_tasks_expired_total",
    "taskledger_attempt_duration_seconds",
    "taskledger_queue_wait_seconds",
    "taskledger_deadline_lateness_seconds",
    "taskledger_dispatcher_lag_seconds",
    "taskledger_dispatcher_commands_published_total",
    "taskledger_worker_busy_slots",
    "taskledger_worker_slots",
)
API_NAMES = (
    "taskledger_tasks_submitted_total",
    "taskledger_tasks_cancelled_total",
    "taskledger_projection_lag_events",
    "taskledger_projection_lag_seconds",
    "taskledger_http_requests_total",
    "taskledger_http_request_duration_seconds",
)


def value(metrics: WorkerMetrics | ApiMetrics, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (nothing was counted)."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def roles(
    ledger: Ledger, database_url: str, schema: str, executor: Any, metrics: WorkerMetrics
) -> tuple[MemoryBroker, Dispatcher, Worker]:
    broker = MemoryBroker()
    dispatcher = Dispatcher(
        database_url, schema, broker, ledger.clock, poll_interval=0.5, metrics=metrics
    )
    worker = Worker(
        ledger,
        broker,
        {"python": executor, "echo": executor},
        concurrency=3,
        worker_id="worker-m",
        grace_seconds=5.0,
        metrics=metrics,
    )
    return broker, dispatcher, worker


# -- the worker, the dispatcher, the reaper --------------------------------------------------------


@pytest.mark.asyncio
async def test_outcomes_are_counted_by_language_with_durations_and_queue_waits(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    metrics = WorkerMetrics()
    _, dispatcher, worker = roles(live_ledger, database_url, schema, StandIn(), metrics)
    async with running(dispatcher.run, worker.run):
        ok = [submit(live_ledger) for _ in range(3)]
        echo = submit(live_ledger, language="echo")
        failing = submit(live_ledger, "fail", max_attempts=2)
        permanent = submit(live_ledger, "compile-error")
        states = await settled(live_ledger, [*ok, echo, failing, permanent])
    assert [s.status for s in states] == [Status.COMPLETED] * 4 + [Status.FAILED] * 2

    assert value(metrics, "taskledger_tasks_completed_total", language="python") == 3
    assert value(metrics, "taskledger_tasks_completed_total", language="echo") == 1
    assert value(metrics, "taskledger_tasks_failed_total", language="python") == 2
    failed = "taskledger_attempts_failed_total"
    assert value(metrics, failed, language="python", kind="program_error") == 2  # one retried
    assert value(metrics, failed, language="python", kind="compile_error") == 1
    duration = "taskledger_attempt_duration_seconds_count"
    assert value(metrics, duration, language="python", outcome="completed") == 3
    assert value(metrics, duration, language="python", outcome="failed") == 3
    assert value(metrics, duration, language="echo", outcome="completed") == 1
    # Every attempt that started waited in the queue: 3 + 1 + 2 + 1.
    wait = "taskledger_queue_wait_seconds"
    assert value(metrics, f"{wait}_count", language="python") == 6
    assert value(metrics, f"{wait}_count", language="echo") == 1
    assert 0 < value(metrics, f"{wait}_sum", language="python") < 30
    # Seven commands, the retry's included (published when its backoff ended).
    assert value(metrics, "taskledger_dispatcher_commands_published_total") == 7
    assert value(metrics, "taskledger_dispatcher_lag_seconds_count") == 7
    assert value(metrics, "taskledger_dispatcher_lag_seconds_sum") < 7 * 5
    assert value(metrics, "taskledger_worker_slots", worker_id="worker-m") == 3
    assert value(metrics, "taskledger_worker_busy_slots", worker_id="worker-m") == 0


@pytest.mark.asyncio
async def test_busy_slots_follow_running_programs(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    metrics = WorkerMetrics()
    executor = StandIn()
    _, dispatcher, worker = roles(live_ledger, database_url, schema, executor, metrics)
    busy = {"worker_id": "worker-m"}
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, "hang", ttl_seconds=60)
        await asyncio.wait_for(executor.started.wait(), 30)
        assert value(metrics, "taskledger_worker_busy_slots", **busy) == 1
        await asyncio.to_thread(live_ledger.cancel, task_id, by="key", reason="enough")
        await settled(live_ledger, [task_id])
    assert value(metrics, "taskledger_worker_busy_slots", **busy) == 0
    duration = "taskledger_attempt_duration_seconds_count"
    assert value(metrics, duration, language="python", outcome="cancelled") == 1
    # The cancel was the API's transition, not the worker's: no outcome counted here.
    assert value(metrics, "taskledger_tasks_completed_total", language="python") == 0
    assert value(metrics, "taskledger_tasks_failed_total", language="python") == 0
    expired = "taskledger_tasks_expired_total"
    assert value(metrics, expired, language="python", detected_by="worker") == 0


@pytest.mark.asyncio
async def test_a_worker_s_expiry_is_counted_with_its_lateness(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    metrics = WorkerMetrics()
    _, dispatcher, worker = roles(live_ledger, database_url, schema, StandIn(), metrics)
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, "hang", ttl_seconds=1)
        (state,) = await settled(live_ledger, [task_id])
    assert state.status is Status.EXPIRED
    expired = "taskledger_tasks_expired_total"
    assert value(metrics, expired, language="python", detected_by="worker") == 1
    assert value(metrics, expired, language="python", detected_by="reaper") == 0
    lateness = "taskledger_deadline_lateness_seconds"
    assert value(metrics, f"{lateness}_count", detected_by="worker") == 1
    assert 0 <= value(metrics, f"{lateness}_sum", detected_by="worker") < 2
    duration = "taskledger_attempt_duration_seconds_count"
    assert value(metrics, duration, language="python", outcome="expired") == 1


@pytest.mark.asyncio
async def test_the_reaper_s_expiries_are_counted_with_their_lateness(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    metrics = WorkerMetrics()
    reaper = Reaper(
        database_url, schema, live_ledger, live_ledger.clock, poll_interval=0.5, metrics=metrics
    )
    with projections(database_url, schema):
        async with running(reaper.run):
            ids = [submit(live_ledger, ttl_seconds=0.5) for _ in range(4)]
            states = await settled(live_ledger, ids, timeout=30)
    assert {s.status for s in states} == {Status.EXPIRED}
    expired = "taskledger_tasks_expired_total"
    assert value(metrics, expired, language="python", detected_by="reaper") == 4
    lateness = "taskledger_deadline_lateness_seconds"
    assert value(metrics, f"{lateness}_count", detected_by="reaper") == 4
    # Each expired within a few seconds of its deadline (the reaper sleeps until it).
    assert value(metrics, f"{lateness}_sum", detected_by="reaper") < 4 * 3
    # The observations are real: the bucket at the top holds all, the lowest not all.
    assert value(metrics, f"{lateness}_bucket", detected_by="reaper", le="+Inf") == 4


class FinishesAnyway:
    """Runs until released, then reports completion whatever happened meanwhile."""

    language = "python"
    needs_slot = True

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        self.started.set()
        await self.release.wait()
        from ledger import AttemptResult

        return RunOutcome("completed", result=AttemptResult(stdout="late"))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.mark.asyncio
async def test_refused_outcomes_and_duplicate_commands_count_nothing(
    live_ledger: Ledger, database_url: str, schema: str
) -> None:
    metrics = WorkerMetrics()
    executor = FinishesAnyway()
    broker, dispatcher, worker = roles(live_ledger, database_url, schema, executor, metrics)
    async with running(dispatcher.run, worker.run):
        task_id = submit(live_ledger, ttl_seconds=60)
        await asyncio.wait_for(executor.started.wait(), 30)
        await broker.publish([RunAttempt(task_id, 1)])  # a duplicate: dropped, not started
        await asyncio.to_thread(live_ledger.cancel, task_id, by="key", reason="first")
        executor.release.set()  # its completion comes second: refused
        (state,) = await settled(live_ledger, [task_id])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while worker.busy or broker._unsettled or not broker._queue.empty():
            assert loop.time() < deadline, "the worker did not settle both commands"
            await asyncio.sleep(0.02)
    assert state.status is Status.CANCELLED
    assert value(metrics, "taskledger_tasks_completed_total", language="python") == 0
    assert value(metrics, "taskledger_queue_wait_seconds_count", language="python") == 1
    assert value(metrics, "taskledger_worker_busy_slots", worker_id="worker-m") == 0


# -- the API ---------------------------------------------------------------------------------

TASK = {"description": "d", "language": "python", "code": "print(1)", "ttl_seconds": 30}


@pytest_asyncio.fixture
async def metrics_text(api: Api) -> Any:
    async def scrape() -> str:
        response = await api.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    return scrape


@pytest.mark.asyncio
async def test_api_counts_submissions_and_cancels_once(api: Api, metrics_text: Any) -> None:
    headers = {**api.auth("acme-submit"), "Idempotency-Key": "once"}
    first = await api.client.post("/api/tasks", json=TASK, headers=headers)
    again = await api.client.post("/api/tasks", json=TASK, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    other = await api.client.post(
        "/api/tasks", json={**TASK, "language": "echo"}, headers=api.auth("acme-submit")
    )
    assert other.status_code == 201
    cancel = f"/api/tasks/{first.json()['id']}/cancel"
    assert (await api.client.post(cancel, headers=api.auth("acme-submit"))).status_code == 200
    assert (await api.client.post(cancel, headers=api.auth("acme-submit"))).status_code == 409
    metrics = api.context.metrics
    assert value(metrics, "taskledger_tasks_submitted_total", language="python") == 1
    assert value(metrics, "taskledger_tasks_submitted_total", language="echo") == 1
    assert value(metrics, "taskledger_tasks_cancelled_total", language="python") == 1
    text = await metrics_text()
    for name in API_NAMES:
        assert f"# TYPE {name} " in text, name
    assert 'taskledger_tasks_cancelled_total{language="python"} 1.0' in text


@pytest.mark.asyncio
async def test_projection_lag_is_read_at_every_scrape(
    api: Api, clock: ManualClock, metrics_text: Any
) -> None:
    await api.client.post("/api/tasks", json=TASK, headers=api.auth("acme-submit"))
    clock.advance(30)
    text = await metrics_text()
    assert 'taskledger_projection_lag_events{projection="task_status"} 2.0' in text
    assert 'taskledger_projection_lag_seconds{projection="task_status"} 30.0' in text
    await api.catch_up()
    text = await metrics_text()
    assert 'taskledger_projection_lag_events{projection="task_status"} 0.0' in text
    assert 'taskledger_projection_lag_seconds{projection="audit"} 0.0' in text


# -- readiness ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readiness_names_a_view_that_is_not_installed(api: Api) -> None:
    with psycopg.connect(api.context.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DELETE FROM {}.projection_current WHERE projection = 'audit'").format(
                sql.Identifier(api.context.schema)
            )
        )
    ready = await api.client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["projection:audit"].startswith("not installed")
    assert checks["projection:task_status"] == "ok"
    assert checks["database"] == "ok"


@pytest.mark.asyncio
async def test_readiness_reports_a_stalled_ledger(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's watch measures how long its oldest call has waited for the store
    (tests/integration/test_outages.py freezes a real server for that); /readyz says so
    and takes the api out of rotation, whatever the other checks say."""
    assert (await api.client.get("/readyz")).json()["checks"]["ledger"] == "ok"
    monkeypatch.setattr(api.context.ledger, "stalled_for", lambda: 4.2)
    ready = await api.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["ledger"] == (
        "stalled: a call has waited 4.2 s for the event store"
    )
    assert ready.json()["checks"]["database"] == "ok"


@pytest.mark.asyncio
async def test_readiness_bounds_a_probe_that_does_not_answer(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api import system

    async def hangs() -> str | None:
        await asyncio.Event().wait()
        return None

    async def fails() -> str | None:
        raise RuntimeError("broken probe")

    monkeypatch.setattr(system, "READY_PROBE_SECONDS", 0.1)
    api.context.readiness = {"broker": hangs, "other": fails}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["broker"] == "no answer within 0.1 s"
    assert checks["other"] == "check failed: broken probe"


# -- one registry per process: dev's /metrics shows every role ----------------------------------


@pytest.mark.asyncio
async def test_one_process_serves_api_dispatcher_reaper_and_worker_metrics(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=database_url, database_schema=schema, data_dir=tmp_path / "data"
    )
    with bootstrap(settings, broker=MemoryBroker(), executors={"python": StandIn()}) as services:
        services.singleton_roles()
        services.worker(concurrency=2, worker_id="dev-worker")
        app = services.api_app()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dev.test") as client:
            text = (await client.get("/metrics")).text
    for name in (
        *WORKER_NAMES,
        *API_NAMES,
        "process_cpu_seconds_total",
        "python_gc_objects_collected_total",
    ):
        assert f"# TYPE {name} " in text, name
    assert 'taskledger_worker_slots{worker_id="dev-worker"} 2.0' in text


# -- a worker process serves its own -------------------------------------------------------------


def scrape(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


@pytest.mark.rabbitmq
@pytest.mark.asyncio
async def test_a_worker_process_serves_its_metrics_on_its_port(
    live_ledger: Ledger, database_url: str, schema: str, tmp_path: Path
) -> None:
    problem = services.broker_problem()
    if problem:
        services.unavailable("RabbitMQ", problem)
    port = free_port()
    env = {
        **os.environ,
        "TASKLEDGER_DATABASE_URL": database_url,
        "TASKLEDGER_DATABASE_SCHEMA": schema,
        "TASKLEDGER_BROKER_URL": services.BROKER_URL,
        "TASKLEDGER_DATA_DIR": str(tmp_path / "data"),
        "TASKLEDGER_LOG_DIR": str(tmp_path / "logs"),
    }
    out = (tmp_path / "worker.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "taskledger", "worker", "--metrics-port", str(port)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    broker = RabbitMQBroker(services.BROKER_URL, namespace=f"taskledger.{schema}")
    dispatcher = Dispatcher(database_url, schema, broker, live_ledger.clock, poll_interval=0.5)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        first = await wait_for_text(url, lambda text: "taskledger_worker_slots{" in text, process)
        for name in WORKER_NAMES:
            assert f"# TYPE {name} " in first, name
        assert "process_resident_memory_bytes" in first
        async with running(dispatcher.run):
            task_id = submit(live_ledger, language="echo", code="")
            (state,) = await settled(live_ledger, [task_id])
        assert state.status is Status.COMPLETED, state
        done = 'taskledger_tasks_completed_total{language="echo"} 1.0'
        text = await wait_for_text(url, lambda text: done in text, process)
        assert 'taskledger_queue_wait_seconds_count{language="echo"} 1.0' in text
        assert "taskledger_worker_busy_slots{" in text
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert scrape(url) is None, "the metrics server stops with the worker"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        out.close()
        await broker.close()
        cleaner = RabbitMQBroker(services.BROKER_URL, namespace=f"taskledger.{schema}")
        try:
            await cleaner.delete_all()
        finally:
            await cleaner.close()


async def wait_for_text(
    url: str, condition: Any, process: subprocess.Popen[bytes], timeout: float = 60
) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the worker exited with {process.returncode}"
        last = await asyncio.to_thread(scrape, url)
        if last is not None and condition(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not show what was expected in {timeout} s: {last!r}")
