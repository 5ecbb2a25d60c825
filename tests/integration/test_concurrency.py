"""Writers race for the same attempt against real PostgreSQL: the first writer wins.

Each round releases all racers at once (a barrier) on one task; every racer has its own
Ledger and connection pool, in its own thread or process. Afterwards the event store must
hold exactly one outcome per attempt, exactly one racer must have been told it won, and
the losers must have actually lost a version race at least sometimes (otherwise the test
would not be testing a race at all).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from uuid import UUID

import pytest

from ledger import Ledger, ManualClock
from ledger.errors import TransitionRefused
from tests.integration.racers import RaceResult, act
from tests.integration.racers import keep_barrier as _keep_barrier
from tests.integration.racers import race_in_child as _race_in_child

pytestmark = pytest.mark.postgres

ROUNDS = 300
OUTCOMES = {"AttemptCompleted", "AttemptFailed", "TaskExpired", "TaskCancelled"}


def prepare(ledger: Ledger, rounds: int, *, started: bool) -> list[UUID]:
    ids = []
    for n in range(rounds):
        task = ledger.submit(
            description=f"race {n}",
            language="python",
            code="pass",
            ttl_seconds=1,
            max_attempts=1,
            tenant="t",
            submitted_by="k",
        ).task
        if started:
            ledger.start_attempt(task.id, 1, "w0")
        ids.append(task.id)
    return ids


def outcome_events(ledger: Ledger, task_id: UUID) -> list[str]:
    return [h.type for h in ledger.history(task_id) if h.type in OUTCOMES]


def check_one_winner_per_task(
    ledger: Ledger, ids: list[UUID], results: list[RaceResult], outcome_types: set[str]
) -> None:
    winners = Counter(r.task_id for r in results if r.won)
    assert all(winners[task_id] == 1 for task_id in ids), "every task needs exactly one winner"
    for task_id in ids:
        events = [h.type for h in ledger.history(task_id) if h.type in outcome_types]
        assert len(events) == 1, f"task {task_id} recorded {events}"


@pytest.fixture
def racing_ledgers(store_env: dict[str, str], clock: ManualClock) -> Iterator[list[Ledger]]:
    ledgers = [Ledger(store_env, clock=clock) for _ in range(4)]
    yield ledgers
    for ledger in ledgers:
        ledger.close()


def race_threads(ledgers: list[Ledger], actions: list[str], ids: list[UUID]) -> list[RaceResult]:
    barrier = threading.Barrier(len(actions))

    def racer(index: int) -> list[RaceResult]:
        results = []
        ledger, action = ledgers[index], actions[index]
        for task_id in ids:
            barrier.wait(timeout=60)
            try:
                act(ledger, action, task_id, f"racer-{index}")
            except TransitionRefused:
                results.append(RaceResult(task_id, action, won=False))
            else:
                results.append(RaceResult(task_id, action, won=True))
        return results

    with ThreadPoolExecutor(len(actions)) as pool:
        return [r for rs in pool.map(racer, range(len(actions))) for r in rs]


@pytest.mark.slow
def test_worker_completion_and_reaper_expiry_race_in_threads(
    ledger: Ledger, clock: ManualClock, racing_ledgers: list[Ledger]
) -> None:
    ids = prepare(ledger, ROUNDS, started=True)
    clock.advance(5)  # past every deadline: completing and expiring are both allowed now
    results = race_threads(racing_ledgers[:2], ["complete", "expire"], ids)
    check_one_winner_per_task(ledger, ids, results, OUTCOMES)
    wins = Counter(r.action for r in results if r.won)
    assert set(wins) == {"complete", "expire"}, f"one side never won: {wins}"
    assert sum(lg.version_conflicts for lg in racing_ledgers) > 0


@pytest.mark.slow
def test_four_kinds_of_outcome_race_in_threads(
    ledger: Ledger, clock: ManualClock, racing_ledgers: list[Ledger]
) -> None:
    ids = prepare(ledger, ROUNDS, started=True)
    clock.advance(5)
    results = race_threads(racing_ledgers, ["complete", "fail", "expire", "cancel"], ids)
    check_one_winner_per_task(ledger, ids, results, OUTCOMES)
    assert sum(lg.version_conflicts for lg in racing_ledgers) > 0


@pytest.mark.slow
def test_two_workers_race_to_start_the_same_attempt_in_threads(
    ledger: Ledger, racing_ledgers: list[Ledger]
) -> None:
    ids = prepare(ledger, ROUNDS, started=False)
    results = race_threads(racing_ledgers[:2], ["start", "start"], ids)
    check_one_winner_per_task(ledger, ids, results, {"AttemptStarted"})
    assert sum(lg.version_conflicts for lg in racing_ledgers) > 0


@pytest.mark.slow
def test_outcomes_race_across_processes(store_env: dict[str, str], ledger: Ledger) -> None:
    # Tasks get real deadlines (1 s ttl); the racers' clocks run an hour ahead, so every
    # deadline has passed for them and expiring is allowed alongside the other outcomes.
    ledger.clock = ManualClock(datetime.now(UTC))
    ids = prepare(ledger, ROUNDS, started=True)
    actions = ["complete", "expire", "fail", "cancel"]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(actions))
    with context.Pool(len(actions), initializer=_keep_barrier, initargs=(barrier,)) as pool:
        jobs = [
            pool.apply_async(_race_in_child, (store_env, ids, action, f"proc-{i}"))
            for i, action in enumerate(actions)
        ]
        outputs = [job.get(timeout=600) for job in jobs]
    results = [r for rs, _ in outputs for r in rs]
    check_one_winner_per_task(ledger, ids, results, OUTCOMES)
    assert sum(c for _, c in outputs) > 0, "the processes never actually raced"
