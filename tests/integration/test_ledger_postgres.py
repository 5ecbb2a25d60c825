"""The ledger service against a real PostgreSQL event store."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import OperationalError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from ledger import AttemptError, AttemptResult, Ledger, ManualClock, Status
from ledger import log as event_log
from ledger.connections import postgres_env
from ledger.errors import (
    AttemptNotCurrent,
    IdempotencyConflict,
    InvalidTask,
    LedgerError,
    LedgerUnavailable,
    TaskIsTerminal,
    TaskNotFound,
    VersionMismatch,
)
from ledger.persistence import LedgerRecorder
from ledger.store import EventStore

pytestmark = pytest.mark.postgres

TASK: dict[str, Any] = {
    "description": "sum",
    "language": "python",
    "code": "print(sum(data))",
    "data": [1, 2, 3],
    "ttl_seconds": 30,
    "max_attempts": 2,
    "tenant": "acme",
    "submitted_by": "key-1",
}


def count_events(database_url: str, schema: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.taskledger_events").format(sql.Identifier(schema))
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_schema_and_events_table_are_created_on_start(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    assert count_events(database_url, schema) == 0


def test_a_task_lives_through_its_whole_lifecycle(ledger: Ledger, clock: ManualClock) -> None:
    submission = ledger.submit(**TASK)
    assert submission.created
    task_id = submission.task.id
    assert ledger.get(task_id).status is Status.PENDING

    clock.advance(1)
    started = ledger.start_attempt(task_id, 1, "worker-a")
    assert started.status is Status.IN_PROGRESS
    assert started.worker_id == "worker-a"

    clock.advance(1)
    failed = ledger.fail_attempt(
        task_id, 1, AttemptError("program_error", "ZeroDivisionError", exit_code=1), retryable=True
    )
    assert failed.status is Status.PENDING
    assert failed.attempt == 2

    clock.advance(5)
    ledger.start_attempt(task_id, 2, "worker-b")
    done = ledger.complete_attempt(task_id, 2, AttemptResult(stdout="6\n", duration_ms=3.5))
    assert done.status is Status.COMPLETED
    assert done.result is not None
    assert done.result["stdout"] == "6\n"

    history = ledger.history(task_id)
    assert [(h.version, h.type) for h in history] == [
        (1, "TaskSubmitted"),
        (2, "AttemptScheduled"),
        (3, "AttemptStarted"),
        (4, "AttemptFailed"),
        (5, "AttemptScheduled"),
        (6, "AttemptStarted"),
        (7, "AttemptCompleted"),
    ]
    assert history[0].data["data"] == [1, 2, 3]
    assert history[4].data["reason"] == "auto-retry"
    assert history[4].data["deadline"] == history[1].data["deadline"]
    assert history[-1].at == done.updated_at


def test_a_task_read_back_equals_the_task_as_written(ledger: Ledger, clock: ManualClock) -> None:
    written = ledger.submit(**TASK, idempotency_key="k-1").task
    clock.advance(2)
    ledger.start_attempt(written.id, 1, "w")
    clock.advance(31)
    expired = ledger.expire(written.id, 1, detected_by="reaper")
    fresh = Ledger(ledger.store.env, clock=clock)
    try:
        assert fresh.get(written.id) == expired
    finally:
        fresh.close()


def test_idempotency_key_returns_the_same_task_or_a_conflict(ledger: Ledger) -> None:
    first = ledger.submit(**TASK, idempotency_key="order-42")
    again = ledger.submit(**TASK, idempotency_key="order-42")
    assert again.task.id == first.task.id
    assert (first.created, again.created) == (True, False)
    with pytest.raises(IdempotencyConflict, match="order-42"):
        ledger.submit(**{**TASK, "data": [9]}, idempotency_key="order-42")
    other_tenant = ledger.submit(**{**TASK, "tenant": "globex"}, idempotency_key="order-42")
    assert other_tenant.created
    assert other_tenant.task.id != first.task.id


def test_invalid_submissions_write_nothing(ledger: Ledger, database_url: str, schema: str) -> None:
    with pytest.raises(InvalidTask, match="ttl_seconds"):
        ledger.submit(**{**TASK, "ttl_seconds": -5})
    assert count_events(database_url, schema) == 0


def test_other_tenants_tasks_do_not_exist_for_you(ledger: Ledger) -> None:
    task_id = ledger.submit(**TASK).task.id
    assert ledger.get(task_id, tenant="acme").id == task_id
    for query in (
        lambda: ledger.get(task_id, tenant="globex"),
        lambda: ledger.history(task_id, tenant="globex"),
        lambda: ledger.cancel(task_id, by="x", tenant="globex"),
    ):
        with pytest.raises(TaskNotFound):
            query()
    with pytest.raises(TaskNotFound):
        ledger.get(uuid.uuid4())


def test_update_checks_the_expected_version(ledger: Ledger) -> None:
    task = ledger.submit(**TASK).task
    updated = ledger.update(task.id, {"data": [4]}, by="key-1", expected_version=task.version)
    assert updated.data == [4]
    assert updated.version == task.version + 1
    with pytest.raises(VersionMismatch, match=f"version {updated.version}, not {task.version}"):
        ledger.update(task.id, {"description": "x"}, by="key-1", expected_version=task.version)


def test_manual_retry_gets_a_new_deadline(ledger: Ledger, clock: ManualClock) -> None:
    task = ledger.submit(**TASK).task
    ledger.cancel(task.id, by="key-1", reason="wrong data")
    clock.advance(100)
    retried = ledger.retry(task.id, by="key-1", ttl_seconds=10)
    assert retried.status is Status.PENDING
    assert retried.attempt == 2
    assert retried.deadline == clock.now() + timedelta(seconds=10)
    with pytest.raises(AttemptNotCurrent):
        ledger.start_attempt(task.id, 1, "late-worker")


def test_refusals_leave_the_store_untouched(ledger: Ledger, database_url: str, schema: str) -> None:
    task = ledger.submit(**TASK).task
    ledger.cancel(task.id, by="key-1")
    before = count_events(database_url, schema)
    with pytest.raises(TaskIsTerminal):
        ledger.cancel(task.id, by="key-1")
    assert count_events(database_url, schema) == before


def test_an_unreachable_store_is_reported_as_unavailable() -> None:
    env = postgres_env("postgresql://postgres@127.0.0.1:1/nowhere")
    env["POSTGRES_CONNECT_TIMEOUT"] = "1"
    with pytest.raises(LedgerUnavailable, match="check that PostgreSQL is running"):
        Ledger(env)


def test_api_keys_are_issued_checked_and_revoked(ledger: Ledger) -> None:
    principal, token = ledger.keys.issue(tenant="acme", role="submit", issued_by="cli")
    assert token.startswith("tlk_")
    assert ledger.keys.authenticate(token) == principal
    assert (principal.tenant, principal.role) == ("acme", "submit")
    assert ledger.keys.authenticate(token[:-1] + ("x" if token[-1] != "x" else "y")) is None
    assert ledger.keys.authenticate("tlk_000000000000_nope") is None
    assert ledger.keys.authenticate("not-a-key") is None
    ledger.keys.revoke(principal.key_id, by="cli")
    assert ledger.keys.authenticate(token) is None
    ledger.keys.revoke(principal.key_id, by="cli")  # revoking twice is harmless
    with pytest.raises(InvalidTask, match="role"):
        ledger.keys.issue(tenant="acme", role="root", issued_by="cli")


def test_key_events_are_not_tasks(ledger: Ledger) -> None:
    principal, _ = ledger.keys.issue(tenant="acme", role="read", issued_by="cli")
    from ledger.keys import key_stream_id

    with pytest.raises(TaskNotFound):
        ledger.get(key_stream_id(principal.key_id))


def test_each_transition_is_logged_with_its_task(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="ledger.service")
    task = ledger.submit(**TASK).task
    ledger.cancel(task.id, by="key-1")
    lines = [r for r in caplog.records if r.getMessage() == "task transition"]
    assert [(r.task_id, r.events, r.status) for r in lines] == [  # type: ignore[attr-defined]
        (str(task.id), ["TaskSubmitted", "AttemptScheduled"], "Pending"),
        (str(task.id), ["TaskCancelled"], "Cancelled"),
    ]


def test_a_stale_copy_in_one_process_never_decides_what_another_process_changed(
    store_env: dict[str, str], clock: ManualClock
) -> None:
    """Ledger `a` keeps the task it saved last; `b` (another process) changes it."""
    a = Ledger(store_env, clock=clock)
    b = Ledger(store_env, clock=clock)
    try:
        task_id = a.submit(**{**TASK, "max_attempts": 1}).task.id
        a.start_attempt(task_id, 1, "w-a")
        a.fail_attempt(task_id, 1, AttemptError("exit", "boom"), retryable=True)
        assert a.get(task_id).status is Status.FAILED  # a's copy: Failed, one attempt

        b.retry(task_id, by="operator")  # attempt 2 exists now, a's copy does not know

        # On a's copy attempt 2 does not exist: that refusal must not stand.
        started = a.start_attempt(task_id, 2, "w-a")
        assert (started.status, started.attempt) == (Status.IN_PROGRESS, 2)

        b.cancel(task_id, by="operator")  # a's copy (just saved) says InProgress
        hits = a.recent_hits
        with pytest.raises(TaskIsTerminal):
            a.complete_attempt(task_id, 2, AttemptResult("ok", "", 0, 1.0))
        assert a.recent_hits == hits
        assert a.get(task_id).status is Status.CANCELLED
    finally:
        a.close()
        b.close()


def test_the_next_command_on_a_task_this_process_saved_reads_nothing_back(
    ledger: Ledger,
) -> None:
    task_id = ledger.submit(**TASK).task.id
    hits = ledger.recent_hits
    ledger.start_attempt(task_id, 1, "w")
    ledger.complete_attempt(task_id, 1, AttemptResult("6\n", "", 0, 1.0))
    assert ledger.recent_hits == hits + 2
    assert [e.type for e in ledger.history(task_id)][-2:] == ["AttemptStarted", "AttemptCompleted"]


def test_execute_many_reads_decides_and_saves_many_tasks_each_with_its_own_outcome(
    store_env: dict[str, str], clock: ManualClock
) -> None:
    writer = Ledger(store_env, clock=clock)
    worker = Ledger(store_env, clock=clock)  # another process: holds none of the tasks
    try:
        ids = [writer.submit(**TASK).task.id for _ in range(20)]
        missing = uuid.uuid4()
        commands = [worker.start_decision(t, 1, "w") for t in ids]
        commands.append(worker.start_decision(missing, 1, "w"))
        commands.append(worker.start_decision(ids[0], 2, "w"))  # second on one task: alone
        commands.append(worker.complete_decision(ids[1], 1, AttemptResult("x", "", 0, 1.0)))
        transactions = worker.store.group_commit.transactions
        outcomes = worker.execute_many(commands)

        started = outcomes[:20]
        assert all(not isinstance(s, Exception) and s.status is Status.IN_PROGRESS for s in started)
        assert worker.store.group_commit.transactions == transactions + 1 + 1  # the batch, ids[1]
        assert isinstance(outcomes[20], TaskNotFound)
        assert isinstance(outcomes[21], AttemptNotCurrent)
        completed = outcomes[22]
        assert not isinstance(completed, Exception)
        assert completed.status is Status.COMPLETED
        assert [e.type for e in writer.history(ids[1])][-2:] == [
            "AttemptStarted",
            "AttemptCompleted",
        ]
    finally:
        writer.close()
        worker.close()


def test_execute_many_never_lets_a_stale_copy_decide(
    store_env: dict[str, str], clock: ManualClock
) -> None:
    a = Ledger(store_env, clock=clock)
    b = Ledger(store_env, clock=clock)
    try:
        ids = [a.submit(**TASK).task.id for _ in range(3)]
        b.cancel(ids[1], by="operator")  # a still holds ids[1] as Pending
        outcomes = a.execute_many([a.start_decision(t, 1, "w") for t in ids])
        assert isinstance(outcomes[1], TaskIsTerminal)
        assert [getattr(o, "status", None) for o in (outcomes[0], outcomes[2])] == [
            Status.IN_PROGRESS,
            Status.IN_PROGRESS,
        ]
        assert a.get(ids[1]).status is Status.CANCELLED
    finally:
        a.close()
        b.close()


def test_racing_batches_record_exactly_one_outcome_per_attempt(
    store_env: dict[str, str], clock: ManualClock
) -> None:
    """Two processes settle the same 60 running attempts at once, in batches: one
    completes them, the other expires them. Each attempt ends once, by one of them."""
    import threading

    setup = Ledger(store_env, clock=clock)
    ids = [setup.submit(**TASK).task.id for _ in range(60)]
    for task_id in ids:
        setup.start_attempt(task_id, 1, "w")
    clock.advance(31)  # past the deadline: both outcomes are allowed
    racers = [Ledger(store_env, clock=clock) for _ in range(2)]
    barrier = threading.Barrier(2)
    outcomes: list[list[Any]] = [[], []]

    def race(index: int) -> None:
        ledger = racers[index]
        if index == 0:
            commands = [
                ledger.complete_decision(t, 1, AttemptResult("ok", "", 0, 1.0)) for t in ids
            ]
        else:
            commands = [ledger.expire_decision(t, 1, detected_by="reaper") for t in ids]
        barrier.wait()
        for start in range(0, len(commands), 10):
            outcomes[index] += ledger.execute_many(commands[start : start + 10])

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        for position, task_id in enumerate(ids):
            won = [not isinstance(o[position], Exception) for o in outcomes]
            assert won.count(True) == 1, (task_id, outcomes[0][position], outcomes[1][position])
            types = [e.type for e in setup.history(task_id)]
            assert types.count("AttemptCompleted") + types.count("TaskExpired") == 1
    finally:
        for ledger in (setup, *racers):
            ledger.close()


@pytest.mark.timeout(120)
def test_a_save_of_several_megabytes_goes_through(store_env: dict[str, str]) -> None:
    """Eight outcomes at the 1 MiB output cap, stdout and stderr, saved in one group commit:
    16 MiB in one transaction. In psycopg's pipeline mode such a save deadlocked (the client
    waiting for results of a query it had not finished sending): over TCP from a few MB,
    over a Unix socket from a few hundred KB (test_embedded has that one)."""
    ledger = Ledger(store_env)
    try:
        ids = [ledger.submit(**TASK).task.id for _ in range(8)]
        for task_id in ids:
            ledger.start_attempt(task_id, 1, "w")
        big = AttemptResult("y" * (1 << 20), "e" * (1 << 20), 0, 1.0, truncated=True)
        transactions = ledger.store.group_commit.transactions
        outcomes = ledger.execute_many([ledger.complete_decision(t, 1, big) for t in ids])
        assert ledger.store.group_commit.transactions == transactions + 1
        assert [getattr(o, "status", o) for o in outcomes] == [Status.COMPLETED] * 8
        result = ledger.get(ids[-1]).result
        assert result is not None
        assert (len(result["stdout"]), len(result["stderr"])) == (1 << 20, 1 << 20)
    finally:
        ledger.close()


def test_an_outcome_beyond_the_payload_budget_is_stored_cut_to_it(ledger: Ledger) -> None:
    """A worker whose own output cap is larger (misconfigured, or another version) cannot
    grow an event beyond the budget: the ledger keeps the budget's worth, truncated."""
    budget = ledger.limits.output_bytes
    task_id = ledger.submit(**TASK).task.id
    ledger.start_attempt(task_id, 1, "w")
    huge = AttemptResult("y" * (3 * budget), "é" * budget, 0, 1.0)
    ledger.complete_attempt(task_id, 1, huge)
    result = ledger.get(task_id).result
    assert result is not None
    assert len(result["stdout"].encode()) == budget
    assert len(result["stderr"].encode()) == budget  # é is 2 bytes: cut between characters
    assert result["truncated"] is True


def test_a_save_whose_commit_answer_is_lost_is_stored_once_and_succeeds(
    store_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks after the commit went through (the answer is lost): the
    save looks, finds its events, and succeeds. It used to write them again and report
    the duplicate key, which answered 503 for a stored submission."""
    ledger = Ledger(store_env)
    real = LedgerRecorder._insert_once
    broken = []

    def commit_then_break(self: LedgerRecorder, events: Any, **kwargs: Any) -> Any:
        real(self, events, **kwargs)
        if not broken:
            broken.append(True)
            raise OperationalError("server closed the connection unexpectedly")
        return None

    try:
        monkeypatch.setattr(LedgerRecorder, "_insert_once", commit_then_break)
        submission = ledger.submit(**TASK)
        assert broken == [True]
        monkeypatch.undo()
        history = ledger.history(submission.task.id)
        assert [h.type for h in history] == ["TaskSubmitted", "AttemptScheduled"]
    finally:
        ledger.close()


def test_a_stored_save_whose_look_fails_too_is_written_again_and_succeeds(
    store_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit went through, its answer was lost, and the look for the events could
    not reach the server either (a restart under way): the save is written again and
    meets its own events' keys. That is success, not a 503 (the fault suite saw this in
    6 of 19 rounds that restarted PostgreSQL)."""
    ledger = Ledger(store_env)
    real_insert, real_stored = LedgerRecorder._insert_once, LedgerRecorder._stored
    looks: list[bool] = []

    def commit_then_break(self: LedgerRecorder, events: Any, **kwargs: Any) -> Any:
        real_insert(self, events, **kwargs)  # a second write raises the duplicate key
        raise OperationalError("server closed the connection unexpectedly")

    def unreachable_once(self: LedgerRecorder, event: Any) -> bool:
        looks.append(True)
        if len(looks) == 1:
            raise OperationalError("the database system is starting up")
        return real_stored(self, event)

    try:
        monkeypatch.setattr(LedgerRecorder, "_insert_once", commit_then_break)
        monkeypatch.setattr(LedgerRecorder, "_stored", unreachable_once)
        submission = ledger.submit(**TASK)
        monkeypatch.undo()
        assert len(looks) == 2
        history = ledger.history(submission.task.id)
        assert [h.type for h in history] == ["TaskSubmitted", "AttemptScheduled"]
    finally:
        ledger.close()


def test_a_save_whose_connection_breaks_before_the_commit_is_written_again(
    store_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(store_env)
    real = LedgerRecorder._insert_once
    tries = []

    def break_first(self: LedgerRecorder, events: Any, **kwargs: Any) -> Any:
        tries.append(len(events))
        if len(tries) == 1:
            raise OperationalError("connection refused")
        return real(self, events, **kwargs)

    try:
        monkeypatch.setattr(LedgerRecorder, "_insert_once", break_first)
        submission = ledger.submit(**TASK)
        monkeypatch.undo()
        assert len(tries) == 2
        assert ledger.get(submission.task.id).status is Status.PENDING
    finally:
        ledger.close()


# -- a task as of a time, or a version ----------------------------------------------------------

STEPS = ("start", "complete", "fail", "expire", "cancel", "retry", "describe")


def act(ledger: Ledger, task_id: uuid.UUID, step: str, seconds: int) -> None:
    attempt = ledger.get(task_id).attempt
    if step == "start":
        ledger.start_attempt(task_id, attempt, "w")
    elif step == "complete":
        ledger.complete_attempt(task_id, attempt, AttemptResult("ok", "", 0, 1.0))
    elif step == "fail":
        ledger.fail_attempt(task_id, attempt, AttemptError("program_error", "boom"), retryable=True)
    elif step == "expire":
        ledger.expire(task_id, attempt, detected_by="reaper")
    elif step == "cancel":
        ledger.cancel(task_id, by="k")
    elif step == "retry":
        ledger.retry(task_id, by="k")
    else:
        ledger.update(task_id, {"description": f"at {seconds}"}, by="k")


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(STEPS), st.integers(min_value=0, max_value=40)), max_size=10
    )
)
def test_a_task_as_of_any_moment_is_the_task_that_was_seen_then(
    ledger: Ledger, clock: ManualClock, steps: list[tuple[str, int]]
) -> None:
    """The model: the state `get` answered right after each change. `get_as_of` replays
    the events to any of those moments (or versions) and must answer the same task (of
    several changes at one moment, the last)."""
    before = clock.now()
    clock.advance(1)
    task_id = ledger.submit(**TASK).task.id
    seen = [(clock.now(), ledger.get(task_id))]
    for step, seconds in steps:
        clock.advance(seconds)
        try:
            act(ledger, task_id, step, seconds)
        except LedgerError:
            continue  # refused: nothing changed
        seen.append((clock.now(), ledger.get(task_id)))
    with pytest.raises(TaskNotFound):
        ledger.get_as_of(task_id, at=before)
    as_of_time = dict(seen)  # of changes at one moment, the state after the last one
    for at, state in as_of_time.items():
        assert ledger.get_as_of(task_id, at=at) == state
    for _, state in seen:
        assert ledger.get_as_of(task_id, version=state.version) == state
    assert ledger.get_as_of(task_id, at=clock.now() + timedelta(days=1)) == seen[-1][1]
    with pytest.raises(InvalidTask, match="as_of_version"):
        ledger.get_as_of(task_id, version=seen[-1][1].version + 1)
    with pytest.raises(TaskNotFound):
        ledger.get_as_of(task_id, tenant="globex", at=clock.now())


@pytest.mark.asyncio
async def test_who_changed_is_read_through_the_position_index_even_by_a_generic_plan(
    store_env: dict[str, str], database_url: str, schema: str
) -> None:
    """The api's watcher asks who changed past a position on every commit while requests
    wait. PostgreSQL caches a generic plan for a statement run often, which cannot know
    that few rows lie past the position: without a LIMIT it scanned and sorted the whole
    log each time (a soak fell behind for minutes, until autovacuum's statistics changed
    the plan)."""
    EventStore(store_env).close()
    events = sql.Identifier(schema, event_log.EVENTS_TABLE)
    with psycopg.connect(database_url, autocommit=True) as writer:
        writer.execute(
            sql.SQL(
                "INSERT INTO {} (originator_id, originator_version, topic, state)"
                " SELECT gen_random_uuid(), 1, 't', '\\x00' FROM generate_series(1, 20000)"
            ).format(events)
        )
        head = event_log.head_position(writer, schema)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for _ in range(6):  # psycopg prepares a statement from its fifth run on
            changed = await event_log.tasks_changed_after(conn, schema, head - 10)
        scans = await (
            await conn.execute(
                "SELECT seq_scan FROM pg_stat_xact_user_tables"
                " WHERE schemaname = %s AND relname = %s",
                (schema, event_log.EVENTS_TABLE),
            )
        ).fetchone()
        await conn.rollback()
    assert [position for position, _ in changed] == list(range(head - 9, head + 1))
    assert scans == (0,)
