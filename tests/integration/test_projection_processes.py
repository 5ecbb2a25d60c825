"""Projection processes killed for real: resume without duplicates or gaps; standby takeover."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ledger import Ledger, ManualClock, Task, TaskLimits
from projections import all_projections
from projections.admin import rebuild
from projections.base import ensure_installed
from projections.leadership import lock_key
from projections.tracking import view_position

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def write_tasks(ledger: Ledger, clock: ManualClock, count: int) -> None:
    """Many tasks quickly: aggregates saved 200 to a transaction (test data, not the API)."""
    for start in range(0, count, 200):
        tasks = []
        for n in range(start, min(count, start + 200)):
            task = Task.submit(
                task_id=uuid.uuid4(),
                now=clock.now(),
                description=f"bulk {n}",
                language="python",
                code="pass",
                data={"n": n},
                ttl_seconds=60,
                max_attempts=1,
                tenant="acme",
                submitted_by="key",
                idempotency_key=None,
                limits=TaskLimits(),
            )
            task.start_attempt(1, f"w{n % 3}", clock.now())
            tasks.append(task)
        ledger.store.save(*tasks)


@contextmanager
def projection_process(
    database_url: str, schema: str, name: str, log: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    separator = "&" if "?" in database_url else "?"
    env = {
        **os.environ,
        # application_name tells the processes' sessions apart in pg_stat_activity.
        "TASKLEDGER_DATABASE_URL": f"{database_url}{separator}application_name={name}",
        "TASKLEDGER_DATABASE_SCHEMA": schema,
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskledger", "projections", "run", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll an observable condition (database state); return how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def position(database_url: str, schema: str, name: str) -> int:
    with psycopg.connect(database_url) as conn:
        return view_position(conn, schema, name)


def snapshot(database_url: str, schema: str) -> tuple[list[Any], list[Any]]:
    with psycopg.connect(database_url) as conn:
        tasks = conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(schema, "task_status"))
        ).fetchall()
        events = conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY position").format(sql.Identifier(schema, "audit"))
        ).fetchall()
    return tasks, events


def test_a_projector_killed_mid_batch_resumes_without_duplicates_or_gaps(
    ledger: Ledger, clock: ManualClock, database_url: str, schema: str, tmp_path: Path
) -> None:
    install(database_url, schema)
    write_tasks(ledger, clock, 3_000)
    head = ledger.store.recorder.max_notification_id() or 0
    rng = random.Random(1)
    thresholds = sorted(rng.sample(range(500, head - 500), 6))
    kills = 0
    for threshold in thresholds:
        with projection_process(
            database_url, schema, "projector", tmp_path / "run.log", "--batch-size", "37"
        ) as process:
            wait_until(
                lambda t=threshold: (
                    position(database_url, schema, "audit") >= t
                    and position(database_url, schema, "task_status") >= t
                ),
                60,
                f"the views to pass position {threshold}",
            )
            process.send_signal(signal.SIGKILL)
            kills += 1
    with projection_process(
        database_url, schema, "projector", tmp_path / "run.log", "--batch-size", "37"
    ):
        for name in all_projections():
            wait_until(
                lambda n=name: position(database_url, schema, n) >= head, 60, f"{name} at head"
            )
    assert kills == len(thresholds)

    tasks, events = snapshot(database_url, schema)
    with psycopg.connect(database_url) as conn:
        positions = conn.execute(
            sql.SQL("SELECT notification_id FROM {} ORDER BY 1").format(
                sql.Identifier(schema, "taskledger_events")
            )
        ).fetchall()
    assert [e[0] for e in events] == [p for (p,) in positions], "each event once in the audit"
    assert len(tasks) == 3_000
    for projection in all_projections().values():
        rebuild(database_url, schema, projection)
    assert snapshot(database_url, schema) == (tasks, events), "live view != rebuilt view"


def install(database_url: str, schema: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for projection in all_projections().values():
            ensure_installed(conn, schema, projection)


def leader(database_url: str, schema: str) -> str | None:
    """The application name of the session holding task_status's leader lock (only that
    lock: a process starting up briefly holds the schema-creation lock too)."""
    key = lock_key("projection", schema, "task_status")
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid"
            " AND a.application_name LIKE 'standby-test-%%'",
            (key,),
        ).fetchone()
    return row[0] if row else None


def test_a_standby_takes_over_when_the_leader_is_killed(
    ledger: Ledger, clock: ManualClock, database_url: str, schema: str, tmp_path: Path
) -> None:
    install(database_url, schema)
    args = ("--only", "task_status")
    with (
        projection_process(database_url, schema, "standby-test-a", tmp_path / "a.log", *args) as a,
        projection_process(database_url, schema, "standby-test-b", tmp_path / "b.log", *args) as b,
    ):
        wait_until(lambda: leader(database_url, schema) is not None, 30, "a leader to be elected")
        first = leader(database_url, schema)
        assert first is not None
        processes = {"standby-test-a": a, "standby-test-b": b}
        write_tasks(ledger, clock, 10)
        head = ledger.store.recorder.max_notification_id() or 0
        wait_until(lambda: position(database_url, schema, "task_status") >= head, 10, "leader")

        processes[first].send_signal(signal.SIGKILL)
        processes[first].wait(10)
        write_tasks(ledger, clock, 10)
        head = ledger.store.recorder.max_notification_id() or 0
        took = wait_until(
            lambda: position(database_url, schema, "task_status") >= head, 30, "the standby"
        )
        assert leader(database_url, schema) not in (None, first)
        print(f"standby caught up {took:.2f} s after the leader was killed")
