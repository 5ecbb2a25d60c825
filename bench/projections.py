"""Rebuild speed of the views, against eventsourcing's own ProjectionRunner.

``python -m bench projections [--events 100000] [--output-bytes 3] [--quick]``. In a fresh
database (dropped afterwards), ``--events`` events are written: tasks saved 200 to a
transaction (fewer when their outputs are large), most submitted, started and completed;
one in 20 each retried then completed, failed for good, cancelled while pending or while
running; 7 tenants; each completed attempt's stdout ``--output-bytes`` long; then
``VACUUM ANALYZE``, as autovacuum would. In each of ``--rounds`` rounds,
``projections.admin.rebuild()`` of each view is timed (a new generation from position 0,
as ``taskledger projections rebuild NAME`` does). Baseline, same rounds, same events: the
library's ``ProjectionRunner`` following the same table (with the Ledger's mapper) into a
minimal view that writes one row per event and its tracking record in one transaction
(the library's tutorial's way). It applies one event per transaction, so it gets the first
``--baseline-events`` only; its time runs from constructing the runner to the commit of
the last of them. The goal (issue 18): each view rebuilds at least 25x as many events/s as
that runner, judged on the ratio within each round (the median of the rounds').
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import random
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection as LibraryProjection
from eventsourcing.projection import ProjectionRunner as LibraryRunner
from psycopg import sql

from bench.goals import TASKLEDGER, Goal, Record
from bench.report import Run, eprint, markdown_table, median, over_rounds, parser
from bench.services import temporary_database
from ledger import AttemptError, AttemptResult, Ledger, RetryPolicy, Task, TaskLimits
from ledger.connections import postgres_env
from ledger.log import EVENTS_TABLE
from ledger.store import EventStore
from projections import all_projections
from projections.admin import rebuild

NAME = "projections"
BASELINE = "eventsourcing ProjectionRunner"
# The goal of issue 18: >= 25x the library's runner, on the same events in the same round.
REBUILD_GOAL = Goal(25, "eventsourcing's runner", "rebuild.baseline", TASKLEDGER, at_least=True)
CATCH_UP = 120.0  # seconds the library's runner may take to reach its last event
SCHEMA = "public"  # the ledger's default schema (TASKLEDGER_DATABASE_SCHEMA)
RESULT = AttemptResult(stdout="42\n", exit_code=0, duration_ms=12.5)
KINDS = ("completed", "retried", "failed", "cancelled_pending", "cancelled_running")
SAVE_OUTPUT_BYTES = 16 * 1024 * 1024  # of program output per save (one transaction)


def output_result(output_bytes: int) -> AttemptResult:
    """A completed attempt whose stdout is `output_bytes` ASCII bytes of random base64
    text: PostgreSQL compresses large values, and one repeated character would hide the
    cost being measured."""
    if output_bytes == len(RESULT.stdout):
        return RESULT
    filler = random.Random(output_bytes).randbytes(output_bytes * 3 // 4 + 3)
    text = RESULT.stdout + base64.b64encode(filler).decode()
    return dataclasses.replace(RESULT, stdout=text[:output_bytes])


def _task(n: int, base: datetime, policy: RetryPolicy, result: AttemptResult) -> Task:
    """Task `n` with its whole life as pending events (its kind: KINDS, one in 20 each)."""
    at = base + timedelta(milliseconds=n)
    kind = KINDS[n % 20] if n % 20 < len(KINDS) else "completed"
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
        limits=TaskLimits(),
    )
    step = timedelta(milliseconds=5)
    if kind == "cancelled_pending":
        task.cancel("admin", "not needed", at + step)
        return task
    task.start_attempt(1, f"worker-{n % 4}", at + step)
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
    return task


def write_history(ledger: Ledger, url: str, events: int, output_bytes: int) -> dict[str, int]:
    """At least `events` events into `ledger` (whose database is `url`), then VACUUM
    ANALYZE; the events, tasks and the table's bytes (TOAST and indexes included)."""
    result = output_result(output_bytes)
    per_save = max(1, min(200, SAVE_OUTPUT_BYTES // max(1, output_bytes)))
    policy = RetryPolicy()
    base = datetime.now(UTC) - timedelta(days=1)
    written = tasks = 0
    started = time.perf_counter()
    while written < events:
        batch: list[Task] = []
        while len(batch) < per_save and written < events:
            batch.append(_task(tasks, base, policy, result))
            written += len(batch[-1].pending_events)
            tasks += 1
        ledger.store.save(*batch)
        if tasks % 10_000 < len(batch):
            eprint(f"  wrote {written:,} events ({tasks:,} tasks)")
    eprint(f"  history: {written:,} events in {time.perf_counter() - started:.1f} s")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(SCHEMA, EVENTS_TABLE)))
        row = conn.execute(
            "SELECT pg_total_relation_size(%s::regclass)", (f"{SCHEMA}.{EVENTS_TABLE}",)
        ).fetchone()
    return {"events": written, "tasks": tasks, "table_bytes": int(row[0]) if row else 0}


def time_rebuild(url: str, name: str, expected: int) -> float:
    """Rebuild view `name` from position 0; its events/s as `rebuild()` reports them."""
    report = rebuild(url, SCHEMA, all_projections()[name], batch_size=5_000)
    if report.events != expected:
        raise AssertionError(f"rebuild of {name} applied {report.events}, expected {expected}")
    return report.events / report.seconds if report.seconds else 0.0


class BaselineView(PostgresTrackingRecorder):
    """A view the library's way: a tracking recorder that also owns a table, writes a row
    and the tracking record in one transaction, and notes when each commit happened."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        table = sql.Identifier(self.datastore.schema, "benchbaseline_rows")
        self.sql_create_statements.append(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (position bigint PRIMARY KEY, task_id uuid,"
                " version int, type text, at timestamptz)"
            ).format(table)
        )
        self.insert_row = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(table)
        self.commits: list[tuple[int, float]] = []  # (position, perf_counter)

    def write(self, event: Any, tracking: Tracking) -> None:
        row = (event.originator_id, event.originator_version, type(event).__name__)
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self.insert_row, (tracking.notification_id, *row, event.timestamp))
            self._insert_tracking(curs, tracking)
        self.commits.append((tracking.notification_id, time.perf_counter()))


class BaselineProjection(LibraryProjection[BaselineView]):
    name = "BenchBaseline"  # tables benchbaseline_tracking, benchbaseline_rows

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.write(domain_event, tracking)


def baseline_rebuild(env: dict[str, str], url: str, events: int) -> float:
    """The library's runner from position 0 to the `events`th event: events/s. Its
    connections skip the pool's pre-ping (the library's default; the ledger's is on)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("benchbaseline_rows", "benchbaseline_tracking"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        query = "SELECT notification_id FROM {} ORDER BY notification_id OFFSET %s LIMIT 1"
        row = conn.execute(
            sql.SQL(query).format(sql.Identifier(SCHEMA, EVENTS_TABLE)), (events - 1,)
        ).fetchone()
    assert row is not None
    target = int(row[0])
    env = env | {"BENCHBASELINE_POSTGRES_PRE_PING": "n"}
    started = time.perf_counter()
    with LibraryRunner(
        application_class=EventStore,
        projection_class=BaselineProjection,
        view_class=BaselineView,
        env=env,
    ) as runner:
        commits: Sequence[tuple[int, float]] = runner.view.commits
        deadline = time.monotonic() + CATCH_UP
        while not commits or commits[-1][0] < target:
            runner.run_forever(timeout=0.005)  # re-raises an error of its processing thread
            if time.monotonic() > deadline:
                raise AssertionError(f"the library's runner did not reach {target}")
    finished = commits[bisect.bisect_left(commits, (target, float("-inf")))][1]
    return events / (finished - started)


def main(argv: Sequence[str]) -> int:
    p = parser(NAME, __doc__)
    p.add_argument("--events", type=int, default=100_000, help="events to rebuild (100,000)")
    p.add_argument("--baseline-events", type=int, default=10_000, help="of those, the library's")
    p.add_argument("--output-bytes", type=int, default=3, help="each completed attempt's stdout")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.baseline_events, args.rounds = 5_000, 500, 1
    run = Run(NAME, argv)
    rebuilds: dict[str, list[float]] = {}
    with temporary_database(args.database_url) as url:
        header = run.header(url)
        eprint(f"{NAME}: {header}")
        env = postgres_env(url, schema=SCHEMA)
        ledger = Ledger(env)
        try:
            history = write_history(ledger, url, args.events, args.output_bytes)
        finally:
            ledger.close()
        events = history["events"]
        for round_ in range(args.rounds):
            for name in all_projections():
                rebuilds.setdefault(name, []).append(time_rebuild(url, name, events))
            rate = baseline_rebuild(env, url, min(args.baseline_events, events))
            rebuilds.setdefault(BASELINE, []).append(rate)
            said = ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rebuilds.items())
            eprint(f"  round {round_ + 1} rebuild, events/s: {said}")
    record = Record(args.rounds)
    for name, rates in rebuilds.items():
        key = "rebuild.baseline" if name == BASELINE else f"rebuild.{name}"
        for round_, rate in enumerate(rates, start=1):
            record.put(key, TASKLEDGER, round_, rate)
    base = median(rebuilds[BASELINE]) or 1.0
    rows = []
    for name, rates in rebuilds.items():
        goal = ["-", "-"]
        if name != BASELINE:
            goal = [REBUILD_GOAL.text(), REBUILD_GOAL.verdict(f"rebuild.{name}", record)]
        rows.append([name, over_rounds(rates, 0), f"{(median(rates) or 0) / base:.1f}x", *goal])
    print(
        f"# {NAME}: {header}\n\nRebuild: {events:,} events of {history['tasks']:,} tasks,"
        f" stdout of {args.output_bytes:,} bytes per completed attempt (events table"
        f" {history['table_bytes'] / 2**20:,.1f} MiB), {args.rounds} rounds; baseline:"
        f" eventsourcing's ProjectionRunner, 1 event per transaction, first"
        f" {args.baseline_events:,} events.\n\n"
        + markdown_table(["view", "events/s", "vs baseline", "goal", "met?"], rows)
        + f"\n\n{run.footer()}"
    )
    run.keep({"settings": vars(args), "rebuild": rebuilds, "history": history}, args.no_json)
    return 0
