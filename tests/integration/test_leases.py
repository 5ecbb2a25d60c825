"""Attempt leases in a real PostgreSQL: granted with AttemptStarted, settled with the
outcome, renewed by heartbeats, taken by the leader when they lapse; and the fence: a
worker whose lease lapsed or was taken cannot record an outcome."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import UUID

import pytest

from ledger import AttemptError, AttemptResult, Ledger, Status
from ledger.errors import AttemptLeaseLost, TransitionRefused
from ledger.leases import Leases, WorkerInfo

pytestmark = pytest.mark.postgres

TASK = {"description": "d", "language": "python", "code": "x", "tenant": "t", "submitted_by": "k"}
RESULT = AttemptResult("ok", "", 0, 1.0)
LOST = AttemptError("worker_lost", "the worker stopped renewing its lease")


@pytest.fixture
def short(store_env: dict[str, str]) -> Iterator[Ledger]:
    """A ledger whose leases last 50 ms: they lapse while the test watches."""
    ledger = Ledger(store_env, lease_seconds=0.05)
    yield ledger
    ledger.close()


def leases_of(ledger: Ledger) -> Leases:
    assert ledger.leases is not None
    return ledger.leases


def started(ledger: Ledger, worker: str = "w1") -> UUID:
    task_id = ledger.submit(**TASK).task.id
    ledger.start_attempt(task_id, 1, worker)
    return task_id


def info(worker: str, running: list[tuple[UUID, int]]) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker,
        host="h",
        pid=1,
        version="test",
        slots=2,
        busy=len(running),
        running=[{"task_id": str(t), "attempt": a} for t, a in running],
        started_at=datetime.now(UTC),
    )


def lapse(ledger: Ledger, task_id: UUID) -> None:
    """Wait until the attempt's lease has lapsed by the database's clock."""
    leases = leases_of(ledger)
    give_up = time.monotonic() + 10
    while time.monotonic() < give_up:
        held = leases.held(task_id, 1)
        assert held is not None
        with leases._connection() as conn:
            row = conn.execute("SELECT clock_timestamp() AS now").fetchone()
        assert row is not None
        if held[2] < row["now"]:
            return
        time.sleep(0.01)
    raise AssertionError("the lease did not lapse")


def test_a_start_grants_a_lease_that_the_outcome_settles(ledger: Ledger) -> None:
    task_id = started(ledger)
    held = leases_of(ledger).held(task_id, 1)
    assert held is not None
    worker, state, expires_at = held
    assert (worker, state) == ("w1", "held")
    assert expires_at > datetime.now(UTC)
    ledger.complete_attempt(task_id, 1, RESULT)
    assert leases_of(ledger).held(task_id, 1) is None


def test_a_heartbeat_renews_only_the_leases_it_holds(ledger: Ledger) -> None:
    mine, theirs = started(ledger, "w1"), started(ledger, "w2")
    before = leases_of(ledger).held(mine, 1)
    assert before is not None
    held = leases_of(ledger).heartbeat(info("w1", [(mine, 1), (theirs, 1)]))
    assert held == {(mine, 1)}  # another worker's lease is not renewed by a claim to it
    after = leases_of(ledger).held(mine, 1)
    assert after is not None
    assert after[2] > before[2]
    (seen,) = [w for w in leases_of(ledger).workers(60) if w["worker_id"] == "w1"]
    assert (seen["busy"], seen["slots"], seen["running"][0]["task_id"]) == (2, 2, str(mine))


def test_a_lapsed_lease_refuses_the_workers_outcome(short: Ledger) -> None:
    task_id = started(short)
    lapse(short, task_id)
    with pytest.raises(AttemptLeaseLost, match="lapsed"):
        short.complete_attempt(task_id, 1, RESULT)
    assert short.get(task_id).status is Status.IN_PROGRESS  # nothing was recorded


def test_refused_outcomes_leave_the_ledgers_connection_sound(store_env: dict[str, str]) -> None:
    """Each refusal aborts its save's pipeline. On a few connections, past psycopg's
    threshold for preparing a statement (5 uses), a refusal once left the connection
    believing in a statement it never prepared: the next save on it failed with
    `prepared statement "_pg3_N" does not exist` (1 save in 4 under the race below)."""
    ledger = Ledger(
        {**store_env, "POSTGRES_POOL_SIZE": "2", "POSTGRES_MAX_OVERFLOW": "0"},
        lease_seconds=0.05,
    )
    try:
        for _ in range(12):  # every statement past the threshold on both connections
            task_id = started(ledger)
            lapse(ledger, task_id)
            with pytest.raises(AttemptLeaseLost, match="lapsed"):
                ledger.complete_attempt(task_id, 1, RESULT)
            assert ledger.submit(**TASK).created  # the next save on the same connection
    finally:
        ledger.close()


def test_the_leader_takes_a_lapsed_lease_and_the_retry_follows(short: Ledger) -> None:
    task_id = started(short)
    lapse(short, task_id)
    (lapsed,) = [t for t in leases_of(short).take_lapsed() if t.task_id == task_id]
    assert (lapsed.attempt, lapsed.worker_id) == (1, "w1")
    # From now on the lease is lost: a heartbeat does not bring it back.
    assert leases_of(short).heartbeat(info("w1", [(task_id, 1)])) == set()
    state = short.fail_attempt(task_id, 1, LOST, retryable=True)
    assert state.status is Status.PENDING
    assert state.attempt == 2
    assert leases_of(short).held(task_id, 1) is None  # settled with the worker_lost event
    with pytest.raises(TransitionRefused):  # the late outcome of attempt 1
        short.complete_attempt(task_id, 1, RESULT)
    kinds = [h.type for h in short.history(task_id)]
    assert kinds.count("AttemptCompleted") == 0


def test_an_attempt_from_before_leases_has_none_and_records_its_outcome(ledger: Ledger) -> None:
    task_id = started(ledger)
    leases_of(ledger).drop(task_id, 1)  # as if started by a worker of the last version
    assert ledger.complete_attempt(task_id, 1, RESULT).status is Status.COMPLETED


def test_a_worker_and_the_leader_racing_record_one_outcome(store_env: dict[str, str]) -> None:
    """The worker completes the attempt while the leader takes its lapsing lease and
    records worker_lost: every time exactly one of the two is stored."""
    worker = Ledger(store_env, lease_seconds=0.03)
    leader = Ledger(store_env, lease_seconds=0.03)
    outcomes: dict[str, int] = {"completed": 0, "lost": 0}
    try:
        for _ in range(40):
            task_id = started(worker)
            go = threading.Barrier(2)

            def complete(task_id: UUID = task_id, go: threading.Barrier = go) -> None:
                go.wait()
                time.sleep(random.uniform(0, 0.06))
                with contextlib.suppress(TransitionRefused):
                    worker.complete_attempt(task_id, 1, RESULT)

            def take(task_id: UUID = task_id, go: threading.Barrier = go) -> None:
                go.wait()
                give_up = time.monotonic() + 2
                while time.monotonic() < give_up:
                    for lapsed in leases_of(leader).take_lapsed():
                        try:
                            leader.fail_attempt(lapsed.task_id, 1, LOST, retryable=False)
                        except TransitionRefused:
                            leases_of(leader).drop(lapsed.task_id, lapsed.attempt)
                    if leases_of(leader).held(task_id, 1) is None:
                        return
                    time.sleep(0.005)

            threads = [threading.Thread(target=complete), threading.Thread(target=take)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            history = [h.type for h in leader.history(task_id)]
            ends = [t for t in history if t in ("AttemptCompleted", "AttemptFailed")]
            assert len(ends) == 1, history
            outcomes["completed" if ends == ["AttemptCompleted"] else "lost"] += 1
    finally:
        worker.close()
        leader.close()
    assert outcomes["completed"] > 0
    assert outcomes["lost"] > 0, "the race never went the leader's way: not a real race"
