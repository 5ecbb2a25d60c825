"""A ledger history to rebuild the views from, written quickly; and a timed rebuild.

Task aggregates are saved 200 to a transaction (fewer when their outputs are large), with
some variety: most tasks are submitted, started and completed (4 events); one in 20 each
fails and is retried automatically, then completes (7), fails for good (4), is cancelled
while pending (3) or while running (4); 7 tenants, 4 workers (~4.1 events a task). The
events table is then ``VACUUM ANALYZE``d, as autovacuum would have done in a live system.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from ledger import AttemptError, AttemptResult, Ledger, RetryPolicy, Task, TaskLimits
from ledger.log import EVENTS_TABLE
from projections import all_projections
from projections.admin import rebuild

SCHEMA = "public"  # the ledger's default schema (TASKLEDGER_DATABASE_SCHEMA)
RESULT = AttemptResult(stdout="42\n", exit_code=0, duration_ms=12.5)
KINDS = ("completed", "retried", "failed", "cancelled_pending", "cancelled_running")
# Bytes of program output per save: a save is one transaction, held in memory whole.
SAVE_OUTPUT_BYTES = 16 * 1024 * 1024


@dataclass
class History:
    tasks: int
    events: int
    seconds: float
    output_bytes: int  # each completed attempt's stdout
    table_bytes: int  # the events table on disk, TOAST and indexes included


def output_result(output_bytes: int) -> AttemptResult:
    """A completed attempt whose stdout is `output_bytes` ASCII bytes: "42\\n", then random
    base64 text. PostgreSQL compresses large values (TOAST): real output is rarely one
    repeated character, and compression would hide the cost being measured."""
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


def write_history(
    ledger: Ledger, url: str, events: int, progress: Callable[[str], None], output_bytes: int = 3
) -> History:
    """At least `events` events into `ledger` (whose database is `url`), then VACUUM
    ANALYZE; each completed attempt's stdout is `output_bytes` bytes."""
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
            progress(f"  wrote {written:,} events ({tasks:,} tasks)")
    seconds = time.perf_counter() - started
    table = sql.Identifier(SCHEMA, EVENTS_TABLE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
        row = conn.execute(
            "SELECT pg_total_relation_size(%s::regclass)", (f"{SCHEMA}.{EVENTS_TABLE}",)
        ).fetchone()
    progress(
        f"  history: {written:,} events of {tasks:,} tasks ({output_bytes:,}-byte outputs)"
        f" in {seconds:.1f} s"
    )
    return History(tasks, written, seconds, output_bytes, int(row[0]) if row else 0)


def time_rebuild(url: str, name: str, expected: int, batch_size: int = 5_000) -> float:
    """Rebuild view `name` from position 0 (as `taskledger projections rebuild NAME`
    does); its events/s as `rebuild()` reports them. Checks it applied `expected` events."""
    report = rebuild(url, SCHEMA, all_projections()[name], batch_size=batch_size)
    if report.events != expected:
        raise AssertionError(f"rebuild of {name} applied {report.events}, expected {expected}")
    return report.events / report.seconds if report.seconds else 0.0
