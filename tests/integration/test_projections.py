"""The views against real PostgreSQL: live, batched, exactly once, rebuildable, queryable."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg import sql

from ledger import AttemptError, AttemptResult, Ledger, ManualClock
from ledger import log as event_log
from ledger.errors import LedgerError
from ledger.targets import TERMINAL_EVENTS
from ledger.webhooks import delivery_id
from projections import (
    AuditProjection,
    TaskPeriodsProjection,
    TaskStatusProjection,
    WebhookDeliveriesProjection,
    all_projections,
)
from projections.admin import rebuild, status
from projections.base import ensure_installed
from projections.queries import (
    InvalidCursor,
    TaskFilter,
    audit_events,
    contains_pattern,
    counts_by_status,
    list_keys,
    list_tasks,
    wait_for_position,
)
from projections.runner import ProjectionRunner, apply_batch, apply_group
from projections.tracking import Generation, PositionConflict, advance_many, current_generation

pytestmark = pytest.mark.postgres

STATUS = TaskStatusProjection()
AUDIT = AuditProjection()
PERIODS = TaskPeriodsProjection()
DELIVERIES = WebhookDeliveriesProjection()


@pytest.fixture
def conn(database_url: str, ledger: Ledger, schema: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url) as connection:
        connection.autocommit = True
        for projection in all_projections().values():
            ensure_installed(connection, schema, projection)
        connection.autocommit = False
        yield connection


def catch_up(conn: psycopg.Connection[Any], schema: str, batch_size: int = 500) -> None:
    for projection in all_projections().values():
        while apply_batch(conn, schema, projection, batch_size)[1]:
            pass


def submit(ledger: Ledger, n: int = 0, **fields: Any) -> uuid.UUID:
    values: dict[str, Any] = {
        "description": f"task {n}",
        "language": "python",
        "code": "print(1)",
        "data": {"n": n},
        "ttl_seconds": 60,
        "max_attempts": 2,
        "tenant": "acme",
        "submitted_by": "key",
    }
    values.update(fields)
    return ledger.submit(**values).task.id


# -- what the views should say, computed from the aggregates -----------------------------------

MODEL_FIELDS = (
    "tenant",
    "description",
    "language",
    "attempt",
    "max_attempts",
    "ttl_seconds",
    "deadline",
    "not_before",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "worker_id",
    "version",
)


def expected_row(ledger: Ledger, task_id: uuid.UUID) -> dict[str, Any]:
    task = ledger.get(task_id)
    row = {name: getattr(task, name) for name in MODEL_FIELDS}
    row["status"] = str(task.status)
    row["error_kind"] = task.error["kind"] if task.error else None
    return row


def view_rows(conn: psycopg.Connection[Any], schema: str, ids: list[uuid.UUID]) -> dict[Any, Any]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute(
            sql.SQL("SELECT * FROM {} WHERE id = ANY(%s)").format(
                sql.Identifier(schema, "task_status")
            ),
            (ids,),
        ).fetchall()
    conn.commit()
    return {r["id"]: {k: r[k] for k in (*MODEL_FIELDS, "status", "error_kind")} for r in rows}


def audit_rows(conn: psycopg.Connection[Any], schema: str, task_id: uuid.UUID) -> list[Any]:
    rows = conn.execute(
        sql.SQL(
            "SELECT version, type, payload FROM {} WHERE task_id = %s ORDER BY position"
        ).format(sql.Identifier(schema, "audit")),
        (task_id,),
    ).fetchall()
    conn.commit()
    return rows


def expected_audit(ledger: Ledger, task_id: uuid.UUID) -> list[Any]:
    return [
        (h.version, h.type, orjson.loads(orjson.dumps(h.data))) for h in ledger.history(task_id)
    ]


def snapshot(conn: psycopg.Connection[Any], schema: str) -> tuple[list[Any], ...]:
    tasks = conn.execute(
        sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(schema, "task_status"))
    ).fetchall()
    events = conn.execute(
        sql.SQL("SELECT * FROM {} ORDER BY position").format(sql.Identifier(schema, "audit"))
    ).fetchall()
    periods = conn.execute(
        sql.SQL("SELECT * FROM {} ORDER BY id, version").format(
            sql.Identifier(schema, "task_periods")
        )
    ).fetchall()
    deliveries = conn.execute(
        sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(schema, "webhook_deliveries"))
    ).fetchall()
    conn.commit()
    return tasks, events, periods, deliveries


# -- random histories: live in random batches == rebuilt from zero == the aggregates ------------

operations = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "submit",
                "start",
                "complete",
                "fail",
                "fail_permanently",
                "expire",
                "cancel",
                "retry",
                "describe",
                "patch_data",
                "patch_ttl",
                "patch_max_attempts",
                "hook_url",
                "hook_default",
                "deliver",
                "time",
            ]
        ),
        st.integers(0, 4),
    ),
    min_size=15,
    max_size=60,
)


def perform(ledger: Ledger, clock: ManualClock, ids: list[uuid.UUID], op: str, k: int) -> None:
    if op == "submit" or not ids:
        url = f"https://hooks.example.com/{len(ids)}" if len(ids) % 2 else None
        ids.append(submit(ledger, len(ids), ttl_seconds=30, max_attempts=2, callback_url=url))
        return
    if op == "hook_default":
        ledger.webhooks.set_default(
            "acme",
            None if k == 0 else f"https://default.example.com/{k}",
            None if k % 2 else ["AttemptStarted", "AttemptFailed", "TaskCancelled"],
            by="admin",
        )
        return
    task_id = ids[k % len(ids)]
    attempt = ledger.get(task_id).attempt
    actions = {
        "start": lambda: ledger.start_attempt(task_id, attempt, f"w{k}"),
        "complete": lambda: ledger.complete_attempt(task_id, attempt, AttemptResult(stdout="ok")),
        "fail": lambda: ledger.fail_attempt(
            task_id, attempt, AttemptError("program_error", "boom"), retryable=True
        ),
        "fail_permanently": lambda: ledger.fail_attempt(
            task_id, attempt, AttemptError("compile_error", "bad"), retryable=False
        ),
        "expire": lambda: ledger.expire(task_id, attempt, detected_by="reaper"),
        "cancel": lambda: ledger.cancel(task_id, by="key"),
        "retry": lambda: ledger.retry(task_id, by="key", ttl_seconds=20),
        "describe": lambda: ledger.update(task_id, {"description": f"d{k}"}, by="key"),
        "patch_data": lambda: ledger.update(task_id, {"data": {"k": k}}, by="key"),
        "patch_ttl": lambda: ledger.update(task_id, {"ttl_seconds": 40 + k}, by="key"),
        "patch_max_attempts": lambda: ledger.update(task_id, {"max_attempts": k + 1}, by="key"),
        "hook_url": lambda: ledger.update(
            task_id, {"callback_url": f"https://hooks.example.com/p{k}" if k else None}, by="key"
        ),
        "deliver": lambda: record_delivery(ledger, clock, task_id, k),
        "time": lambda: clock.advance(7 * k + 1),
    }
    try:
        actions[op]()
    except LedgerError as refused:
        event(f"{op}: refused ({type(refused).__name__})")  # nothing written to project
    else:
        event(f"{op}: applied")


def expected_deliveries(
    conn: psycopg.Connection[Any], schema: str, ids: set[uuid.UUID]
) -> tuple[set[tuple[uuid.UUID, int, str]], set[uuid.UUID]]:
    """(task id, trigger version, URL) of each delivery `ids` are owed, and which of them
    ever had a subscription of their own: the rule of the webhook_deliveries view, folded
    from the whole log one event at a time, without its rows or batches."""
    changes = event_log.read_changes(conn, schema, 0, 10**9)
    retried = {
        (c.task_id, c.version - 1)
        for c in changes
        if c.type == "AttemptScheduled" and c.data.get("reason") == "auto-retry"
    }
    tenant_of_settings: dict[uuid.UUID, str] = {}
    defaults: dict[str, tuple[str | None, list[str] | None]] = {}
    tasks: dict[uuid.UUID, tuple[str, str | None, list[str] | None]] = {}
    owed: set[tuple[uuid.UUID, int, str]] = set()
    subscribed: set[uuid.UUID] = set()
    for c in changes:
        if c.type == "SettingsCreated":
            tenant_of_settings[c.task_id] = c.data["tenant"]
        elif c.type == "WebhookDefaultSet":
            defaults[tenant_of_settings[c.task_id]] = (
                c.data["callback_url"],
                c.data["callback_events"],
            )
        elif c.type == "TaskSubmitted":
            url, events = c.data.get("callback_url"), c.data.get("callback_events")
            tasks[c.task_id] = (c.data["tenant"], url, events)
            if url is not None or events is not None:
                subscribed.add(c.task_id)
        elif c.type == "TaskUpdated":
            tenant, url, events = tasks[c.task_id]
            patch = c.data["changes"]
            if "callback_url" in patch or "callback_events" in patch:
                subscribed.add(c.task_id)
            tasks[c.task_id] = (
                tenant,
                patch.get("callback_url", url),
                patch.get("callback_events", events),
            )
        elif c.stream == "Task" and c.type != "WebhookAttempted":
            tenant, url, events = tasks[c.task_id]
            default_url, default_events = defaults.get(tenant, (None, None))
            names = events if url is not None or events is not None else default_events
            if names is None:
                sent = c.type in TERMINAL_EVENTS and not (
                    c.type == "AttemptFailed" and (c.task_id, c.version) in retried
                )
            else:
                sent = c.type in names
            target = url or default_url
            if sent and target is not None and c.task_id in ids:
                owed.add((c.task_id, c.version, target))
    return owed, subscribed & ids


def owed_urls(conn: psycopg.Connection[Any], schema: str, task_id: uuid.UUID) -> list[str]:
    rows = conn.execute(
        sql.SQL(
            "SELECT url FROM {} WHERE kind = 'delivery' AND task_id = %s ORDER BY trigger_version"
        ).format(sql.Identifier(schema, "webhook_deliveries")),
        (task_id,),
    ).fetchall()
    conn.commit()
    return [url for (url,) in rows]


def test_a_tenants_default_callback_never_gets_another_tenants_tasks(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    """A task without a callback of its own has no row in the view, and its tenant is
    read back from its TaskSubmitted: a default set by another tenant, before or after the
    task was submitted, must not receive its events."""
    ledger.webhooks.set_default("evil", "https://default.example.com/evil", None, by="admin")
    early = submit(ledger, 1, tenant="acme")
    catch_up(conn, schema)  # the task is applied in an earlier batch than its outcome
    ledger.webhooks.set_default("acme", "https://default.example.com/acme", None, by="admin")
    late = submit(ledger, 2, tenant="acme")
    other = submit(ledger, 3, tenant="evil")
    for task_id in (early, late, other):
        ledger.cancel(task_id, by="key")
    catch_up(conn, schema)  # one batch: both tenants' defaults are at hand in it
    assert owed_urls(conn, schema, early) == ["https://default.example.com/acme"]
    assert owed_urls(conn, schema, late) == ["https://default.example.com/acme"]
    assert owed_urls(conn, schema, other) == ["https://default.example.com/evil"]


def record_delivery(ledger: Ledger, clock: ManualClock, task_id: uuid.UUID, k: int) -> None:
    """A WebhookAttempted for the task's last terminal event (delivery owed or not)."""
    triggers = [h for h in ledger.history(task_id) if h.type in TERMINAL_EVENTS]
    if not triggers:
        raise LedgerError("nothing to deliver yet")
    trigger = triggers[-1]
    outcome = ("failed", "delivered", "gave-up")[k % 3]
    ledger.record_webhook_attempt(
        task_id,
        delivery_id=delivery_id(task_id, trigger.version),
        trigger_version=trigger.version,
        trigger_type=trigger.type,
        url="https://hooks.example.com/x",
        delivery_attempt=k + 1,
        outcome=outcome,
        status_code=200 if outcome == "delivered" else 500,
        error=None if outcome == "delivered" else "HTTP 500",
        next_attempt_at=clock.now() + timedelta(seconds=10) if outcome == "failed" else None,
    )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations, batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5))
def test_views_built_live_in_any_batches_equal_a_rebuild_and_the_aggregates(
    ledger: Ledger,
    clock: ManualClock,
    conn: psycopg.Connection[Any],
    database_url: str,
    schema: str,
    ops: list[tuple[str, int]],
    batch_sizes: list[int],
) -> None:
    ids: list[uuid.UUID] = []
    moments: dict[datetime, dict[uuid.UUID, tuple[str, int]]] = {}  # the last state at each
    for step, (op, k) in enumerate(ops):
        perform(ledger, clock, ids, op, k)
        moments[clock.now()] = {
            i: (str(task.status), task.version) for i in ids for task in [ledger.get(i)]
        }
        if step % 3 == 0:  # apply part of what is there, in a random batch size
            for projection in (STATUS, AUDIT, PERIODS, DELIVERIES):
                apply_batch(conn, schema, projection, batch_sizes[step % len(batch_sizes)])
    catch_up(conn, schema, batch_size=batch_sizes[0])

    assert view_rows(conn, schema, ids) == {i: expected_row(ledger, i) for i in ids}
    for task_id in ids:
        assert audit_rows(conn, schema, task_id) == expected_audit(ledger, task_id)
    # The list as of any moment: the tasks that existed then, as they were then.
    for at, expected in moments.items():
        page = list_tasks(conn, schema, tenant=None, as_of=at, limit=100_000)
        listed = {row["id"]: (row["status"], row["version"]) for row in page.items}
        # (the schema keeps the tasks of earlier examples: those are not this history's)
        assert {i: state for i, state in listed.items() if i in set(ids)} == expected
    conn.commit()

    # The deliveries owed are exactly those the rule gives, folded one event at a time, and
    # only a task with a subscription of its own has a row.
    with conn.cursor() as cur:
        owed = cur.execute(
            sql.SQL(
                "SELECT task_id, trigger_version, trigger_type, url, state FROM {}"
                " WHERE kind = 'delivery' AND task_id = ANY(%s)"
            ).format(sql.Identifier(schema, "webhook_deliveries")),
            (ids,),
        ).fetchall()
        task_rows = {
            task_id
            for (task_id,) in cur.execute(
                sql.SQL("SELECT id FROM {} WHERE kind = 'task' AND id = ANY(%s)").format(
                    sql.Identifier(schema, "webhook_deliveries")
                ),
                (ids,),
            ).fetchall()
        }
    expected_owed, subscribed = expected_deliveries(conn, schema, set(ids))
    conn.commit()
    assert {(t, v, url) for t, v, _, url, _ in owed} == expected_owed
    assert task_rows == subscribed
    for task_id, version, kind, _, state in owed:
        assert ledger.history(task_id)[version - 1].type == kind
        assert state in ("pending", "delivered", "gave-up")
        event(f"delivery owed for {kind}: {state}")

    live = snapshot(conn, schema)
    for projection in (STATUS, AUDIT, PERIODS, DELIVERIES):
        rebuild(database_url, schema, projection, batch_size=50)
    assert snapshot(conn, schema) == live


# -- following the log live ----------------------------------------------------------------------


@pytest.fixture
def runners(database_url: str, schema: str, ledger: Ledger) -> Iterator[list[ProjectionRunner]]:
    started = [
        ProjectionRunner(database_url, schema, p, poll_interval=0.5, standby_interval=0.1)
        for p in all_projections().values()
    ]
    for runner in started:
        runner.start()
    yield started
    for runner in started:
        runner.stop()


def head(ledger: Ledger) -> int:
    return ledger.store.recorder.max_notification_id() or 0


def test_runners_follow_new_events(ledger: Ledger, runners: list[ProjectionRunner]) -> None:
    task_id = submit(ledger)
    ledger.start_attempt(task_id, 1, "w1")
    for runner in runners:
        assert runner.wait_for(head(ledger), timeout=10), runner.name


class PoisonedStatus(TaskStatusProjection):
    """A view that cannot apply an AttemptStarted: a bug, or an event it does not know."""

    name = "poisoned_status"

    def apply(self, cur: Any, schema: str, table: Any, changes: Any) -> None:
        if any(c.type == "AttemptStarted" for c in changes):
            raise RuntimeError("cannot apply AttemptStarted")
        super().apply(cur, schema, table, changes)


class FreshStatus(TaskStatusProjection):
    """A view a new release adds: it starts at position 0 behind the others."""

    name = "fresh_status"


def positions(conn: psycopg.Connection[Any], schema: str, *names: str) -> dict[str, int]:
    found = {n: current_generation(conn, schema, n).position for n in names}
    conn.commit()
    return found


def test_one_runner_applies_a_batch_to_every_view_in_one_transaction(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task_id = submit(ledger)
    ledger.start_attempt(task_id, 1, "w1")
    views = list(all_projections().values())
    results, behind = apply_group(conn, schema, views, batch_size=500)
    assert behind == []
    assert {applied.generation.position for applied in results} == {head(ledger)}
    # One transaction: every tracking row was moved at the same now().
    stamps = conn.execute(
        sql.SQL(
            "SELECT DISTINCT t.updated_at FROM {}.projection_tracking t"
            " JOIN {}.projection_current c USING (projection, generation)"
            " WHERE projection = ANY(%s)"
        ).format(sql.Identifier(schema), sql.Identifier(schema)),
        ([v.name for v in views],),
    ).fetchall()
    conn.commit()
    assert len(stamps) == 1
    assert view_rows(conn, schema, [task_id]) == {task_id: expected_row(ledger, task_id)}


def test_a_view_far_behind_is_left_to_catch_up_on_its_own(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    for n in range(8):
        submit(ledger, n)
    catch_up(conn, schema)
    ensure_installed(conn, schema, FreshStatus())
    conn.commit()
    submit(ledger, 99)
    results, behind = apply_group(conn, schema, [STATUS, FreshStatus()], batch_size=4)
    assert [p.name for p in behind] == ["fresh_status"]
    assert [(a.generation.projection, a.generation.position) for a in results] == [
        ("task_status", head(ledger))
    ]
    assert positions(conn, schema, "fresh_status") == {"fresh_status": 0}


def test_a_view_that_cannot_apply_an_event_stalls_only_itself(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str, database_url: str
) -> None:
    catch_up(conn, schema)
    ensure_installed(conn, schema, PoisonedStatus())
    conn.commit()
    start = head(ledger)
    runner = ProjectionRunner(
        database_url, schema, [PoisonedStatus(), STATUS], poll_interval=0.2, standby_interval=0.1
    )
    runner.start()
    try:
        assert runner.is_leader.wait(10)
        task_id = submit(ledger)
        submitted = head(ledger)
        assert wait_for_position(database_url, schema, "poisoned_status", submitted, 10)
        ledger.start_attempt(task_id, 1, "w1")
        ledger.cancel(submit(ledger, 1), by="key")
        assert wait_for_position(database_url, schema, "task_status", head(ledger), 10)
    finally:
        runner.stop()
    assert start < submitted < head(ledger)
    assert positions(conn, schema, "poisoned_status") == {"poisoned_status": submitted}
    assert view_rows(conn, schema, [task_id]) == {task_id: expected_row(ledger, task_id)}


def test_a_lost_notification_does_not_stall_the_view(
    ledger: Ledger, database_url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runner listens on a channel nobody notifies: only its safety-net poll is left.
    monkeypatch.setattr(event_log, "EVENTS_CHANNEL", "taskledger_nobody_notifies")
    runner = ProjectionRunner(database_url, schema, STATUS, poll_interval=0.2)
    runner.start()
    try:
        assert runner.is_leader.wait(10)
        submit(ledger)
        assert runner.wait_for(head(ledger), timeout=10)
    finally:
        runner.stop()


def test_read_your_writes_waits_for_the_position(
    ledger: Ledger, database_url: str, schema: str, runners: list[ProjectionRunner]
) -> None:
    submit(ledger)
    position = head(ledger)
    assert wait_for_position(database_url, schema, "task_status", position, timeout=10)
    assert not wait_for_position(database_url, schema, "task_status", position + 100, 0.3)


def test_a_position_already_moved_past_is_refused(
    conn: psycopg.Connection[Any], ledger: Ledger, schema: str
) -> None:
    submit(ledger)
    catch_up(conn, schema)
    with conn.transaction(), pytest.raises(PositionConflict, match="another process"):
        advance_many(conn, schema, [(Generation("task_status", 1, 0), head(ledger))])


def test_rebuild_while_tasks_are_written_and_followed(
    ledger: Ledger,
    database_url: str,
    schema: str,
    conn: psycopg.Connection[Any],
    runners: list[ProjectionRunner],
) -> None:
    ids = [submit(ledger, n) for n in range(300)]
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            task_id = submit(ledger, 1000 + n)
            ledger.start_attempt(task_id, 1, "w")
            ids.append(task_id)
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reports = [rebuild(database_url, schema, p, batch_size=100) for p in (STATUS, AUDIT)]
    finally:
        stop.set()
        thread.join()
    assert [r.new_generation for r in reports] == [2, 2]
    for runner in runners:
        assert runner.wait_for(head(ledger), timeout=10)
    assert view_rows(conn, schema, ids) == {i: expected_row(ledger, i) for i in ids}
    events = conn.execute(
        sql.SQL("SELECT count(*), count(DISTINCT position) FROM {}").format(
            sql.Identifier(schema, "audit")
        )
    ).fetchone()
    assert events == (head(ledger), head(ledger))
    tables = {
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
        ).fetchall()
    }
    assert {"task_status_g2", "audit_g2"} <= tables
    assert not {"task_status_g1", "audit_g1"} & tables
    assert {s.name: s.lag for s in status(conn, schema)} == {
        "api_keys": 0,
        "audit": 0,
        "task_periods": 0,
        "task_status": 0,
        "webhook_deliveries": 0,
    }


# -- queries -------------------------------------------------------------------------------------


def test_keyset_pages_cover_every_task_once_newest_first(
    ledger: Ledger, clock: ManualClock, conn: psycopg.Connection[Any], schema: str
) -> None:
    ids = []
    for n in range(23):
        ids.append(submit(ledger, n))
        clock.advance(1 if n % 3 else 0)  # some tasks share a creation time
    submit(ledger, 99, tenant="globex")
    catch_up(conn, schema)
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        page = list_tasks(conn, schema, tenant="acme", limit=5, cursor=cursor)
        seen += [row["id"] for row in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(ids)
    keys = [
        (r["created_at"], r["id"]) for r in list_tasks(conn, schema, tenant="acme", limit=50).items
    ]
    assert keys == sorted(keys, reverse=True)


def test_list_filters(
    ledger: Ledger, clock: ManualClock, conn: psycopg.Connection[Any], schema: str
) -> None:
    first = submit(ledger, 1)
    clock.advance(10)
    second = submit(ledger, 2, language="csharp")
    ledger.start_attempt(second, 1, "w")
    clock.advance(10)
    third = submit(ledger, 3)
    ledger.cancel(third, by="key")
    catch_up(conn, schema)

    def ids(**filters: Any) -> set[uuid.UUID]:
        chosen = TaskFilter(**filters)
        return {r["id"] for r in list_tasks(conn, schema, tenant="acme", filters=chosen).items}

    assert ids(statuses=["Pending"]) == {first}
    assert ids(statuses=["InProgress", "Cancelled"]) == {second, third}
    assert ids(language="csharp") == {second}
    created = ledger.get(second).created_at
    assert ids(created_after=created) == {third}
    assert ids(created_before=created) == {first}
    assert ids(
        created_after=created - timedelta(seconds=1), created_before=created + timedelta(seconds=1)
    ) == {second}
    assert list_tasks(conn, schema, tenant="globex").items == []
    assert len(list_tasks(conn, schema, tenant=None).items) == 3
    assert counts_by_status(conn, schema, tenant="acme") == {
        "Pending": 1,
        "InProgress": 1,
        "Cancelled": 1,
    }


@pytest.mark.parametrize("cursor", ["garbage!", "W10", "WyJ4Il0", "WzEsMiwzXQ"])
def test_a_forged_cursor_is_refused(
    conn: psycopg.Connection[Any], schema: str, cursor: str
) -> None:
    with pytest.raises(InvalidCursor):
        list_tasks(conn, schema, tenant="acme", cursor=cursor)
    with pytest.raises(InvalidCursor):
        audit_events(conn, schema, tenant="acme", cursor=cursor)


def test_audit_queries(
    ledger: Ledger, clock: ManualClock, conn: psycopg.Connection[Any], schema: str
) -> None:
    task_id = submit(ledger)
    ledger.start_attempt(task_id, 1, "worker-7")
    clock.advance(5)
    ledger.complete_attempt(task_id, 1, AttemptResult(stdout="hi"))
    other = submit(ledger, tenant="globex")
    catch_up(conn, schema)

    def types(**filters: Any) -> list[str]:
        return [r["type"] for r in audit_events(conn, schema, **filters).items]

    assert types(tenant="acme") == [
        "AttemptCompleted",
        "AttemptStarted",
        "AttemptScheduled",
        "TaskSubmitted",
    ]
    assert types(tenant="acme", worker_id="worker-7") == ["AttemptCompleted", "AttemptStarted"]
    assert types(tenant="acme", types=["TaskSubmitted"]) == ["TaskSubmitted"]
    assert types(tenant=None, task_id=other) == ["AttemptScheduled", "TaskSubmitted"]
    assert types(tenant="acme", since=clock.now()) == ["AttemptCompleted"]
    assert types(tenant="acme", until=clock.now()) == [
        "AttemptStarted",
        "AttemptScheduled",
        "TaskSubmitted",
    ]
    first = audit_events(conn, schema, tenant="acme", limit=3)
    rest = audit_events(conn, schema, tenant="acme", limit=3, cursor=first.next_cursor)
    assert [r["type"] for r in first.items + rest.items] == types(tenant="acme")
    assert rest.next_cursor is None
    completed = audit_events(conn, schema, tenant="acme", types=["AttemptCompleted"]).items[0]
    assert completed["payload"]["result"]["stdout"] == "hi"
    assert completed["attempt"] == 1


def test_task_views_skip_key_events_and_the_keys_view_takes_only_them(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    first, _ = ledger.keys.issue(tenant="acme", role="read", issued_by="test", label="ci")
    task_id = submit(ledger)
    second, _ = ledger.keys.issue(tenant="globex", role="admin", issued_by="test")
    ledger.keys.revoke(first.key_id, by="admin-1")
    catch_up(conn, schema)
    # Issued at the same (manual) time: listed by key id then.
    keys = sorted(list_keys(conn, schema, tenant=None), key=lambda k: k["tenant"])
    assert [(k["key_id"], k["tenant"], k["role"], k["label"]) for k in keys] == [
        (first.key_id, "acme", "read", "ci"),
        (second.key_id, "globex", "admin", ""),
    ]
    assert keys[0]["revoked_by"] == "admin-1"
    assert keys[0]["revoked_at"] is not None
    assert keys[1]["revoked_at"] is None
    assert [k["key_id"] for k in list_keys(conn, schema, tenant="globex")] == [second.key_id]
    assert "secret_sha256" not in keys[0]
    assert {s.name: s.lag for s in status(conn, schema)} == {
        "api_keys": 0,
        "audit": 0,
        "task_periods": 0,
        "task_status": 0,
        "webhook_deliveries": 0,
    }
    assert view_rows(conn, schema, [task_id]) == {task_id: expected_row(ledger, task_id)}
    assert [r[1] for r in audit_rows(conn, schema, task_id)] == [
        "TaskSubmitted",
        "AttemptScheduled",
    ]


def test_a_batch_stops_at_its_byte_bound_but_never_inside_a_save(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With outputs at their cap, a batch of 2,000 events held 2.5 GB: a batch now holds
    about BATCH_BYTES (here 300 KB) and whole saves, and the view ends up the same."""
    from ledger import log

    monkeypatch.setattr(log, "BATCH_BYTES", 300_000)
    big = AttemptResult(stdout="y" * 100_000, stderr="e" * 50_000)
    ids = []
    for n in range(6):
        task_id = submit(ledger, n)
        ledger.start_attempt(task_id, 1, "w")
        if n % 2:
            ledger.complete_attempt(task_id, 1, big)
        else:  # AttemptFailed + AttemptScheduled: one save that a batch must not split
            ledger.fail_attempt(
                task_id, 1, AttemptError("program_error", "x" * 150_000), retryable=True
            )
        ids.append(task_id)
    sizes = []
    while True:
        _, applied, _ = apply_batch(conn, schema, STATUS, 2_000)
        if not applied:
            break
        sizes.append(applied)
        # Never between a failure and its retry's scheduling: the view shows no Failed.
        assert all(row["status"] != "Failed" for row in view_rows(conn, schema, ids).values())
    assert len(sizes) > 1, sizes  # the bound cut the log into several batches
    assert sum(sizes) == 6 * 4 + 3 * 1  # submit 2, start 1, outcome 1 (+1 retry scheduled)
    assert view_rows(conn, schema, ids) == {t: expected_row(ledger, t) for t in ids}


def test_a_rebuild_goes_on_past_batches_its_byte_bound_cut_short(
    ledger: Ledger,
    conn: psycopg.Connection[Any],
    schema: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of fewer events than the batch size is not the end of the log when big
    outputs filled its bytes first: the rebuild stopped there and switched to a
    generation far behind the log (found with 1 MiB outputs: 624 of 4,002 events)."""
    from ledger import log

    monkeypatch.setattr(log, "BATCH_BYTES", 300_000)
    big = AttemptResult(stdout="y" * 100_000)
    ids = []
    for n in range(12):  # about three outputs a batch: four batches, and more to catch up
        task_id = submit(ledger, n)
        ledger.start_attempt(task_id, 1, "w")
        ledger.complete_attempt(task_id, 1, big)
        ids.append(task_id)
    rebuild(database_url, schema, STATUS, batch_size=5_000)
    assert positions(conn, schema, "task_status") == {"task_status": head(ledger)}
    assert view_rows(conn, schema, ids) == {t: expected_row(ledger, t) for t in ids}


# Letters in both cases, LIKE's own wildcards and escape, and a plain character.
LIKE_ALPHABET = "aAbB%_\\x"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    description=st.text(LIKE_ALPHABET, max_size=8),
    text=st.text(LIKE_ALPHABET, min_size=1, max_size=4),
)
def test_the_text_filter_takes_every_character_literally(
    conn: psycopg.Connection[Any], description: str, text: str
) -> None:
    """`q=50%` finds "50% off", not "500 off": the pattern's % _ and \\ match themselves."""
    row = conn.execute("SELECT %s ILIKE %s", (description, contains_pattern(text))).fetchone()
    assert row is not None
    assert row[0] == (text.lower() in description.lower())


def test_a_view_of_an_earlier_release_gets_the_new_nullable_columns_at_start(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    """The release that added last_delivery_* to task_status and task_periods: a live
    generation made before it gets them at start, and its runner goes on."""
    new = ("last_delivery_id", "last_delivery_outcome", "last_delivery_at")
    conn.autocommit = True
    for projection in (STATUS, PERIODS):  # as the earlier release left them
        table = sql.Identifier(schema, f"{projection.name}_g1")
        conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier(schema, projection.name)))
        for column in new:
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(table, sql.Identifier(column))
            )
        conn.execute(
            sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(schema, projection.name), table
            )
        )
    task_id = submit(ledger)
    for projection in (STATUS, PERIODS):
        ensure_installed(conn, schema, projection)
    conn.autocommit = False
    ledger.record_webhook_attempt(
        task_id,
        delivery_id=uuid.uuid4(),
        trigger_version=2,
        trigger_type="AttemptScheduled",
        url="https://hooks.example.com/x",
        delivery_attempt=1,
        outcome="delivered",
        status_code=200,
    )
    catch_up(conn, schema)
    for view in ("task_status", "task_periods"):
        row = conn.execute(
            sql.SQL(
                "SELECT last_delivery_outcome FROM {} WHERE id = %s ORDER BY version DESC LIMIT 1"
            ).format(sql.Identifier(schema, view)),
            (task_id,),
        ).fetchone()
        assert row == ("delivered",), view
    conn.commit()
