"""taskledger as production runs it: ``taskledger api`` (the API with the dispatcher, the
reaper and the projections beside it) and ``taskledger worker --concurrency N``, each a
process of its own, over PostgreSQL and RabbitMQ; every task goes through the HTTP API.

The database schema is ``bench_<random>``, which also names the RabbitMQ queues
(``taskledger.bench_<random>.*``): nothing of this run is shared with another deployment,
and the queues are deleted at the end. Timings the system recorded are read afterwards
from its views (``task_status``: started_at, finished_at, deadline; ``audit``: each
event's time and payload), once the projections have caught up with the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import orjson
import psycopg
from psycopg import sql

from bench._processes import ManagedProcess
from bench.api_requests import HttpRequest, RawConnection, free_port, venv_tool
from bench.cpu import BENCH_APPLICATION
from bench.lag_monitor import LagMonitor
from bench.systems import LOOP_CODE, Batch, Expiry, RoundTrip

HOST = "127.0.0.1"
TERMINAL = ("Completed", "Failed", "Expired", "Cancelled")
REQUEST_TIMEOUT = 60.0
NOOP_BODY = orjson.dumps({"language": "echo", "data": {"n": 1}})
POLL = 0.1  # seconds between progress polls (the recorded times are exact, not polled)
T = TypeVar("T")


class ApiError(RuntimeError):
    pass


def _json(raw: bytes) -> Any:
    return orjson.loads(raw) if raw else None


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class Taskledger:
    name = "taskledger"

    def __init__(
        self,
        database_url: str,
        broker_url: str,
        concurrency: int,
        connections: int,
        workdir: Path,
        progress: Callable[[str], None],
        views_process: bool = False,
    ) -> None:
        self.database_url = database_url
        self.views_process = views_process
        self.broker_url = broker_url
        self.concurrency = concurrency
        self.connections = connections
        self.workdir = workdir / "taskledger"
        self.progress = progress
        self.schema = f"bench_{secrets.token_hex(4)}"
        self.namespace = f"taskledger.{self.schema}"
        self.key = secrets.token_hex(16)
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLEDGER_")}
        self.env |= {
            "TASKLEDGER_DATABASE_URL": database_url,
            "TASKLEDGER_DATABASE_SCHEMA": self.schema,
            "TASKLEDGER_BROKER_URL": broker_url,
            "TASKLEDGER_API_KEYS": f"bench:admin:{self.key}",
            "TASKLEDGER_LOG_DIR": str(self.workdir / "logs"),
            "TASKLEDGER_DATA_DIR": str(self.workdir / "data"),
        }
        self.api: ManagedProcess | None = None
        self.views: ManagedProcess | None = None  # `projections run`, with views_process
        self.worker: ManagedProcess | None = None
        self._worker_runs = 0
        self._runner = asyncio.Runner()
        self.ready_seconds: dict[str, float] = {}

    # -- processes -----------------------------------------------------------------------

    def _tool(self) -> str:
        tool = venv_tool("taskledger")
        if tool is None:
            raise RuntimeError("taskledger is not installed in this environment (pip install -e .)")
        return tool

    def facts(self) -> dict[str, Any]:
        return {
            "processes": [
                f"taskledger api --port {self.port} --no-projections (API, dispatcher, reaper)",
                "taskledger projections run (the views)",
                f"taskledger worker --concurrency {self.concurrency}",
            ]
            if self.views_process
            else [
                f"taskledger api --port {self.port} (API, dispatcher, reaper, projections)",
                f"taskledger worker --concurrency {self.concurrency}",
            ],
            "worker_concurrency": self.concurrency,
            "http_connections": self.connections,
            "schema": self.schema,
            "queues": f"{self.namespace}.*",
            "ready_seconds": self.ready_seconds,
        }

    def processes(self) -> dict[str, int]:
        running = {"api": self.api, "projections": self.views, "worker": self.worker}
        return {role: p.pid for role, p in running.items() if p is not None and p.alive()}

    def start(self) -> None:
        self._start_api()
        self.start_worker()

    def _start_api(self) -> None:
        started = time.monotonic()
        command = [self._tool(), "api", "--host", HOST, "--port", str(self.port)]
        if self.views_process:
            # The views in a process of their own (readiness waits for them to install).
            if self.views is not None:
                self.views.stop()
            self.views = ManagedProcess(
                "projections", [self._tool(), "projections", "run"], self.env, self.workdir
            )
            self.views.start()
            command.append("--no-projections")
        self.api = ManagedProcess("api", command, self.env, self.workdir)
        self.api.start()
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            last = "no answer yet"
            while True:
                if not self.api.alive():
                    raise RuntimeError(
                        f"taskledger api exited with {self.api.returncode()}\n"
                        + self.api.output_tail()
                    )
                try:
                    response = client.get("/readyz")
                    if response.status_code == 200:
                        break
                    last = f"{response.status_code} {response.text[:300]}"
                except httpx.HTTPError as error:
                    last = f"{type(error).__name__}: {error}"
                if time.monotonic() - started > 60:
                    raise TimeoutError(
                        f"taskledger api not ready after 60 s (last /readyz: {last})\n"
                        + self.api.output_tail()
                    )
                time.sleep(0.1)
        self.ready_seconds["api"] = round(time.monotonic() - started, 2)
        self.progress(
            f"  taskledger api (pid {self.api.pid}) ready in {self.ready_seconds['api']} s"
        )

    def start_worker(self) -> None:
        """Start the worker; ready once an echo task made the round trip."""
        started = time.monotonic()
        self._worker_runs += 1
        command = [self._tool(), "worker", "--concurrency", str(self.concurrency)]
        self.worker = ManagedProcess(f"worker-{self._worker_runs}", command, self.env, self.workdir)
        self.worker.start()
        worker = self.worker
        body = orjson.dumps({"language": "echo", "data": "ready?", "ttl_seconds": 120})

        async def first_round_trip() -> None:
            async with self._connection() as conn:
                status, task = await self._call(conn, "POST", "/api/tasks", body)
                if status != 201:
                    raise ApiError(f"POST /api/tasks answered {status}: {task}")
                while task["status"] not in TERMINAL:
                    if not worker.alive():
                        raise RuntimeError(
                            f"taskledger worker exited with {worker.returncode()}\n"
                            + worker.output_tail()
                        )
                    if time.monotonic() - started > 120:
                        raise TimeoutError("taskledger worker: no round trip in 120 s")
                    _, task = await self._call(conn, "GET", f"/api/tasks/{task['id']}?wait=1")
                if task["status"] != "Completed":
                    raise RuntimeError(f"the first echo task ended {task['status']}: {task}")

        self._run(first_round_trip())
        self.ready_seconds[f"worker-{self._worker_runs}"] = round(time.monotonic() - started, 2)
        self.progress(
            f"  taskledger worker --concurrency {self.concurrency} (pid {worker.pid}) ready in"
            f" {time.monotonic() - started:.1f} s"
        )

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def ensure_running(self) -> list[str]:
        restarted = []
        views_dead = self.views_process and (self.views is None or not self.views.alive())
        if self.api is None or not self.api.alive() or views_dead:
            if self.api is not None:
                self.api.stop()
            self._start_api()
            restarted.append("api")
        if self.worker is None or not self.worker.alive():
            if self.worker is not None:
                self.worker.stop()
            self.start_worker()
            restarted.append("worker")
        return restarted

    def close(self) -> None:
        for process in (self.worker, self.api, self.views):
            if process is not None:
                stopped = process.stop()
                if stopped.how != "SIGTERM" or stopped.leftovers_killed:
                    self.progress(f"  taskledger {process.name}: stopped {stopped}")
        with contextlib.suppress(Exception):
            self._run(asyncio.wait_for(self._delete_queues(), 20))
        self._runner.close()

    async def _delete_queues(self) -> None:
        from workers.rabbitmq import RabbitMQBroker

        broker = RabbitMQBroker(self.broker_url, self.namespace)
        try:
            await broker.delete_all()
        finally:
            await broker.close()

    # -- HTTP ----------------------------------------------------------------------------

    def _run(self, coroutine: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coroutine

        return self._runner.run(wrapped())

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[RawConnection]:
        conn = RawConnection(HOST, self.port)
        try:
            yield conn
        finally:
            conn.drop()

    async def _call(
        self, conn: RawConnection, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, Any]:
        request = HttpRequest.build(method, path, key=self.key, body=body)
        status, raw = await asyncio.wait_for(conn.send(request), REQUEST_TIMEOUT)
        return status, _json(raw)

    async def _stats(self, conn: RawConnection) -> dict[str, Any]:
        status, stats = await self._call(conn, "GET", "/api/stats")
        if status != 200:
            raise ApiError(f"GET /api/stats answered {status}: {stats}")
        result: dict[str, Any] = stats
        return result

    async def _idle(self, timeout: float = 180.0) -> int:
        """Wait until no task is Pending or InProgress; the number of terminal tasks."""
        deadline = time.monotonic() + timeout
        async with self._connection() as conn:
            while True:
                counts = (await self._stats(conn))["counts"]
                if not counts.get("Pending") and not counts.get("InProgress"):
                    return sum(int(counts.get(s, 0)) for s in TERMINAL)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"taskledger not idle after {timeout:g} s: {counts}")
                await asyncio.sleep(POLL)

    async def _wait_ended(self, before: int, tasks: int, timeout: float) -> None:
        """Poll /api/stats until `tasks` more tasks than `before` are terminal."""
        deadline = time.monotonic() + timeout
        async with self._connection() as conn:
            while True:
                counts = (await self._stats(conn))["counts"]
                if sum(int(counts.get(s, 0)) for s in TERMINAL) - before >= tasks:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{tasks} tasks not all ended after {timeout:g} s: {counts}"
                        f" ({before} were terminal before)"
                    )
                await asyncio.sleep(POLL)

    async def _caught_up(self, timeout: float = 60.0) -> None:
        """Wait until both projections have applied the whole log."""
        deadline = time.monotonic() + timeout
        async with self._connection() as conn:
            while True:
                projections = (await self._stats(conn))["projections"]
                if all(int(p["lag_events"]) == 0 for p in projections.values()):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"projections still behind after {timeout:g} s")
                await asyncio.sleep(0.02)

    async def _submit_all(self, bodies: Sequence[bytes]) -> tuple[list[str], float, float, int]:
        """POST every body over `connections` keep-alive connections at once; (ids, wall
        time of the first send, seconds until the last answer, failures)."""
        ids: list[str | None] = [None] * len(bodies)
        failures = 0
        conns = [RawConnection(HOST, self.port) for _ in range(min(self.connections, len(bodies)))]
        health = HttpRequest.build("GET", "/healthz")
        try:
            await asyncio.gather(*(c.send(health) for c in conns))  # connected before timing
            order = iter(range(len(bodies)))

            async def lane(conn: RawConnection) -> None:
                nonlocal failures
                for i in order:
                    status, task = await self._call(conn, "POST", "/api/tasks", bodies[i])
                    if status == 201:
                        ids[i] = str(task["id"])
                    else:
                        failures += 1
                        if failures <= 3:
                            self.progress(f"  POST /api/tasks answered {status}: {task}")

            first = time.time()
            started = time.perf_counter()
            await asyncio.gather(*(lane(c) for c in conns))
            seconds = time.perf_counter() - started
        finally:
            for conn in conns:
                conn.drop()
        return [i for i in ids if i is not None], first, seconds, failures

    # -- database (views, after the projections caught up) --------------------------------

    @contextlib.contextmanager
    def _db(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        with psycopg.connect(
            self.database_url, autocommit=True, application_name=BENCH_APPLICATION
        ) as conn:
            yield conn

    def _view(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def _ended(self, ids: Sequence[str]) -> tuple[int, datetime | None]:
        """How many of `ids` completed, and the last finished_at among them."""
        with self._db() as conn:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*) FILTER (WHERE status = 'Completed'), max(finished_at)"
                    " FROM {} WHERE id = ANY(%s)"
                ).format(self._view("task_status")),
                ([UUID(i) for i in ids],),
            ).fetchone()
        assert row is not None
        return int(row[0]), row[1]

    def _run_times(self, ids: Sequence[str]) -> tuple[list[float], list[float]]:
        """Per task: the executor's duration_ms, and AttemptStarted .. AttemptCompleted."""
        with self._db() as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT task_id, type, at, (payload->'result'->>'duration_ms')::float8"
                    " FROM {} WHERE task_id = ANY(%s)"
                    " AND type IN ('AttemptStarted', 'AttemptCompleted')"
                ).format(self._view("audit")),
                ([UUID(i) for i in ids],),
            ).fetchall()
        started: dict[UUID, datetime] = {}
        completed: dict[UUID, datetime] = {}
        run_ms: list[float] = []
        for task_id, kind, at, duration in rows:
            if kind == "AttemptStarted":
                started[task_id] = at
            else:
                completed[task_id] = at
                if duration is not None:
                    run_ms.append(float(duration))
        worker_ms = [
            _ms((completed[t] - started[t]).total_seconds()) for t in completed if t in started
        ]
        return run_ms, worker_ms

    def _expiries(self, ids: Sequence[str]) -> list[Expiry]:
        with self._db() as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT s.status, s.deadline, a.at, a.payload->>'detected_by'"
                    " FROM {} s LEFT JOIN {} a ON a.task_id = s.id AND a.type = 'TaskExpired'"
                    " WHERE s.id = ANY(%s)"
                ).format(self._view("task_status"), self._view("audit")),
                ([UUID(i) for i in ids],),
            ).fetchall()
        return [
            Expiry(
                lateness_ms=None if at is None else _ms((at - deadline).total_seconds()),
                detected_by=str(by or "-"),
                status=str(status),
            )
            for status, deadline, at, by in rows
        ]

    # -- scenarios -----------------------------------------------------------------------

    def _batch(self, bodies: Sequence[bytes], timeout: float, per_task: bool) -> Batch:
        before = self._run(self._idle())
        ids, first, submit_s, failures = self._run(self._submit_all(bodies))
        self._run(self._wait_ended(before, len(ids), timeout))
        observed = time.time() - first
        self._run(self._caught_up())
        completed, last = self._ended(ids)
        total = (last.timestamp() - first) if last is not None else float("nan")
        batch = Batch(len(bodies), completed, submit_s, total, observed)
        if failures:
            batch.notes.append(f"{failures} submissions refused")
        if per_task:
            batch.run_ms, batch.worker_ms = self._run_times(ids)
        return batch

    def noop_batch(self, tasks: int) -> Batch:
        self._run(self._idle())
        return self._batch([NOOP_BODY] * tasks, timeout=60 + tasks / 20, per_task=False)

    def live_lag(self, tasks: int, batch: Batch) -> None:
        """The no-op load again, watched by the lag monitor (a process of its own that
        wakes on every commit: it costs CPU, so it is kept out of noop_batch's figures)."""
        self._run(self._idle())
        with LagMonitor(self.database_url, self.schema, self.workdir, self.env) as monitor:
            self._batch([NOOP_BODY] * tasks, timeout=60 + tasks / 20, per_task=False)
            time.sleep(0.2)  # a last snapshot after the projections' final commits
            lag = monitor.result()
        batch.lag_ms = lag.lags_ms
        batch.lag_resolution_ms = lag.resolution_ms
        for name, lost in lag.missing.items():
            if lost:
                batch.notes.append(f"lag monitor: {lost} heads never reached by {name}")

    def python_batch(self, tasks: int, code: str) -> Batch:
        body = orjson.dumps({"language": "python", "code": code, "ttl_seconds": 600})
        return self._batch([body] * tasks, timeout=60 + tasks / 5, per_task=True)

    async def _round_trips(self, bodies: Sequence[bytes]) -> list[RoundTrip]:
        trips = []
        async with self._connection() as conn:
            await conn.send(HttpRequest.build("GET", "/healthz"))
            for body in bodies:
                sent = time.time()
                started = time.perf_counter()
                status, task = await self._call(conn, "POST", "/api/tasks", body)
                if status != 201:
                    raise ApiError(f"POST /api/tasks answered {status}: {task}")
                while task["status"] not in TERMINAL:
                    status, task = await self._call(conn, "GET", f"/api/tasks/{task['id']}?wait=30")
                    if status != 200:
                        raise ApiError(f"GET /api/tasks/{{id}} answered {status}: {task}")
                rtt = _ms(time.perf_counter() - started)
                received = sent + rtt / 1000
                result = task.get("result") or {}
                created = _time(task.get("created_at"))
                begun, ended = _time(task.get("started_at")), _time(task.get("finished_at"))
                legs: dict[str, float] = {}
                if created is not None and begun is not None and ended is not None:
                    legs = {
                        "sent..TaskSubmitted": _ms(created.timestamp() - sent),
                        "TaskSubmitted..AttemptStarted": _ms((begun - created).total_seconds()),
                        "AttemptStarted..AttemptCompleted": _ms((ended - begun).total_seconds()),
                        "AttemptCompleted..received": _ms(received - ended.timestamp()),
                    }
                trips.append(
                    RoundTrip(
                        rtt_ms=rtt,
                        ok=task["status"] == "Completed",
                        run_ms=result.get("duration_ms"),
                        worker_ms=_ms((ended - begun).total_seconds())
                        if begun is not None and ended is not None
                        else None,
                        legs_ms=legs,
                    )
                )
        return trips

    def round_trips(self, count: int) -> list[RoundTrip]:
        self._run(self._idle())
        body = orjson.dumps({"language": "echo", "data": {"n": 1}})
        return self._run(self._round_trips([body] * count))

    def csharp_round_trips(self, sources: Sequence[str]) -> list[RoundTrip]:
        self._run(self._idle())
        bodies = [
            orjson.dumps({"language": "csharp", "code": source, "ttl_seconds": 120})
            for source in sources
        ]
        return self._run(self._round_trips(bodies))

    def expire_on_worker(self, tasks: int, ttl_seconds: float) -> list[Expiry]:
        """`concurrency` lanes, each submitting the next task once its last one ended."""
        self._run(self._idle())
        body = orjson.dumps(
            {"language": "python", "code": LOOP_CODE, "ttl_seconds": ttl_seconds, "max_attempts": 1}
        )
        ids: list[str] = []

        async def lanes() -> None:
            order = iter(range(tasks))

            async def lane() -> None:
                async with self._connection() as conn:
                    for _ in order:
                        status, task = await self._call(conn, "POST", "/api/tasks", body)
                        if status != 201:
                            raise ApiError(f"POST /api/tasks answered {status}: {task}")
                        ids.append(str(task["id"]))
                        while task["status"] not in TERMINAL:
                            path = f"/api/tasks/{task['id']}?wait={ttl_seconds + 10:g}"
                            _, task = await self._call(conn, "GET", path)

            await asyncio.gather(*(lane() for _ in range(min(self.concurrency, tasks))))

        self._run(lanes())
        self._run(self._caught_up())
        return self._expiries(ids)

    def expire_burst(self, tasks: int, ttl_seconds: float, *, workers: bool) -> list[Expiry]:
        """`tasks` submitted at once; with `workers` False the worker is stopped first (the
        reaper alone expires them) and started again afterwards."""
        self._run(self._idle())
        body = orjson.dumps(
            {"language": "python", "code": LOOP_CODE, "ttl_seconds": ttl_seconds, "max_attempts": 1}
        )
        if not workers:
            self.stop_worker()
        try:
            before = self._run(self._idle())
            ids, _, _, failures = self._run(self._submit_all([body] * tasks))
            if failures:
                raise ApiError(f"{failures} submissions refused")
            self._run(self._wait_ended(before, len(ids), timeout=60 + ttl_seconds + tasks))
            self._run(self._caught_up())
            return self._expiries(ids)
        finally:
            if not workers:
                self.start_worker()
