"""Celery as a user runs it: one ``celery worker --pool prefork --concurrency N``
(bench/celery_app.py), RabbitMQ broker, PostgreSQL result backend in a database of its
own; this process calls ``.delay()`` and ``.get()``. What Celery recorded is read from
``celery_taskmeta``: one row per task, written when it ends (no start, no events)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.cpu import BENCH_APPLICATION
from bench.processes import REPOSITORY, ManagedProcess, tool
from bench.report import ms
from bench.systems import Batch, Expiry, RoundTrip

READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
GET_INTERVAL = 0.001  # AsyncResult.get polls the database backend; its default is 0.5 s
POLL = 0.1


def sqlalchemy_url(url: str) -> str:
    """postgresql://… as Celery's database backend takes it: db+postgresql+psycopg://…"""
    parts = urlsplit(url)
    return "db+" + urlunsplit(parts._replace(scheme="postgresql+psycopg"))


class CelerySystem:
    name = "Celery"

    def __init__(
        self,
        database_url: str,
        broker_url: str,
        concurrency: int,
        workdir: Path,
        progress: Callable[[str], None],
    ) -> None:
        from bench import celery_app  # imports Celery: only when the comparison runs

        self.celery_app = celery_app
        self.database_url = database_url
        self.backend_url = sqlalchemy_url(database_url)
        self.broker_url = broker_url
        self.concurrency = concurrency
        self.workdir = workdir / "celery"
        self.progress = progress
        token = secrets.token_hex(4)
        self.queue = f"taskledger_bench_{token}"
        self.hostname = f"bench-{token}@%h"
        self.marks = self.workdir / "marks"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLEDGER_")}
        self.env |= {
            celery_app.BROKER_ENV: broker_url,
            celery_app.BACKEND_ENV: self.backend_url,
            celery_app.QUEUE_ENV: self.queue,
            celery_app.CACHE_ENV: str(self.workdir / "csharp-cache"),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPOSITORY), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        celery_app.configure(broker_url, self.backend_url, self.queue)
        self.app: Any = celery_app.app
        self.worker: ManagedProcess | None = None
        self._worker_runs = 0

    def facts(self) -> dict[str, Any]:
        from importlib.metadata import version

        versions = {name: version(name) for name in ("celery", "kombu", "sqlalchemy")}
        return versions | {"queue": self.queue, "get_interval_s": GET_INTERVAL}

    # -- processes -----------------------------------------------------------------------

    def processes(self) -> dict[str, int]:
        worker = self.worker
        return {"worker": worker.pid} if worker is not None and worker.alive() else {}

    def start(self) -> None:
        self.app.backend.ResultSession().close()  # creates celery_taskmeta before the worker
        queue = self.app.amqp.queues[self.queue]
        with self.app.connection_for_write() as conn:
            bound = queue.bind(conn.default_channel)
            bound.declare()
            bound.purge()
        self._start_worker()

    def _start_worker(self) -> None:
        celery = tool("celery")
        started = time.monotonic()
        self._worker_runs += 1
        command = [celery, "-A", "bench.celery_app", "worker", "--pool", "prefork",
                   "--concurrency", str(self.concurrency), "--hostname", self.hostname]  # fmt: skip
        worker = ManagedProcess(
            f"celery-worker-{self._worker_runs}", command, self.env, self.workdir
        )
        self.worker = worker
        worker.start()
        result = self.celery_app.noop_task.delay("ready?")
        while not result.ready():
            if not worker.alive():
                raise RuntimeError(
                    f"celery worker exited with {worker.returncode()}\n" + worker.output_tail()
                )
            if time.monotonic() - started > 120:
                raise TimeoutError("celery worker: no round trip in 120 s\n" + worker.output_tail())
            time.sleep(0.05)
        if result.get(timeout=10) != "ready?":
            raise RuntimeError("celery worker: the first noop did not return its argument")
        self.progress(
            f"  celery worker --pool prefork --concurrency {self.concurrency} (pid {worker.pid})"
            f" ready in {time.monotonic() - started:.1f} s"
        )

    def ensure_running(self) -> list[str]:
        if self.worker is not None and self.worker.alive():
            return []
        if self.worker is not None:
            self.worker.stop()
        self._start_worker()
        return ["worker"]

    def close(self) -> None:
        if self.worker is not None:
            stopped = self.worker.stop()
            if stopped.how != "SIGTERM" or stopped.leftovers_killed:
                self.progress(f"  celery worker: stopped {stopped}")
        with contextlib.suppress(Exception), self.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(self.queue)
        with contextlib.suppress(Exception):
            self.app.backend.session_manager.engines.clear()

    # -- the result backend's table ------------------------------------------------------

    @contextlib.contextmanager
    def _db(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        with psycopg.connect(
            self.database_url, autocommit=True, application_name=BENCH_APPLICATION
        ) as conn:
            yield conn

    def _count(self) -> int:
        with self._db() as conn:
            row = conn.execute(
                "SELECT count(*) FROM celery_taskmeta WHERE status = ANY(%s)", (list(READY_STATES),)
            ).fetchone()
        return int(row[0]) if row else 0

    def _wait_ended(self, before: int, tasks: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._count() - before < tasks:
            if self.worker is not None and not self.worker.alive():
                raise RuntimeError("celery worker died\n" + self.worker.output_tail())
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tasks} Celery tasks not all ended after {timeout:g} s")
            time.sleep(POLL)

    def _rows(self, ids: Sequence[str]) -> list[tuple[str, str, datetime, Any]]:
        """(task_id, status, date_done (aware), decoded result) of each of `ids`."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT task_id, status, date_done AT TIME ZONE current_setting('TimeZone'),"
                " result FROM celery_taskmeta WHERE task_id = ANY(%s)",
                (list(ids),),
            ).fetchall()
        decoded = []
        for task_id, status, done, result in rows:
            value: Any = None
            if result is not None and status == "SUCCESS":
                with contextlib.suppress(ValueError):
                    value = json.loads(bytes(result))
            decoded.append((str(task_id), str(status), done, value))
        return decoded

    # -- scenarios -----------------------------------------------------------------------

    def _batch(self, submit: Callable[[int], str], tasks: int, timeout: float) -> Batch:
        before = self._count()
        first = time.time()
        started = time.perf_counter()
        ids = [submit(i) for i in range(tasks)]
        submit_s = time.perf_counter() - started
        self._wait_ended(before, tasks, timeout)
        rows = self._rows(ids)
        completed = sum(1 for _, status, _, _ in rows if status == "SUCCESS")
        last = max((done for _, _, done, _ in rows), default=None)
        total = last.timestamp() - first if last is not None else float("nan")
        batch = Batch(tasks, completed, submit_s, total)
        batch.run_ms = [
            float(value["run_ms"])
            for _, _, _, value in rows
            if isinstance(value, dict) and value.get("run_ms") is not None
        ]
        return batch

    def live_lag(self, tasks: int, batch: Batch) -> None:
        return None  # no views: nothing lags

    def noop_batch(self, tasks: int) -> Batch:
        delay = self.celery_app.noop_task.delay
        return self._batch(lambda i: str(delay(i).id), tasks, timeout=60 + tasks / 20)

    def python_batch(self, tasks: int, code: str) -> Batch:
        delay = self.celery_app.python_task.delay
        return self._batch(lambda i: str(delay(code).id), tasks, timeout=60 + tasks / 2)

    def _round_trips(self, task: Any, arguments: Sequence[Any]) -> list[RoundTrip]:
        trips = []
        for argument in arguments:
            started = time.perf_counter()
            value = task.delay(argument).get(timeout=120, interval=GET_INTERVAL)
            trip = RoundTrip(ms(time.perf_counter() - started), ok=value == argument)
            if isinstance(value, dict):  # a C# run's
                trip.ok, trip.run_ms = value.get("exit_code") == 0, value.get("run_ms")
                trip.worker_ms = value.get("task_ms")
            trips.append(trip)
        return trips

    def round_trips(self, count: int) -> list[RoundTrip]:
        return self._round_trips(self.celery_app.noop_task, range(count))

    def csharp_round_trips(self, sources: Sequence[str]) -> list[RoundTrip]:
        return self._round_trips(self.celery_app.csharp_task, sources)

    def expire_on_worker(self, tasks: int, ttl_seconds: float) -> list[Expiry]:
        """`tasks` loops at once with a hard `time_limit`; the pool runs `concurrency` at a
        time, each until its limit. Lateness: date_done - (the task's own start + limit)."""
        loop = self.celery_app.loop_task
        before = self._count()
        ids = [
            str(loop.apply_async(args=(str(self.marks),), time_limit=ttl_seconds).id)
            for _ in range(tasks)
        ]
        self._wait_ended(before, tasks, timeout=60 + tasks * ttl_seconds)
        expiries = []
        for task_id, status, done, _ in self._rows(ids):
            mark = self.marks / task_id  # the task's own start, time.time()
            late = (
                ms(done.timestamp() - float(mark.read_text()) - ttl_seconds)
                if mark.exists()
                else None
            )
            expiries.append(Expiry(late, status))
        return expiries
