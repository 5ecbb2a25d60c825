"""The hash chain over the log, attacked with SQL by someone with database access: every
kind of tampering is found, and named by its position and its task.

The attacker edits the events table directly (UPDATE, DELETE, INSERT), the way a program
that reached the database would. Without the chain, each of these edits read back as a
valid history.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from eventsourcing.domain import Aggregate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from ledger import AttemptResult, Ledger
from ledger.chain import GENESIS, digest, link
from ledger.log import EVENTS_TABLE
from ledger.store import EventStore
from ledger.verification import Checkpoint, Report, checkpoint, verify
from tests.integration.test_ledger_postgres import TASK

pytestmark = pytest.mark.postgres


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def run_task(ledger: Ledger) -> uuid.UUID:
    """A task through submit, start and completion: versions 1..4."""
    task_id = ledger.submit(**TASK).task.id
    ledger.start_attempt(task_id, 1, "w")
    ledger.complete_attempt(task_id, 1, AttemptResult("6\n", "", 0, 3.0))
    return task_id


def events(conn: psycopg.Connection[Any], schema: str) -> list[tuple[int, uuid.UUID, int]]:
    """(position, task, version) of every event, in position order."""
    return [
        (int(position), task_id, int(version))
        for position, task_id, version in conn.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version FROM {}"
                " ORDER BY notification_id"
            ).format(table(schema))
        ).fetchall()
    ]


def table(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, EVENTS_TABLE)


def position_of(conn: psycopg.Connection[Any], schema: str, task: uuid.UUID, version: int) -> int:
    for position, task_id, v in events(conn, schema):
        if (task_id, v) == (task, version):
            return position
    raise AssertionError(f"no event {task} v{version}")


def found(report: Report, kind: str, position: int, task: uuid.UUID | None) -> None:
    """The report names this problem, at this position, of this task."""
    described = "\n".join(p.describe() for p in report.problems) or "no problem found"
    assert any(
        p.kind == kind and p.position == position and p.task_id == task for p in report.problems
    ), f"want {kind} at {position} ({task}); got:\n{described}"


def swap(conn: psycopg.Connection[Any], schema: str, a: int, b: int) -> None:
    """Swap everything two rows hold but their positions (versions go through their
    negatives: two events of one task cannot hold one version even for a moment)."""
    t = table(schema)
    conn.execute(
        sql.SQL(
            "UPDATE {} SET originator_version = -originator_version"
            " WHERE notification_id IN (%s, %s)"
        ).format(t),
        (a, b),
    )
    conn.execute(
        sql.SQL(
            "UPDATE {t} x SET (originator_id, originator_version, topic, state, digest, chain) ="
            " (SELECT y.originator_id, -y.originator_version, y.topic, y.state, y.digest,"
            "  y.chain FROM {t} y"
            "  WHERE y.notification_id = CASE x.notification_id WHEN %s THEN %s ELSE %s END)"
            " WHERE x.notification_id IN (%s, %s)"
        ).format(t=t),
        (a, b, a, a, b),
    )


# -- an intact log --------------------------------------------------------------------------


def test_an_intact_log_verifies_and_its_chain_is_what_python_computes(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    for _ in range(3):
        run_task(ledger)
    report = verify(conn, schema)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.events == 12
    assert report.streams == 3
    # Recomputed here from the stored bytes alone: the insert chained them the same way.
    previous = GENESIS
    for task_id, version, topic, state, stored_digest, stored_chain in conn.execute(
        sql.SQL(
            "SELECT originator_id, originator_version, topic, state, digest, chain FROM {}"
            " ORDER BY notification_id"
        ).format(table(schema))
    ).fetchall():
        assert digest(task_id, version, topic, bytes(state)) == bytes(stored_digest)
        previous = link(previous, bytes(stored_digest))
        assert previous == bytes(stored_chain)
    assert report.head_chain == previous


def test_a_group_commit_of_many_tasks_is_chained_in_position_order(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    from ledger import SubmitRequest

    requests = [
        SubmitRequest(
            description=f"t{n}",
            language="python",
            code="pass",
            tenant="acme",
            submitted_by="k",
        )
        for n in range(50)
    ]
    assert all(not isinstance(outcome, Exception) for outcome in ledger.submit_many(requests))
    report = verify(conn, schema)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.events == 100


# -- each kind of tampering --------------------------------------------------------------------


def test_a_changed_payload_byte_is_found(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task = run_task(ledger)
    run_task(ledger)
    completed = position_of(conn, schema, task, 4)
    # The forgery of the old probe: the completed task's stdout rewritten in place.
    conn.execute(
        sql.SQL(
            "UPDATE {} SET state = convert_to(replace(convert_from(state, 'UTF8'),"
            " '\"stdout\":\"6', '\"stdout\":\"7'), 'UTF8')"
            " WHERE notification_id = %s"
        ).format(table(schema)),
        (completed,),
    )
    assert b'"stdout":"7' in bytes(
        conn.execute(
            sql.SQL("SELECT state FROM {} WHERE notification_id = %s").format(table(schema)),
            (completed,),
        ).fetchone()[0]  # type: ignore[index]
    )
    found(verify(conn, schema), "changed", completed, task)
    found(verify(conn, schema, task=task), "changed", completed, task)


def test_a_change_with_a_recomputed_digest_breaks_the_chain(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task = run_task(ledger)
    position = position_of(conn, schema, task, 1)
    row = conn.execute(
        sql.SQL("SELECT topic, state FROM {} WHERE notification_id = %s").format(table(schema)),
        (position,),
    ).fetchone()
    assert row is not None
    forged = bytes(row[1]).replace(b"sum", b"mus")
    conn.execute(
        sql.SQL("UPDATE {} SET state = %s, digest = %s WHERE notification_id = %s").format(
            table(schema)
        ),
        (forged, digest(task, 1, row[0], forged), position),
    )
    found(verify(conn, schema), "unlinked", position, task)


def test_a_deleted_event_in_the_middle_of_a_task_is_found_and_names_the_task(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task = run_task(ledger)
    other = run_task(ledger)
    started = position_of(conn, schema, task, 3)
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE notification_id = %s").format(table(schema)), (started,)
    )
    report = verify(conn, schema)
    assert not report.ok
    found(report, "version_gap", position_of(conn, schema, task, 4), task)
    assert other not in {p.task_id for p in report.problems if p.kind == "version_gap"}


def test_the_newest_events_of_a_task_deleted_are_found(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task = run_task(ledger)
    run_task(ledger)  # later events: the deleted tail is not the log's
    tail = [position_of(conn, schema, task, v) for v in (3, 4)]
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE notification_id = ANY(%s)").format(table(schema)), (tail,)
    )
    report = verify(conn, schema, expected_versions={task: 4})
    assert report.problem is not None
    assert report.problem.kind == "unlinked"  # the chain breaks right after them
    assert report.problem.position > tail[-1]
    found(report, "tail_deleted", report.head_position, task)  # and the view says whose


def test_a_whole_deleted_task_is_found(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    first = run_task(ledger)
    gone = run_task(ledger)
    last = run_task(ledger)
    conn.execute(sql.SQL("DELETE FROM {} WHERE originator_id = %s").format(table(schema)), (gone,))
    report = verify(conn, schema, expected_versions={first: 4, gone: 4, last: 4})
    found(report, "unlinked", position_of(conn, schema, last, 1), last)
    assert any(p.kind == "tail_deleted" and p.task_id == gone for p in report.problems)


def test_two_swapped_events_are_found(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task = run_task(ledger)
    a, b = position_of(conn, schema, task, 2), position_of(conn, schema, task, 3)
    swap(conn, schema, a, b)
    assert [v for _, t, v in events(conn, schema) if t == task] == [1, 3, 2, 4]
    found(verify(conn, schema), "out_of_order", b, task)
    assert verify(conn, schema).problem.position == a  # type: ignore[union-attr]


def test_a_forged_event_inserted_is_found(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task = run_task(ledger)
    later = run_task(ledger)
    # A copy of the task's completion as a fifth version, slipped in before the next task,
    # with its digest and its link to the event before it computed as the insert would.
    completed = position_of(conn, schema, task, 4)
    row = conn.execute(
        sql.SQL("SELECT topic, state, chain FROM {} WHERE notification_id = %s").format(
            table(schema)
        ),
        (completed,),
    ).fetchone()
    assert row is not None
    topic, state, before = row[0], bytes(row[1]), bytes(row[2])
    own = digest(task, 5, topic, state)
    # Positions are integers: the forgery takes the next task's first position, which
    # moves up one (as if the hole a rolled-back save leaves was used).
    first_later = position_of(conn, schema, later, 1)
    conn.execute(
        sql.SQL(
            "UPDATE {} SET notification_id = notification_id + 1000 WHERE notification_id >= %s"
        ).format(table(schema)),
        (first_later,),
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (originator_id, originator_version, topic, state, digest, chain,"
            " notification_id) VALUES (%s, 5, %s, %s, %s, %s, %s)"
        ).format(table(schema)),
        (task, topic, state, own, link(before, own), first_later),
    )
    found(verify(conn, schema), "unlinked", first_later + 1000, later)


def test_the_newest_events_of_the_log_deleted_are_found_against_a_checkpoint(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    run_task(ledger)
    kept = checkpoint(conn, schema, b"signing key")
    later = run_task(ledger)
    assert verify(conn, schema, checkpoint=kept).ok
    conn.execute(sql.SQL("DELETE FROM {} WHERE originator_id = %s").format(table(schema)), (later,))
    assert verify(conn, schema, checkpoint=kept).ok  # the checkpoint's prefix is all there
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE notification_id >= %s").format(table(schema)),
        (kept.position,),
    )
    report = verify(conn, schema, checkpoint=kept)
    assert report.problem is not None
    assert (report.problem.kind, report.problem.position) == ("truncated", kept.position)
    assert verify(conn, schema).ok  # without the anchor, a shorter log looks whole


def test_a_rewritten_chain_is_found_against_a_checkpoint(
    ledger: Ledger, conn: psycopg.Connection[Any], schema: str
) -> None:
    task = run_task(ledger)
    kept = checkpoint(conn, schema, None)
    # The thorough attacker: changes the output and recomputes every digest and link.
    conn.execute(
        sql.SQL(
            "UPDATE {} SET state = convert_to(replace(convert_from(state, 'UTF8'),"
            " '\"stdout\":\"6', '\"stdout\":\"7'), 'UTF8')"
            " WHERE originator_id = %s AND originator_version = 4"
        ).format(table(schema)),
        (task,),
    )
    previous = GENESIS
    for position, task_id, version, topic, state in conn.execute(
        sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {}"
            " ORDER BY notification_id"
        ).format(table(schema))
    ).fetchall():
        own = digest(task_id, version, topic, bytes(state))
        previous = link(previous, own)
        conn.execute(
            sql.SQL("UPDATE {} SET digest = %s, chain = %s WHERE notification_id = %s").format(
                table(schema)
            ),
            (own, previous, position),
        )
    assert verify(conn, schema).ok  # consistent again: only the anchor can tell
    report = verify(conn, schema, checkpoint=kept)
    assert report.problem is not None
    assert (report.problem.kind, report.problem.position) == ("rewritten", kept.position)


def test_a_checkpoint_signature_holds_only_for_its_key_and_its_content() -> None:
    made = Checkpoint(42, bytes(range(32)), datetime(2030, 1, 1, tzinfo=UTC)).signed(b"key")
    again = Checkpoint.parse(made.as_json())
    assert again == made
    assert again.check_signature(b"key") is None
    assert "does not hold" in (again.check_signature(b"other") or "")
    edited = Checkpoint(43, made.chain, made.at, made.hmac)
    assert "does not hold" in (edited.check_signature(b"key") or "")
    unsigned = Checkpoint(42, made.chain, made.at)
    assert "not signed" in (unsigned.check_signature(b"key") or "")
    assert unsigned.check_signature(None) is None


# -- any single tampering, on any history -------------------------------------------------------

TAMPERINGS = ("change", "delete", "swap")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    shape=st.lists(st.integers(min_value=1, max_value=4), min_size=2, max_size=6),
    tampering=st.sampled_from(TAMPERINGS),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_any_single_tampering_of_any_history_is_found(
    ledger: Ledger,
    conn: psycopg.Connection[Any],
    schema: str,
    shape: list[int],
    tampering: str,
    where: float,
) -> None:
    conn.execute(sql.SQL("TRUNCATE {}").format(table(schema)))
    for steps in shape:  # each task goes 1 to 4 steps into its life
        task_id = ledger.submit(**TASK).task.id  # 2 events
        if steps >= 3:
            ledger.start_attempt(task_id, 1, "w")
        if steps >= 4:
            ledger.complete_attempt(task_id, 1, AttemptResult("ok", "", 0, 1.0))
    rows = events(conn, schema)
    assert verify(conn, schema).ok
    index = min(int(where * len(rows)), len(rows) - 2)  # not the last: only an anchor sees that
    position = rows[index][0]
    t = table(schema)
    if tampering == "change":
        conn.execute(
            sql.SQL("UPDATE {} SET state = state || ' '::bytea WHERE notification_id = %s").format(
                t
            ),
            (position,),
        )
    elif tampering == "delete":
        conn.execute(sql.SQL("DELETE FROM {} WHERE notification_id = %s").format(t), (position,))
    else:
        swap(conn, schema, position, rows[index + 1][0])
    report = verify(conn, schema)
    assert not report.ok, (tampering, position, rows)
    assert report.problem is not None
    assert report.problem.position <= rows[index + 1][0], report.problem.describe()


# -- the leader's checkpoint lines ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_leader_logs_checkpoint_lines_that_verify_against_the_log(
    ledger: Ledger,
    conn: psycopg.Connection[Any],
    database_url: str,
    schema: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from taskledger.checkpoints import Checkpointer
    from taskledger.logs import JsonFormatter

    run_task(ledger)
    caplog.set_level("INFO", logger="taskledger.checkpoints")
    checkpointer = Checkpointer(database_url, schema, b"signing key", minutes=0.001)
    stop = asyncio.Event()
    role = asyncio.create_task(checkpointer.run(stop))
    try:
        async with asyncio.timeout(20):
            while checkpointer.logged < 2:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await role
    lines = [JsonFormatter().format(r) for r in caplog.records if r.msg == "ledger checkpoint"]
    assert len(lines) >= 2
    shipped = Checkpoint.parse(lines[-1])  # the log line itself is a checkpoint file
    assert shipped.check_signature(b"signing key") is None
    assert shipped.position == events(conn, schema)[-1][0]
    assert verify(conn, schema, checkpoint=shipped).ok
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE notification_id = %s").format(table(schema)),
        (shipped.position,),
    )
    report = verify(conn, schema, checkpoint=shipped)
    assert report.problem is not None
    assert report.problem.kind == "truncated"


class Note(Aggregate):
    pass


class OtherStore(EventStore):
    name = "OtherLedger"


def test_two_event_stores_in_one_schema_each_insert_into_their_own_table(
    ledger: Ledger, store_env: dict[str, str], conn: psycopg.Connection[Any], schema: str
) -> None:
    """The insert function names its table: a second store made after the ledger's (as the
    benchmark's baseline was) once redefined it, and the ledger's events went to the
    other table."""
    other = OtherStore(store_env)
    try:
        run_task(ledger)
        other.save(Note())
        run_task(ledger)
    finally:
        other.close()
    report = verify(conn, schema)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.events == 8
    row = conn.execute(
        sql.SQL("SELECT count(*), count(chain) FROM {}").format(
            sql.Identifier(schema, "otherledger_events")
        )
    ).fetchone()
    assert row == (1, 1)
