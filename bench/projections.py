"""Projections: rebuild speed and live lag, next to eventsourcing's own ProjectionRunner.

Two measurements in a fresh database (one per ``--output-bytes`` size; dropped afterwards,
also on failure, Ctrl-C or SIGTERM), beside the issue's targets (rebuild >= 20,000
events/s, live lag p99 <= 50 ms):

1. **Rebuild.** ``--events`` events (default 100,000) are written quickly (Task aggregates
   saved 200 to a transaction, like the integration tests' ``write_tasks``), with some
   variety: most tasks are submitted, started and completed (4 events); one in 20 each
   fails and is retried automatically, then completes (7), fails for good (4), is
   cancelled while pending (3) or while running (4); 7 tenants, 4 workers. The events
   table is then ``VACUUM ANALYZE``d, as autovacuum would have done in a live system. In
   each of ``--rounds`` interleaved rounds, ``projections.admin.rebuild()`` of
   ``task_status`` and of ``audit`` is timed (a whole new generation from position 0, as
   ``taskledger projections rebuild NAME`` does; its own ``seconds``), and the number of
   events it applied is checked.

   Baseline, same rounds: the library's own machinery. ``eventsourcing.projection.
   ProjectionRunner`` follows the same events table (``ApplicationSubscription`` with the
   Ledger's own mapper) into a minimal ``Projection`` whose ``process_event`` writes one
   row per event and the tracking record in one transaction, through a
   ``PostgresTrackingRecorder`` subclass that owns the table (the way the library's
   tutorial builds a materialised view). Same settings as the ledger, except the pool's
   pre-ping, left at the library's default (off) for the view. It applies one event per
   transaction, so it gets the first ``--baseline-events`` only (default 10,000); its time
   runs from constructing the runner to the commit of the last of them.

   ``--output-bytes`` sets the size of each completed attempt's stdout in that history
   (default 3, ``"42\\n"``). Given several sizes (``--output-bytes 3,1MiB``), one history
   per size is written, each in a database of its own with the same mix of tasks and the
   same number of events; the rounds alternate between them, and the table has a row per
   view and size. Output past its first 3 bytes is random base64 text: PostgreSQL
   compresses large values (TOAST), and output of one repeated character would cost next
   to nothing. The live-lag part runs in the first size's database and writes RESULT's
   3 bytes.

2. **Live lag.** A ``Ledger`` takes a steady, paced load: ``--rate`` tasks/s (default 200),
   each task ``submit``, ``start_attempt``, ``complete_attempt`` (3 saves, 4 events), from
   ``--writers`` threads (open loop: a writer behind its schedule does not wait before its
   next task; how far behind it fell is reported). For every save, the position of its
   last event and ``time.perf_counter()`` are taken right after its commit (in the
   application's ``_notify`` hook, which ``save`` calls once the recorder committed).
   Followers record ``perf_counter()`` at their commits: ``ProjectionRunner.on_batch``
   (called after the batch committed) for the two taskledger views, both running in
   threads of this process with real LISTEN/NOTIFY; the library's runner's view notes the
   time after each event's transaction committed. A save's lag is the time from its
   commit to the follower's first commit at or past its position. The lag's trend over
   a phase (slope, ms per s of load) tells a follower that keeps up (~0) from one whose
   backlog grows (its percentiles then depend on how long the load lasts).

   ``--seconds`` of load per row, split over the rounds; in each round: the load with no
   follower (what the writers offer on their own), then with the two taskledger runners,
   then with the library's runner (started at the head of the log). One kind of follower
   at a time: they would otherwise share the cores. Afterwards the taskledger runners
   catch up once more and the live views are checked against the log (every event once
   in ``audit``, every task in ``task_status``).

Everything runs in this one process, writers and followers alike, as ``taskledger dev``
does: they share one interpreter (GIL) and, on a small machine, the cores with PostgreSQL.
CPU columns: this process, and the host's ``postgres`` processes (all databases). Other
work on the host disturbs every figure: the header says how much CPU other processes used
during the run, and the JSON keeps the commit measured.

Run: ``.venv/bin/python -m bench.projections [--events 100000] [--rounds 3] [--rate 200]
[--seconds 10] [--output-bytes 3,1MiB]``; ``--parts rebuild`` or ``--parts lag`` for one
half. For rebuild speed against output size (1 MiB outputs make ~250 MiB of events per
1,000 events): ``--parts rebuild --events 4000 --baseline-events 1000 --output-bytes
3,1MiB``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import dataclasses
import math
import os
import random
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import psycopg
from eventsourcing.persistence import InfrastructureFactory, StoredEvent, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection as LibraryProjection
from eventsourcing.projection import ProjectionRunner as LibraryProjectionRunner
from eventsourcing.utils import Environment
from psycopg import sql

from bench._support import (
    MachineFacts,
    benchmark_parser,
    eprint,
    git,
    machine_facts,
    markdown_table,
    percentile,
    temporary_database,
    write_results,
)
from bench.ledger_writes import postgres_cpu_seconds
from ledger.clock import SystemClock
from ledger.domain import Task
from ledger.log import EVENTS_TABLE
from ledger.persistence import postgres_env
from ledger.retry import RetryPolicy
from ledger.service import Ledger
from ledger.store import EventStore
from ledger.values import AttemptError, AttemptResult, TaskLimits
from projections import all_projections
from projections.admin import rebuild
from projections.base import Generation
from projections.runner import ProjectionRunner

NAME = "projections"
SUMMARY = "projection rebuild events/s and live lag vs eventsourcing's ProjectionRunner"

SCHEMA = "public"  # the ledger's default schema (TASKLEDGER_DATABASE_SCHEMA)
APP_NAME = EventStore.name  # the application name the library's tracking records carry

# The targets, printed beside the measurements.
TARGET_REBUILD_EVENTS_PER_S = 20_000
TARGET_LAG_P99_MS = 50.0

LIMITS = TaskLimits()
RESULT = AttemptResult(stdout="42\n", exit_code=0, duration_ms=12.5)


# -- a ledger that says when each save committed --------------------------------------------


class TimedLedger(Ledger):
    """A Ledger that notes, after each save's commit, its last position and the time."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env, clock=SystemClock())
        # Set to a list to record; appends from several threads are atomic in CPython.
        self.commits: list[tuple[int, float]] | None = None
        # Every save goes through the group commit, whose insert returns once its
        # transaction committed, with the notification ids it was given.
        insert = self.store.group_commit._insert

        def timed(events: Sequence[StoredEvent]) -> object:
            ids = insert(events)
            commits = self.commits
            if commits is not None and isinstance(ids, list | tuple) and ids:
                commits.append((max(ids), time.perf_counter()))
            return ids

        self.store.group_commit._insert = timed


# -- the history to rebuild from ------------------------------------------------------------


@dataclass
class History:
    tasks: int
    events: int
    head: int
    seconds: float
    scenarios: dict[str, int]
    output_bytes: int = len(RESULT.stdout)  # each completed attempt's stdout
    table_bytes: int | None = None  # the events table on disk, TOAST included


# Program output for --output-bytes: "42\n" (RESULT's), then incompressible text (random
# base64), so that PostgreSQL cannot shrink it (TOAST compresses what it can): real output
# is rarely one repeated character, and compression would hide the cost being measured.
@cache
def output_result(output_bytes: int) -> AttemptResult:
    """A completed attempt whose stdout is `output_bytes` ASCII bytes (RESULT's when 3)."""
    if output_bytes == len(RESULT.stdout):
        return RESULT
    filler = random.Random(output_bytes).randbytes(output_bytes * 3 // 4 + 3)
    text = RESULT.stdout + base64.b64encode(filler).decode()
    return dataclasses.replace(RESULT, stdout=text[:output_bytes])


# Bytes of program output per save while writing a history: 200 tasks per save, fewer when
# their outputs are large (a save is one transaction held in memory whole).
SAVE_OUTPUT_BYTES = 16 * 1024 * 1024


SCENARIOS = ("completed", "retried", "failed", "cancelled_pending", "cancelled_running")


def _scenario(n: int) -> str:
    """One task in 20 of each unusual kind, the rest plain completions (~4.1 events/task)."""
    k = n % 20
    return SCENARIOS[k] if k < len(SCENARIOS) else "completed"


def _history_task(
    n: int, base: datetime, policy: RetryPolicy, result: AttemptResult = RESULT
) -> tuple[Task, str]:
    """One task with its whole life as pending events; `result` is what completes it."""
    at = base + timedelta(milliseconds=n)
    kind = _scenario(n)
    task = Task.submit(
        task_id=uuid.uuid4(),
        now=at,
        description=f"bench task {n}",
        language="python" if n % 3 else "csharp",
        code="print(6 * 7)",
        data={"n": n, "tags": ["bench", f"batch-{n // 200}"]},
        ttl_seconds=300,
        max_attempts=3,
        tenant=f"tenant-{n % 7}",
        submitted_by=f"key-{n % 5}",
        idempotency_key=None,
        limits=LIMITS,
    )
    worker = f"worker-{n % 4}"
    step = timedelta(milliseconds=5)
    if kind == "cancelled_pending":
        task.cancel("admin", "not needed", at + step)
        return task, kind
    task.start_attempt(1, worker, at + step)
    if kind == "cancelled_running":
        task.cancel("admin", "taking too long", at + 2 * step)
    elif kind == "failed":
        error = AttemptError("program_error", "Traceback: ZeroDivisionError", exit_code=1)
        task.fail_attempt(1, error, retryable=False, now=at + 2 * step, policy=policy)
    elif kind == "retried":
        error = AttemptError("worker_lost", "worker stopped heartbeating")
        task.fail_attempt(1, error, retryable=True, now=at + 2 * step, policy=policy)
        task.start_attempt(2, f"worker-{(n + 1) % 4}", at + 3 * step)
        task.complete_attempt(2, result, at + 4 * step)
    else:
        task.complete_attempt(1, result, at + 2 * step)
    return task, kind


def write_history(
    ledger: Ledger,
    events: int,
    progress: Callable[[str], None] = eprint,
    *,
    output_bytes: int = len(RESULT.stdout),
) -> History:
    """At least `events` events, 200 tasks per save (one transaction each; fewer with large
    outputs); each completed attempt's stdout is `output_bytes` bytes."""
    result = output_result(output_bytes)
    per_save = max(1, min(200, SAVE_OUTPUT_BYTES // max(1, output_bytes)))
    policy = RetryPolicy()
    base = datetime.now(UTC) - timedelta(days=1)
    scenarios = dict.fromkeys(SCENARIOS, 0)
    written = tasks = 0
    started = time.perf_counter()
    while written < events:
        batch: list[Task] = []
        for _ in range(per_save):
            task, kind = _history_task(tasks, base, policy, result)
            batch.append(task)
            scenarios[kind] += 1
            written += len(task.pending_events)
            tasks += 1
            if written >= events:
                break
        ledger.store.save(*batch)
        if tasks % 10_000 < len(batch) or (per_save < 200 and tasks % 1_000 < len(batch)):
            progress(f"  wrote {written:,} events ({tasks:,} tasks)")
    seconds = time.perf_counter() - started
    head = ledger.store.recorder.max_notification_id() or 0
    return History(tasks, written, head, seconds, scenarios, output_bytes)


def _events_table() -> sql.Identifier:
    return sql.Identifier(SCHEMA, EVENTS_TABLE)


def vacuum_analyze(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(_events_table()))


def position_of(url: str, nth: int) -> int:
    """The position of the `nth` event (1-based) in the log."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT notification_id FROM {} ORDER BY notification_id OFFSET %s LIMIT 1"
            ).format(_events_table()),
            (nth - 1,),
        ).fetchone()
    if row is None:
        raise LookupError(f"the log has fewer than {nth} events")
    return int(row[0])


def head_of(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {}").format(_events_table())
        ).fetchone()
    return int(row[0]) if row else 0


def count_rows(url: str, relation: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(SCHEMA, relation))
        ).fetchone()
    return int(row[0]) if row else 0


# -- the baseline: eventsourcing's ProjectionRunner, one event per transaction -------------


class BaselineView(PostgresTrackingRecorder):
    """A materialised view the library's way: a tracking recorder that also owns a table,
    and writes a row and the tracking record in one transaction.

    It also notes, after each commit, the position and ``perf_counter()``.
    """

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        assert self.tracking_table_name.endswith("_tracking")
        self.rows_table_name = self.tracking_table_name.replace("_tracking", "_rows")
        self.check_identifier_length(self.rows_table_name)
        table = sql.Identifier(self.datastore.schema, self.rows_table_name)
        self.sql_create_statements.append(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " position bigint PRIMARY KEY,"
                " task_id uuid NOT NULL,"
                " version int NOT NULL,"
                " type text NOT NULL,"
                " at timestamptz NOT NULL)"
            ).format(table)
        )
        self.insert_row_statement = sql.SQL(
            "INSERT INTO {} (position, task_id, version, type, at) VALUES (%s, %s, %s, %s, %s)"
        ).format(table)
        self.commits: list[tuple[int, float]] = []

    def insert_row(
        self, task_id: UUID, version: int, kind: str, at: datetime, tracking: Tracking
    ) -> None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                self.insert_row_statement,
                (tracking.notification_id, task_id, version, kind, at),
                prepare=True,
            )
            self._insert_tracking(curs, tracking)
        self.commits.append((tracking.notification_id, time.perf_counter()))

    @property
    def last_position(self) -> int:
        commits = self.commits
        return commits[-1][0] if commits else 0


class BaselineProjection(LibraryProjection[BaselineView]):
    """One row per event, like the audit view without its lookups and payload."""

    name = "BenchBaseline"  # tables benchbaseline_tracking, benchbaseline_rows

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_row(
            domain_event.originator_id,
            domain_event.originator_version,
            type(domain_event).__name__,
            domain_event.timestamp,
            tracking,
        )


BaselineRunner = LibraryProjectionRunner[Ledger, BaselineView]


def baseline_env(env: dict[str, str]) -> dict[str, str]:
    """The ledger's settings, but without the pool's pre-ping for the view's connections
    (the library's default; `postgres_env` turns it on for the ledger, and it would cost
    the baseline an extra round trip per event)."""
    return {**env, f"{BaselineProjection.name.upper()}_POSTGRES_PRE_PING": "n"}


def reset_baseline_view(env: dict[str, str], url: str, position: int) -> None:
    """Empty the baseline view and set its tracking to `position` (0: the beginning)."""
    prefix = BaselineProjection.name.lower()
    with psycopg.connect(url, autocommit=True) as conn:
        for suffix in ("_rows", "_tracking"):
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, prefix + suffix))
            )
    factory = InfrastructureFactory[BaselineView].construct(
        env=Environment(BaselineProjection.name, baseline_env(env))
    )
    try:
        view = factory.tracking_recorder(BaselineView)  # creates the tables
        if position:
            view.insert_tracking(Tracking(APP_NAME, position))
    finally:
        factory.close()


def start_baseline_runner(env: dict[str, str]) -> BaselineRunner:
    return LibraryProjectionRunner(
        application_class=Ledger,
        projection_class=BaselineProjection,
        view_class=BaselineView,
        env=baseline_env(env),
    )


def wait_for_baseline(runner: BaselineRunner, position: int, timeout: float) -> bool:
    """Wait (polling; the times come from the view's own records) for `position`."""
    deadline = time.monotonic() + timeout
    while runner.view.last_position < position:
        runner.run_forever(timeout=0.005)  # re-raises an error of its processing thread
        if runner.is_interrupted.is_set():
            raise RuntimeError("the library's projection runner stopped")
        if time.monotonic() > deadline:
            return False
    return True


def commit_time(commits: Sequence[tuple[int, float]], position: int) -> float | None:
    """When the first commit at or past `position` happened (commits in position order)."""
    index = bisect.bisect_left(commits, (position, float("-inf")))
    return commits[index][1] if index < len(commits) else None


# -- part 1: rebuild -----------------------------------------------------------------------


@dataclass
class Timed:
    events: int
    seconds: float
    client_cpu: float
    server_cpu: float | None

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def _cpu_marks(local: bool) -> tuple[float, float | None]:
    return time.process_time(), postgres_cpu_seconds() if local else None


def _timed(events: int, seconds: float, before: tuple[float, float | None], local: bool) -> Timed:
    client_after, server_after = _cpu_marks(local)
    client_before, server_before = before
    server = (
        server_after - server_before
        if server_after is not None and server_before is not None
        else None
    )
    return Timed(events, seconds, client_after - client_before, server)


def time_rebuild(url: str, name: str, batch_size: int, expected: int, local: bool) -> Timed:
    projection = all_projections()[name]
    before = _cpu_marks(local)
    report = rebuild(url, SCHEMA, projection, batch_size=batch_size)
    timed = _timed(report.events, report.seconds, before, local)
    if report.events != expected:
        raise AssertionError(f"rebuild of {name} applied {report.events}, expected {expected}")
    return timed


def time_baseline_rebuild(env: dict[str, str], url: str, events: int, local: bool) -> Timed:
    target = position_of(url, events)
    reset_baseline_view(env, url, 0)
    before = _cpu_marks(local)
    started = time.perf_counter()
    with start_baseline_runner(env) as runner:
        if not wait_for_baseline(runner, target, timeout=600):
            raise AssertionError("the library's runner did not reach the target in 10 minutes")
        finished = commit_time(runner.view.commits, target)
        applied = bisect.bisect_right(runner.view.commits, (target, float("inf")))
    assert finished is not None
    timed = _timed(applied, finished - started, before, local)
    if applied != events:
        raise AssertionError(f"the library's runner applied {applied} events, expected {events}")
    return timed


# -- part 2: live lag ----------------------------------------------------------------------


@dataclass
class LoadPhase:
    tasks: int
    saves: int
    elapsed: float
    behind_ms: float  # how far the writers fell behind their schedule at worst
    commits: list[tuple[int, float]]
    client_cpu: float  # CPU seconds of this whole process (writers and followers)
    server_cpu: float | None  # CPU seconds of the host's postgres processes


def run_load(
    ledger: TimedLedger,
    rate: float,
    seconds: float,
    writers: int,
    stop: threading.Event,
    local: bool,
) -> LoadPhase:
    """`rate` tasks/s for `seconds`: submit, start, complete; paced, open loop."""
    total = max(1, round(rate * seconds))
    commits: list[tuple[int, float]] = []
    errors: list[BaseException] = []
    behind = [0.0] * writers
    done = [0] * writers
    t0 = time.perf_counter() + 0.01

    def writer(index: int) -> None:
        try:
            for i in range(index, total, writers):
                due = t0 + i / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    if stop.wait(wait):
                        return
                else:
                    behind[index] = max(behind[index], -wait)
                if stop.is_set():
                    return
                task = ledger.submit(
                    description=f"live {i}",
                    language="python",
                    code="print(6 * 7)",
                    data={"i": i},
                    tenant=f"tenant-{i % 7}",
                    submitted_by="bench",
                ).task
                ledger.start_attempt(task.id, 1, f"worker-{index}")
                ledger.complete_attempt(task.id, 1, RESULT)
                done[index] += 1
        except BaseException as error:  # noqa: BLE001 -- handed to the main thread
            errors.append(error)
            stop.set()

    ledger.commits = commits
    threads = [
        threading.Thread(target=writer, args=(i,), name=f"writer-{i}", daemon=True)
        for i in range(writers)
    ]
    before = _cpu_marks(local)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        ledger.commits = None
    cpu = _timed(0, 0.0, before, local)
    if errors:
        raise errors[0]
    elapsed = (max(t for _, t in commits) if commits else t0) - t0
    return LoadPhase(
        sum(done),
        len(commits),
        elapsed,
        max(behind) * 1000,
        sorted(commits),
        cpu.client_cpu,
        cpu.server_cpu,
    )


def lags_ms(
    writes: Sequence[tuple[int, float]], follower: Sequence[tuple[int, float]]
) -> tuple[list[float], float, int]:
    """Each write's lag (ms) until the follower's first commit at or past it, in write
    order; the trend of the lag (ms per s of load: ~0 when the follower keeps up, > 0
    when a backlog builds); how many writes the follower never applied."""
    lags = []
    times = []
    missing = 0
    for position, written_at in writes:
        applied_at = commit_time(follower, position)
        if applied_at is None:
            missing += 1
        else:
            lags.append((applied_at - written_at) * 1000)
            times.append(written_at)
    trend = 0.0
    if len(lags) > 2 and times[-1] > times[0]:
        trend = statistics.linear_regression(times, lags).slope
    return lags, trend, missing


@dataclass
class BatchLog:
    """on_batch records of one runner: (position, perf_counter) and batch sizes."""

    commits: list[tuple[int, float]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def on_batch(self, generation: Generation, applied: int) -> None:
        self.commits.append((generation.position, time.perf_counter()))
        self.sizes.append(applied)


@dataclass
class FollowerRound:
    follower: str
    tasks: int
    saves: int
    elapsed: float
    behind_ms: float
    lags_ms: list[float]  # in write order
    trend_ms_per_s: float  # slope of lag over the phase: > 0 when falling behind
    missing: int
    commits: int  # follower transactions during the phase
    applied_events: int
    client_cpu: float
    server_cpu: float | None

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.elapsed if self.elapsed else 0.0

    @classmethod
    def of(
        cls,
        follower: str,
        load: LoadPhase,
        commits: Sequence[tuple[int, float]],
        applied_events: int,
    ) -> FollowerRound:
        lags, trend, missing = lags_ms(load.commits, commits) if commits else ([], 0.0, 0)
        return cls(
            follower=follower,
            tasks=load.tasks,
            saves=load.saves,
            elapsed=load.elapsed,
            behind_ms=load.behind_ms,
            lags_ms=lags,
            trend_ms_per_s=trend,
            missing=missing,
            commits=len(commits),
            applied_events=applied_events,
            client_cpu=load.client_cpu,
            server_cpu=load.server_cpu,
        )


def _warm_up(ledger: TimedLedger) -> int:
    """One task through the ledger (so a follower's LISTEN is seen working); its position."""
    ledger.commits = []
    try:
        ledger.submit(
            description="warm-up",
            language="python",
            code="pass",
            tenant="tenant-0",
            submitted_by="bench",
        )
        return max(p for p, _ in ledger.commits)
    finally:
        ledger.commits = None


CATCH_UP_TIMEOUT = 120.0
# A follower whose lag grows faster than this over a phase is not keeping up.
FALLING_BEHIND_MS_PER_S = 20.0


def taskledger_phase(
    url: str,
    ledger: TimedLedger,
    rate: float,
    seconds: float,
    writers: int,
    batch_size: int,
    stop: threading.Event,
    local: bool,
) -> list[FollowerRound]:
    logs = {name: BatchLog() for name in all_projections()}
    runners = [
        ProjectionRunner(
            url, SCHEMA, projection, batch_size=batch_size, on_batch=logs[name].on_batch
        )
        for name, projection in all_projections().items()
    ]
    try:
        for runner in runners:
            runner.start()
        warm = _warm_up(ledger)
        for runner in runners:
            if not runner.wait_for(warm, CATCH_UP_TIMEOUT):
                raise AssertionError(f"{runner.projection.name} did not catch up")
        for log in logs.values():
            log.commits.clear()
            log.sizes.clear()
        load = run_load(ledger, rate, seconds, writers, stop, local)
        head = max(p for p, _ in load.commits)
        for runner in runners:
            runner.wait_for(head, CATCH_UP_TIMEOUT)
    finally:
        for runner in runners:
            runner.stop()
    return [FollowerRound.of(name, load, log.commits, sum(log.sizes)) for name, log in logs.items()]


def baseline_phase(
    env: dict[str, str],
    url: str,
    ledger: TimedLedger,
    rate: float,
    seconds: float,
    writers: int,
    stop: threading.Event,
    local: bool,
) -> FollowerRound:
    reset_baseline_view(env, url, head_of(url))  # follow from now on, not from the start
    with start_baseline_runner(env) as runner:
        warm = _warm_up(ledger)
        if not wait_for_baseline(runner, warm, CATCH_UP_TIMEOUT):
            raise AssertionError("the library's runner did not see the warm-up task")
        first = len(runner.view.commits)
        load = run_load(ledger, rate, seconds, writers, stop, local)
        head = max(p for p, _ in load.commits)
        wait_for_baseline(runner, head, CATCH_UP_TIMEOUT)
        commits = runner.view.commits[first:]
    return FollowerRound.of(BASELINE, load, commits, len(commits))


BASELINE = "eventsourcing ProjectionRunner"
NO_FOLLOWER = "none (writers alone)"


def writers_alone_phase(
    ledger: TimedLedger,
    rate: float,
    seconds: float,
    writers: int,
    stop: threading.Event,
    local: bool,
) -> FollowerRound:
    """The same load with no follower running: what the writers offer by themselves."""
    _warm_up(ledger)
    load = run_load(ledger, rate, seconds, writers, stop, local)
    return FollowerRound.of(NO_FOLLOWER, load, [], 0)


def check_live_views(url: str, batch_size: int) -> dict[str, int]:
    """Let the taskledger runners catch up once more (the baseline phases wrote events they
    did not see), then check the views: every event once in audit, every task in
    task_status."""
    runners = [
        ProjectionRunner(url, SCHEMA, projection, batch_size=batch_size)
        for projection in all_projections().values()
    ]
    head = head_of(url)
    try:
        for runner in runners:
            runner.start()
        for runner in runners:
            if not runner.wait_for(head, CATCH_UP_TIMEOUT):
                raise AssertionError(f"{runner.projection.name} did not catch up at the end")
    finally:
        for runner in runners:
            runner.stop()
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT originator_id) FROM {}").format(
                _events_table()
            )
        ).fetchone()
    assert row is not None
    checks = {
        "events": int(row[0]),
        "tasks": int(row[1]),
        "audit_rows": count_rows(url, "audit"),
        "task_status_rows": count_rows(url, "task_status"),
    }
    if checks["audit_rows"] != checks["events"] or checks["task_status_rows"] != checks["tasks"]:
        raise AssertionError(f"live views do not match the log: {checks}")
    return checks


# -- summaries -----------------------------------------------------------------------------


@dataclass
class RebuildResult:
    view: str
    events: int
    rounds_events_per_s: list[float]
    rounds_seconds: list[float]
    client_cpu_s: list[float]
    server_cpu_s: list[float | None]
    median_events_per_s: float
    min_events_per_s: float
    max_events_per_s: float
    output_bytes: int = len(RESULT.stdout)  # of the history's completed attempts
    vs_baseline: float | None = None


def summarise_rebuild(
    view: str, rounds: Sequence[Timed], output_bytes: int = len(RESULT.stdout)
) -> RebuildResult:
    rates = [r.rate for r in rounds]
    return RebuildResult(
        view=view,
        events=rounds[0].events,
        output_bytes=output_bytes,
        rounds_events_per_s=[round(r, 1) for r in rates],
        rounds_seconds=[round(r.seconds, 4) for r in rounds],
        client_cpu_s=[round(r.client_cpu, 3) for r in rounds],
        server_cpu_s=[None if r.server_cpu is None else round(r.server_cpu, 3) for r in rounds],
        median_events_per_s=round(statistics.median(rates), 1),
        min_events_per_s=round(min(rates), 1),
        max_events_per_s=round(max(rates), 1),
    )


@dataclass
class LagResult:
    follower: str
    writes: int
    missing: int
    tasks_per_s: float
    behind_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float
    round_p99_ms: list[float]
    trend_ms_per_s: float  # median over rounds
    commits: int
    events_per_commit: float
    client_cpu_pct: float  # this process's CPU over the load, % of one core
    server_cpu_pct: float | None  # PostgreSQL's
    vs_baseline_p99: float | None = None
    raw_lags_ms: list[list[float]] = field(default_factory=list)


def summarise_lag(follower: str, rounds: Sequence[FollowerRound]) -> LagResult:
    pooled = sorted(x for r in rounds for x in r.lags_ms)
    elapsed = sum(r.elapsed for r in rounds)
    commits = sum(r.commits for r in rounds)
    server = [r.server_cpu for r in rounds]

    def q(values: Sequence[float], fraction: float) -> float:
        return round(percentile(values, fraction), 2)

    return LagResult(
        follower=follower,
        writes=sum(r.saves for r in rounds),
        missing=sum(r.missing for r in rounds),
        tasks_per_s=round(sum(r.tasks for r in rounds) / elapsed, 1) if elapsed else 0.0,
        behind_ms=round(max(r.behind_ms for r in rounds), 1),
        p50_ms=q(pooled, 0.50),
        p90_ms=q(pooled, 0.90),
        p99_ms=q(pooled, 0.99),
        max_ms=round(pooled[-1], 2) if pooled else float("nan"),
        min_ms=round(pooled[0], 2) if pooled else float("nan"),
        round_p99_ms=[q(sorted(r.lags_ms), 0.99) for r in rounds],
        trend_ms_per_s=round(statistics.median(r.trend_ms_per_s for r in rounds), 1),
        commits=commits,
        events_per_commit=round(sum(r.applied_events for r in rounds) / commits, 2)
        if commits
        else 0.0,
        client_cpu_pct=round(100 * sum(r.client_cpu for r in rounds) / elapsed, 1)
        if elapsed
        else 0.0,
        server_cpu_pct=None
        if any(x is None for x in server) or not elapsed
        else round(100 * sum(x or 0.0 for x in server) / elapsed, 1),
        raw_lags_ms=[[round(x, 3) for x in r.lags_ms] for r in rounds],
    )


# -- reporting -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _range(low: float, high: float, digits: int = 0) -> str:
    return f"{low:,.{digits}f}-{high:,.{digits}f}"


def _p99_ratio(result: LagResult, baseline_behind: bool) -> str:
    """Baseline p99 / this p99; a lower bound when the baseline was falling behind (its
    p99 then grows with the length of the load)."""
    if result.vs_baseline_p99 is None:
        return "-"
    if baseline_behind:
        return f">= {result.vs_baseline_p99:,.0f}x (baseline behind)"
    return f"{result.vs_baseline_p99:,.1f}x"


def _cpu_per_k(seconds: Sequence[float | None], events: int) -> str:
    if not seconds or any(s is None for s in seconds) or not events:
        return "-"
    return f"{statistics.median(s or 0.0 for s in seconds) / events * 1e6:,.0f}"


def _bytes(size: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale and size % (scale // 16) == 0:
            return f"{size / scale:g} {unit}"
    return f"{size:,} B"


def render(
    facts: MachineFacts,
    histories: Sequence[History],
    rebuilds: Sequence[RebuildResult],
    lags: Sequence[LagResult],
    settings: dict[str, Any],
    noise: str = "",
) -> str:
    parts = [f"# {NAME}: {facts.header()}", ""]
    if noise:
        parts += [noise, ""]
    if histories and rebuilds:
        history = histories[0]
        outputs = ", ".join(
            f"{_bytes(h.output_bytes)}"
            + ("" if h.table_bytes is None else f" (events table {h.table_bytes / 2**20:,.1f} MiB)")
            for h in histories
        )
        parts += [
            f"Rebuild: {history.events:,} events ({history.tasks:,} tasks: "
            + ", ".join(f"{k} {v:,}" for k, v in history.scenarios.items())
            + f"; written in {' / '.join(f'{h.seconds:.1f}' for h in histories)} s),"
            f" {settings['rounds']} interleaved rounds; rebuild batch {settings['batch_size']:,}."
            f" Output = each completed attempt's stdout: {outputs}"
            " (past 3 bytes, random base64 text, which PostgreSQL cannot compress)."
            " Baseline = eventsourcing"
            f" ProjectionRunner, 1 event per transaction, first {settings['baseline_events']:,}"
            " events. CPU = median µs per event, this process / PostgreSQL.",
            "",
            markdown_table(
                [
                    "view",
                    "output",
                    "events",
                    "events/s median",
                    "range",
                    "vs baseline",
                    f">= {TARGET_REBUILD_EVENTS_PER_S:,}/s?",
                    "client CPU µs/ev",
                    "PG CPU µs/ev",
                ],
                [
                    [
                        r.view,
                        _bytes(r.output_bytes),
                        f"{r.events:,}",
                        _num(r.median_events_per_s),
                        _range(r.min_events_per_s, r.max_events_per_s),
                        "-" if r.vs_baseline is None else f"{r.vs_baseline:.1f}x",
                        "-"
                        if r.view == BASELINE
                        else (
                            "yes" if r.median_events_per_s >= TARGET_REBUILD_EVENTS_PER_S else "NO"
                        ),
                        _cpu_per_k(r.client_cpu_s, r.events),
                        _cpu_per_k(r.server_cpu_s, r.events),
                    ]
                    for r in rebuilds
                ],
            ),
            "",
        ]
    if lags:
        baseline_behind = any(
            r.follower == BASELINE and r.trend_ms_per_s > FALLING_BEHIND_MS_PER_S for r in lags
        )
        parts += [
            f"Live lag: target {settings['rate']:g} tasks/s (submit, start, complete: 3 saves,"
            f" 4 events per task) from {settings['writers']} writer threads,"
            f" {settings['seconds']:g} s per follower in {settings['rounds']} alternating rounds;"
            " lag = save's commit -> follower's commit at or past its position; taskledger"
            f" runner batch {settings['runner_batch_size']:,}. The first row is the same load"
            " with no follower. CPU % = of one core, during the load: this process (writers"
            " and followers, one interpreter) / PostgreSQL.",
            "",
            markdown_table(
                [
                    "follower",
                    "saves",
                    "tasks/s done",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "p99 per round",
                    "lag trend ms/s",
                    "baseline p99 / p99",
                    f"p99 <= {TARGET_LAG_P99_MS:g} ms?",
                    "events/commit",
                    "client CPU %",
                    "PG CPU %",
                ],
                [
                    [
                        r.follower,
                        f"{r.writes:,}" + (f" ({r.missing} never applied)" if r.missing else ""),
                        _num(r.tasks_per_s),
                        _num(r.p50_ms, 1),
                        _num(r.p90_ms, 1),
                        _num(r.p99_ms, 1),
                        _num(r.max_ms, 1),
                        "-"
                        if r.follower == NO_FOLLOWER
                        else _range(min(r.round_p99_ms), max(r.round_p99_ms), 1),
                        "-" if r.follower == NO_FOLLOWER else f"{r.trend_ms_per_s:+,.0f}",
                        _p99_ratio(r, baseline_behind),
                        "-"
                        if r.follower in (BASELINE, NO_FOLLOWER)
                        else ("yes" if r.p99_ms <= TARGET_LAG_P99_MS else "NO"),
                        "-" if r.follower == NO_FOLLOWER else _num(r.events_per_commit, 1),
                        _num(r.client_cpu_pct),
                        _num(r.server_cpu_pct),
                    ]
                    for r in lags
                ],
            ),
        ]
        behind = [r.follower for r in lags if r.trend_ms_per_s > FALLING_BEHIND_MS_PER_S]
        if behind:
            parts += [
                "",
                f"Falling behind (lag grew by more than {FALLING_BEHIND_MS_PER_S:g} ms per s of"
                f" load): {', '.join(behind)}. Its lag is a backlog that grows for as long as"
                " the load lasts, not a steady state: its percentiles depend on --seconds.",
            ]
        late = [r for r in lags if r.behind_ms > 100]
        if late:
            parts += [
                "",
                "The writers fell behind their schedule (target rate not fully offered;"
                " 'tasks/s done' is what was), at worst by: "
                + ", ".join(f"{r.behind_ms:,.0f} ms with {r.follower}" for r in late)
                + ".",
            ]
    return "\n".join(parts)


# -- command line ---------------------------------------------------------------------------


PARTS = ("rebuild", "lag")


def _parts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}; choose from {PARTS}")
    return names


def _sizes(text: str) -> list[int]:
    """`3,1048576` or `3,1MiB`: byte counts, each at least 0, no repeats."""
    sizes = []
    for item in (x.strip() for x in text.split(",")):
        number, scale = item, 1
        for unit, factor in (("MiB", 2**20), ("KiB", 2**10)):
            if item.endswith(unit):
                number, scale = item.removesuffix(unit), factor
        try:
            size = int(number) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a byte count: {item!r}") from None
        if size < 0 or size in sizes:
            raise argparse.ArgumentTypeError(f"negative or repeated size: {item!r}")
        sizes.append(size)
    return sizes


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("projections", __doc__)
    parser.add_argument(
        "--events", type=_positive(int), default=100_000, help="events to rebuild (default 100000)"
    )
    parser.add_argument(
        "--baseline-events",
        type=_positive(int),
        default=10_000,
        help="events the library's runner applies per rebuild round (default 10000)",
    )
    parser.add_argument(
        "--rounds", type=_positive(int), default=3, help="interleaved rounds (default 3)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive(int),
        default=5_000,
        help="rebuild batch size (default 5000, rebuild()'s default)",
    )
    parser.add_argument(
        "--rate", type=_positive(float), default=200.0, help="live load, tasks/s (default 200)"
    )
    parser.add_argument(
        "--seconds",
        type=_positive(float),
        default=10.0,
        help="seconds of live load per follower kind, split over the rounds (default 10)",
    )
    parser.add_argument(
        "--writers", type=_positive(int), default=4, help="writer threads (default 4)"
    )
    parser.add_argument(
        "--runner-batch-size",
        type=_positive(int),
        default=2_000,
        help="taskledger ProjectionRunner batch size (default 2000, as `projections run`)",
    )
    parser.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        help="comma-separated subset of rebuild,lag (default both)",
    )
    parser.add_argument(
        "--output-bytes",
        type=_sizes,
        default=[len(RESULT.stdout)],
        metavar="N[,N...]",
        help="stdout bytes of each completed attempt in the rebuild's history; several sizes"
        " (e.g. 3,1048576) rebuild one history each, in alternating rounds, in one table"
        f" (default {len(RESULT.stdout)}: '42\\n'; the live-lag part runs in the first"
        " size's database and writes 3-byte outputs)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write bench/results/projections-*.json"
    )
    return parser.parse_args(argv)


@dataclass
class Outcome:
    facts: MachineFacts
    histories: list[History]
    rebuilds: list[RebuildResult]
    lags: list[LagResult]
    checks: dict[str, int]
    seconds: float
    other_cpu_pct: float | None  # CPU of everything but this process and PostgreSQL


def host_busy_seconds() -> float | None:
    """CPU time the whole host has spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))
    return busy / os.sysconf("SC_CLK_TCK")


class NoiseMeter:
    """How busy the host was with other work than this benchmark and PostgreSQL: other
    processes share the cores and disturb every figure here."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.host = host_busy_seconds()
        self.own = time.process_time()
        self.server = postgres_cpu_seconds()

    def other_cpu_pct(self) -> float | None:
        host, server = host_busy_seconds(), postgres_cpu_seconds()
        if host is None or server is None or self.host is None or self.server is None:
            return None
        elapsed = time.perf_counter() - self.started
        other = (host - self.host) - (time.process_time() - self.own) - (server - self.server)
        return round(100 * max(0.0, other) / elapsed, 1) if elapsed else None


def _server_is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def peak_rss_mib() -> float:
    """The most memory this process has held at once so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table_bytes(url: str) -> int | None:
    """The events table's size on disk, TOAST and indexes included."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size(%s::regclass)", (f"{SCHEMA}.{EVENTS_TABLE}",)
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def run(args: argparse.Namespace, progress: Callable[[str], None] = eprint) -> Outcome:
    local = _server_is_local(args.database_url)
    stop = threading.Event()
    # Keyed by (view, output bytes of the history it rebuilt).
    rebuild_rounds: dict[tuple[str, int], list[Timed]] = {}
    lag_rounds: dict[str, list[FollowerRound]] = {}
    histories: list[History] = []
    checks: dict[str, int] = {}
    noise = NoiseMeter()
    # One database per output size (the first also takes the live-lag part); the rebuild
    # rounds alternate between them, so machine noise falls on every size alike.
    sizes = args.output_bytes if "rebuild" in args.parts else args.output_bytes[:1]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(temporary_database(args.database_url)) for _ in sizes]
        url = urls[0]
        facts = machine_facts(url)
        progress(
            f"{NAME}: database(s) {', '.join(urlsplit(u).path.lstrip('/') for u in urls)};"
            f" {facts.header()}"
        )
        envs = [
            postgres_env(u, schema=SCHEMA, pool_size=args.writers, max_overflow=args.writers)
            for u in urls
        ]
        env = envs[0]
        ledger = TimedLedger(env)
        stack.callback(ledger.close)
        stack.callback(stop.set)
        for size, size_url, size_env in zip(sizes, urls, envs, strict=True):
            writer = ledger if size_env is env else TimedLedger(size_env)
            try:
                history = write_history(
                    writer, max(args.events, args.baseline_events), progress, output_bytes=size
                )
            finally:
                if writer is not ledger:
                    writer.close()
            vacuum_analyze(size_url)
            history.table_bytes = table_bytes(size_url)
            histories.append(history)
            progress(
                f"  history ({size:,}-byte outputs): {history.events:,} events,"
                f" {history.tasks:,} tasks in {history.seconds:.1f} s"
                f" ({history.events / history.seconds:,.0f} events/s)"
                + (
                    ""
                    if history.table_bytes is None
                    else f", events table {history.table_bytes / 2**20:,.1f} MiB"
                )
            )
        if "rebuild" in args.parts:
            for round_ in range(args.rounds):
                for history, size_url, size_env in zip(histories, urls, envs, strict=True):
                    size = history.output_bytes
                    expected = history.events
                    label = f" ({size:,}-byte outputs)" if len(sizes) > 1 else ""
                    for name in all_projections():
                        timed = time_rebuild(size_url, name, args.batch_size, expected, local)
                        rebuild_rounds.setdefault((name, size), []).append(timed)
                        progress(
                            f"  round {round_ + 1}/{args.rounds} rebuild {name}{label}:"
                            f" {timed.rate:,.0f} events/s ({timed.seconds:.2f} s;"
                            f" this process's peak RSS so far {peak_rss_mib():,.0f} MiB)"
                        )
                    timed = time_baseline_rebuild(size_env, size_url, args.baseline_events, local)
                    rebuild_rounds.setdefault((BASELINE, size), []).append(timed)
                    progress(
                        f"  round {round_ + 1}/{args.rounds} rebuild {BASELINE}{label}:"
                        f" {timed.rate:,.0f} events/s ({timed.seconds:.2f} s)"
                    )
        if "lag" in args.parts:
            seconds = args.seconds / args.rounds
            for round_ in range(args.rounds):
                stop.clear()
                result = writers_alone_phase(ledger, args.rate, seconds, args.writers, stop, local)
                lag_rounds.setdefault(NO_FOLLOWER, []).append(result)
                _lag_progress(progress, round_, args.rounds, result)
                stop.clear()
                for result in taskledger_phase(
                    url,
                    ledger,
                    args.rate,
                    seconds,
                    args.writers,
                    args.runner_batch_size,
                    stop,
                    local,
                ):
                    lag_rounds.setdefault(result.follower, []).append(result)
                    _lag_progress(progress, round_, args.rounds, result)
                stop.clear()
                result = baseline_phase(
                    env, url, ledger, args.rate, seconds, args.writers, stop, local
                )
                lag_rounds.setdefault(BASELINE, []).append(result)
                _lag_progress(progress, round_, args.rounds, result)
            checks = check_live_views(url, args.runner_batch_size)
    rebuilds = [
        summarise_rebuild(name, rounds, size) for (name, size), rounds in rebuild_rounds.items()
    ]
    rebuilds.sort(key=lambda r: r.output_bytes, reverse=False)  # stable: views keep their order
    for rebuilt in rebuilds:
        baseline_rebuild = next(
            (r for r in rebuilds if r.view == BASELINE and r.output_bytes == rebuilt.output_bytes),
            None,
        )
        if baseline_rebuild is not None and rebuilt is not baseline_rebuild:
            rebuilt.vs_baseline = round(
                rebuilt.median_events_per_s / baseline_rebuild.median_events_per_s, 2
            )
    lags = [summarise_lag(name, rounds) for name, rounds in lag_rounds.items()]
    baseline_lag = next((r for r in lags if r.follower == BASELINE), None)
    for lag in lags:
        if baseline_lag is not None and lag is not baseline_lag and lag.p99_ms > 0:
            lag.vs_baseline_p99 = round(baseline_lag.p99_ms / lag.p99_ms, 2)
    seconds = time.perf_counter() - noise.started
    return Outcome(facts, histories, rebuilds, lags, checks, seconds, noise.other_cpu_pct())


def _lag_progress(
    progress: Callable[[str], None], round_: int, rounds: int, result: FollowerRound
) -> None:
    values = sorted(result.lags_ms)
    progress(
        f"  round {round_ + 1}/{rounds} lag {result.follower}: {result.tasks_per_s:,.0f} tasks/s,"
        f" p50 {percentile(values, 0.5):.1f} ms, p99 {percentile(values, 0.99):.1f} ms,"
        f" max {values[-1] if values else float('nan'):.1f} ms,"
        f" trend {result.trend_ms_per_s:+,.0f} ms/s"
        + (f", {result.missing} never applied" if result.missing else "")
    )


def code_version() -> dict[str, Any]:
    """The commit measured, and uncommitted changes to the code under test, if any."""
    changed = git("status", "--porcelain", "--", "ledger", "projections")
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "uncommitted": [line[3:] for line in changed.splitlines()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    code = code_version()
    outcome = run(args)
    load_after = os.getloadavg()
    settings = {
        "events": args.events,
        "baseline_events": args.baseline_events,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "rate": args.rate,
        "seconds": args.seconds,
        "writers": args.writers,
        "runner_batch_size": args.runner_batch_size,
        "output_bytes": args.output_bytes,
        "parts": args.parts,
        "targets": {
            "rebuild_events_per_s": TARGET_REBUILD_EVENTS_PER_S,
            "lag_p99_ms": TARGET_LAG_P99_MS,
        },
    }
    noise = (
        f"Run took {outcome.seconds:.0f} s; load average before/after"
        f" {load_before[0]:.2f}/{load_after[0]:.2f}"
        + (
            ""
            if outcome.other_cpu_pct is None
            else f"; other processes than this one and PostgreSQL used"
            f" {outcome.other_cpu_pct:.0f}% of one core meanwhile (noise)"
        )
        + "."
        + (
            f" Code: {str(code['commit'])[:12]}"
            + (
                f" with uncommitted changes in {', '.join(code['uncommitted'])}."
                if code["uncommitted"]
                else "."
            )
        )
    )
    print(render(outcome.facts, outcome.histories, outcome.rebuilds, outcome.lags, settings, noise))
    if not args.no_json:
        path: Path = write_results(
            NAME,
            {
                "benchmark": NAME,
                "started_at": started.isoformat(),
                "command": ["python", "-m", "bench.projections", *arguments],
                "settings": settings,
                "machine": asdict(outcome.facts),
                "code": code,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "history": asdict(outcome.histories[0]) if outcome.histories else None,
                "histories": [asdict(h) for h in outcome.histories],
                "rebuild": [asdict(r) for r in outcome.rebuilds],
                "lag": [asdict(r) for r in outcome.lags],
                "checks": outcome.checks,
                "seconds": round(outcome.seconds, 1),
                "other_cpu_pct": outcome.other_cpu_pct,
            },
        )
        eprint(f"{NAME}: raw figures in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
