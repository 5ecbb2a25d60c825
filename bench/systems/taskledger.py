"""taskledger as production runs it: ``taskledger api`` (with the dispatcher, the reaper
and the views) and ``taskledger worker --concurrency N``, every task through the HTTP API
(bench/http.py). Its schema ``bench_<random>`` also names its RabbitMQ queues. Recorded
times are read from the views once the projections have caught up with the log."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql

from bench.cpu import BENCH_APPLICATION
from bench.http import RawConnection, request
from bench.lag_monitor import LagMonitor
from bench.processes import HOST, ManagedProcess, free_port, taskledger_env, tool, wait_ready
from bench.report import ms
from bench.services import delete_queues
from bench.systems import LOOP_CODE, Batch, Expiry, RoundTrip

TERMINAL = ("Completed", "Failed", "Expired", "Cancelled")
NOOP = {"language": "echo", "data": {"n": 1}}
POLL = 0.1  # seconds between progress polls (the recorded times are exact, not polled)
T = TypeVar("T")


class ApiError(RuntimeError):
    pass


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _lags(stats: dict[str, Any]) -> list[int]:
    return [int(p["lag_events"]) for p in stats["projections"].values()]


def python_task(code: str) -> dict[str, Any]:
    """The body of a python task running `code` (the python scenario's, the soak's)."""
    return {"language": "python", "code": code, "ttl_seconds": 600}


def _loop(ttl_seconds: float) -> dict[str, Any]:
    return {"language": "python", "code": LOOP_CODE, "ttl_seconds": ttl_seconds, "max_attempts": 1}


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
        self.broker_url = broker_url
        self.concurrency = concurrency
        self.connections = connections
        self.views_process = views_process
        self.workdir = workdir / "taskledger"
        self.progress = progress
        self.schema = f"bench_{secrets.token_hex(4)}"
        self.key = secrets.token_hex(16)
        self.port = free_port()
        self.env = taskledger_env(
            database_url, broker_url, self.key, self.workdir, DATABASE_SCHEMA=self.schema
        )
        self.roles: dict[str, ManagedProcess] = {}  # api, projections, worker
        self._runner = asyncio.Runner()
        self.ready_seconds: dict[str, float] = {}

    def facts(self) -> dict[str, Any]:
        return {
            "processes": {role: " ".join(p.command[1:]) for role, p in self.roles.items()},
            "http_connections": self.connections,
            "schema": self.schema,
            "ready_seconds": self.ready_seconds,
        }

    # -- processes -----------------------------------------------------------------------

    def processes(self) -> dict[str, int]:
        return {role: p.pid for role, p in self.roles.items() if p.alive()}

    def _role(self, role: str, *args: str) -> ManagedProcess:
        if role in self.roles:
            self.roles[role].stop()
        process = ManagedProcess(role, [tool("taskledger"), *args], self.env, self.workdir)
        self.roles[role] = process.start()
        return process

    def start(self) -> None:
        self._start_api()
        self.start_worker()

    def _start_api(self) -> None:
        command = ["api", "--host", HOST, "--port", str(self.port)]
        if self.views_process:  # the views in a process of their own
            self._role("projections", "projections", "run")
            command.append("--no-projections")
        api = self._role("api", *command)
        self.ready_seconds["api"] = round(wait_ready(api, f"http://{HOST}:{self.port}", 60), 2)
        self.progress(f"  taskledger api (pid {api.pid}) ready in {self.ready_seconds['api']} s")

    def start_worker(self) -> None:
        """Start the worker; ready once an echo task made the round trip."""
        started = time.monotonic()
        worker = self._role("worker", "worker", "--concurrency", str(self.concurrency))
        trip = self._run(
            self._round_trips([{"language": "echo", "data": "ready?", "ttl_seconds": 120}], worker)
        )
        if not trip[0].ok:
            raise RuntimeError("the first echo task did not complete")
        self.ready_seconds["worker"] = round(time.monotonic() - started, 2)
        self.progress(
            f"  taskledger worker (pid {worker.pid}) ready in {self.ready_seconds['worker']} s"
        )

    def ensure_running(self) -> list[str]:
        dead = [role for role, p in self.roles.items() if not p.alive()]
        if "api" in dead or "projections" in dead:
            self._start_api()
        if "worker" in dead:
            self.start_worker()
        return dead

    def close(self) -> None:
        for process in reversed(self.roles.values()):
            stopped = process.stop()
            if stopped.how != "SIGTERM" or stopped.leftovers_killed:
                self.progress(f"  taskledger {process.name}: stopped {stopped}")
        with contextlib.suppress(Exception):
            namespace = f"taskledger.{self.schema}"
            self._run(asyncio.wait_for(delete_queues(self.broker_url, namespace), 20))
        self._runner.close()

    # -- HTTP ----------------------------------------------------------------------------

    def _run(self, coroutine: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coroutine

        return self._runner.run(wrapped())

    async def _call(self, conn: RawConnection, method: str, path: str, body: Any = None) -> Any:
        status, answer = await conn.call(method, path, self.key, body)
        if status not in (200, 201):
            raise ApiError(f"{method} {path} answered {status}: {answer}")
        return answer

    async def _until(self, done: Callable[[dict[str, Any]], bool], timeout: float) -> Any:
        """Poll /api/stats until `done(stats)`; those stats."""
        deadline = time.monotonic() + timeout
        conn = RawConnection(self.port)
        try:
            while not done(stats := await self._call(conn, "GET", "/api/stats")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"taskledger: still {stats} after {timeout:g} s")
                await asyncio.sleep(POLL)
            return stats
        finally:
            conn.drop()

    def _ended(self, stats: dict[str, Any]) -> int:
        return sum(int(stats["counts"].get(s, 0)) for s in TERMINAL)

    def _idle(self) -> int:
        """Wait until no task is Pending or InProgress; the number of terminal tasks."""
        busy = ("Pending", "InProgress")
        stats = self._run(self._until(lambda s: not any(s["counts"].get(b) for b in busy), 180))
        return self._ended(stats)

    def _caught_up(self) -> None:
        """Wait until both projections have applied the whole log."""
        self._run(self._until(lambda s: not any(_lags(s)), 60))

    def settled_counts(self) -> dict[str, int]:
        """Once no task is Pending or InProgress and the views have applied the whole
        log: the number of tasks in each status."""
        self._idle()
        self._caught_up()
        stats = self._run(self._until(lambda s: True, 10))
        return {str(k): int(v) for k, v in stats["counts"].items()}

    async def _submit_all(self, bodies: Sequence[Any]) -> tuple[list[str], float, float, int]:
        """POST every body over `connections` keep-alive connections at once; (ids, wall
        time of the first send, seconds until the last answer, refusals)."""
        ids: list[str | None] = [None] * len(bodies)
        refused = 0
        conns = [RawConnection(self.port) for _ in range(min(self.connections, len(bodies)))]
        try:
            await asyncio.gather(*(c.send(request("GET", "/healthz")) for c in conns))  # connected
            order = iter(range(len(bodies)))

            async def lane(conn: RawConnection) -> None:
                nonlocal refused
                for i in order:
                    status, task = await conn.call("POST", "/api/tasks", self.key, bodies[i])
                    if status == 201:
                        ids[i] = str(task["id"])
                    else:
                        refused += 1

            first, started = time.time(), time.perf_counter()
            await asyncio.gather(*(lane(c) for c in conns))
            seconds = time.perf_counter() - started
        finally:
            for conn in conns:
                conn.drop()
        return [i for i in ids if i is not None], first, seconds, refused

    async def _round_trips(
        self, bodies: Sequence[Any], worker: ManagedProcess | None = None
    ) -> list[RoundTrip]:
        """Submit each body and long-poll it until it ends, one at a time."""
        conn = RawConnection(self.port)
        try:
            return [await self.round_trip(conn, body, worker) for body in bodies]
        finally:
            conn.drop()

    async def round_trip(
        self, conn: RawConnection, body: Any, worker: ManagedProcess | None = None
    ) -> RoundTrip:
        """Submit `body` on `conn` and long-poll the task (``?wait=``) until it ends."""
        sent, started = time.time(), time.perf_counter()
        task = await self._call(conn, "POST", "/api/tasks", body)
        while task["status"] not in TERMINAL:
            if worker is not None and not worker.alive():
                raise RuntimeError("taskledger worker exited\n" + worker.output_tail())
            wait = min(60, body.get("ttl_seconds", 20) + 10)
            task = await self._call(conn, "GET", f"/api/tasks/{task['id']}?wait={wait:g}")
        rtt = time.perf_counter() - started
        created = _time(task.get("created_at"))
        begun, ended = _time(task.get("started_at")), _time(task.get("finished_at"))
        trip = RoundTrip(ms(rtt), task["status"] == "Completed", task_id=task["id"])
        trip.run_ms = (task.get("result") or {}).get("duration_ms")
        if created is not None and begun is not None and ended is not None:
            trip.worker_ms = ms((ended - begun).total_seconds())
            trip.legs_ms = {
                "sent..TaskSubmitted": ms(created.timestamp() - sent),
                "TaskSubmitted..AttemptStarted": ms((begun - created).total_seconds()),
                "AttemptStarted..AttemptCompleted": trip.worker_ms,
                "AttemptCompleted..received": ms(sent + rtt - ended.timestamp()),
            }
        return trip

    # -- the views, after the projections caught up ---------------------------------------

    def _query(self, query: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        views = {v: sql.Identifier(self.schema, v) for v in ("task_status", "audit")}
        with psycopg.connect(
            self.database_url, autocommit=True, application_name=BENCH_APPLICATION
        ) as conn:
            return conn.execute(
                sql.SQL(query).format(**views), ([UUID(i) for i in ids],)
            ).fetchall()

    def _batch(self, bodies: Sequence[Any], timeout: float, per_task: bool = False) -> Batch:
        before = self._idle()
        ids, first, submit_s, refused = self._run(self._submit_all(bodies))
        self._run(self._until(lambda s: self._ended(s) - before >= len(ids), timeout))
        self._caught_up()
        ((completed, last),) = self._query(
            "SELECT count(*) FILTER (WHERE status = 'Completed'), max(finished_at)"
            " FROM {task_status} WHERE id = ANY(%s)",
            ids,
        )
        total = last.timestamp() - first if last is not None else float("nan")
        batch = Batch(len(bodies), int(completed), submit_s, total)
        if refused:
            batch.notes.append(f"{refused} submissions refused")
        if per_task:
            started: dict[UUID, datetime] = {}
            for task_id, kind, at, duration in self._query(
                "SELECT task_id, type, at, (payload->'result'->>'duration_ms')::float8"
                " FROM {audit} WHERE task_id = ANY(%s)"
                " AND type IN ('AttemptStarted', 'AttemptCompleted') ORDER BY position",
                ids,
            ):
                if kind == "AttemptStarted":
                    started[task_id] = at
                elif task_id in started:
                    batch.worker_ms.append(ms((at - started[task_id]).total_seconds()))
                    if duration is not None:
                        batch.run_ms.append(float(duration))
        return batch

    def _expiries(self, ids: Sequence[str]) -> list[Expiry]:
        self._caught_up()
        rows = self._query(
            "SELECT s.status, s.deadline, a.at"
            " FROM {task_status} s LEFT JOIN {audit} a"
            " ON a.task_id = s.id AND a.type = 'TaskExpired' WHERE s.id = ANY(%s)",
            ids,
        )
        return [
            Expiry(None if at is None else ms((at - deadline).total_seconds()), status)
            for status, deadline, at in rows
        ]

    # -- scenarios -----------------------------------------------------------------------

    def noop_batch(self, tasks: int) -> Batch:
        return self._batch([NOOP] * tasks, timeout=60 + tasks / 20)

    def live_lag(self, tasks: int, batch: Batch) -> None:
        """The no-op load again, watched by the lag monitor (a process of its own that
        wakes on every commit: it costs CPU, so it is kept out of noop_batch's figures)."""
        self._idle()
        with LagMonitor(self.database_url, self.schema, self.workdir, self.env) as monitor:
            self._batch([NOOP] * tasks, timeout=60 + tasks / 20)
            time.sleep(0.2)  # a last snapshot after the projections' final commits
            lag = monitor.result()
        batch.lag_ms = lag.lags_ms
        batch.lag_resolution_ms = lag.resolution_ms
        for name, lost in lag.missing.items():
            if lost:
                batch.notes.append(f"lag monitor: {lost} heads never reached by {name}")

    def python_batch(self, tasks: int, code: str) -> Batch:
        return self._batch([python_task(code)] * tasks, timeout=60 + tasks / 5, per_task=True)

    def round_trips(self, count: int) -> list[RoundTrip]:
        self._idle()
        return self._run(self._round_trips([NOOP] * count))

    def csharp_round_trips(self, sources: Sequence[str]) -> list[RoundTrip]:
        self._idle()
        bodies = [{"language": "csharp", "code": s, "ttl_seconds": 120} for s in sources]
        return self._run(self._round_trips(bodies))

    def expire_on_worker(self, tasks: int, ttl_seconds: float) -> list[Expiry]:
        """`concurrency` lanes, each submitting the next task once its last one ended."""
        self._idle()
        lanes, rest = divmod(tasks, self.concurrency)
        groups = [[_loop(ttl_seconds)] * (lanes + (i < rest)) for i in range(self.concurrency)]
        trips = self._run(asyncio.gather(*(self._round_trips(g) for g in groups if g)))
        return self._expiries([t.task_id for lane in trips for t in lane])

    def expire_by_reaper(self, tasks: int, ttl_seconds: float) -> list[Expiry]:
        """`tasks` submitted at once with the worker stopped: the reaper alone expires
        them. The worker is started again afterwards."""
        self._idle()
        self.roles["worker"].stop()
        try:
            before = self._idle()
            ids, _, _, refused = self._run(self._submit_all([_loop(ttl_seconds)] * tasks))
            if refused:
                raise ApiError(f"{refused} submissions refused")
            timeout = 60 + ttl_seconds + tasks
            self._run(self._until(lambda s: self._ended(s) - before >= len(ids), timeout))
            return self._expiries(ids)
        finally:
            self.start_worker()
