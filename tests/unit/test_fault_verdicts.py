"""The fault suite's judge (bench/faults/verify.py): each anomaly it reports is counted
from the events and the runs it is given, and a clean round counts none. Pure logic over
hand-made histories: the suite itself runs the real servers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from bench.faults.load import Kind, Submission
from bench.faults.runs import Run
from bench.faults.verify import FENCE_SLACK, Event, RoundResult, Window, judge

T0 = 1_700_000_000.0
LEASE = 10.0
QUICK = Kind("quick", "print(1)", 60, 2, "Completed")


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def history(token: str, *steps: tuple[str, float, dict[str, Any]]) -> list[Event]:
    events = [
        Event(
            1, "TaskSubmitted", T0, {"description": "faults r quick 1", "data": {"token": token}}
        ),
        Event(
            2, "AttemptScheduled", T0, {"attempt": 1, "reason": "submit", "deadline": iso(T0 + 60)}
        ),
    ]
    for kind, at, data in steps:
        events.append(Event(len(events) + 1, kind, at, data))
    return events


def started(n: int, at: float, worker: str = "w1") -> tuple[str, float, dict[str, Any]]:
    return ("AttemptStarted", at, {"attempt": n, "worker_id": worker})


def completed(n: int, at: float) -> tuple[str, float, dict[str, Any]]:
    return ("AttemptCompleted", at, {"attempt": n, "result": {}})


def lost(n: int, at: float) -> tuple[str, float, dict[str, Any]]:
    error = {"kind": "worker_lost", "message": "the lease lapsed"}
    return ("AttemptFailed", at, {"attempt": n, "error": error, "retryable": True})


def scheduled(n: int, at: float) -> tuple[str, float, dict[str, Any]]:
    return (
        "AttemptScheduled",
        at,
        {"attempt": n, "reason": "auto-retry", "deadline": iso(T0 + 60)},
    )


def submission(token: str, status: int | None = 201) -> Submission:
    return Submission(token, QUICK, {}, status=status)


def run(token: str, at: float, last_seen: float, worker: str = "w1") -> Run:
    return Run(token, uuid.uuid4().hex, at, worker, last_seen)


def verdict(
    submissions: list[Submission],
    events: dict[uuid.UUID, list[Event]],
    runs: list[Run] | None = None,
    windows: list[Window] | None = None,
) -> RoundResult:
    result = RoundResult("fault", "what the suite did")
    judge(result, submissions, events, runs or [], windows or [], lambda w: w, LEASE)
    return result


def test_a_clean_round_counts_no_anomaly() -> None:
    events = {uuid.uuid4(): history("a", started(1, T0 + 1), completed(1, T0 + 2))}
    result = verdict([submission("a")], events, [run("a", T0 + 1.1, T0 + 1.5)])
    assert (result.accepted, result.ended_once, result.lost) == (1, 1, 0)
    assert result.duplicate_outcomes == result.duplicate_runs == result.unfenced_runs == 0
    assert result.false_worker_lost == result.rerun_after_lost == result.stored_though_5xx == 0
    assert result.max_lateness is None


def test_an_accepted_task_missing_or_never_ending_is_lost() -> None:
    events = {uuid.uuid4(): history("b", started(1, T0 + 1))}  # still InProgress
    result = verdict([submission("a"), submission("b")], events)
    assert result.lost == 2  # "a" is not in the store; "b" never ended
    assert result.ended_once == 0


def test_two_outcomes_of_one_attempt_are_a_duplicate() -> None:
    events = {
        uuid.uuid4(): history("a", started(1, T0 + 1), completed(1, T0 + 2), completed(1, T0 + 3))
    }
    result = verdict([submission("a")], events)
    assert result.duplicate_outcomes == 1
    assert result.ended_once == 0  # two transitions to a terminal state


def test_a_refused_submission_found_in_the_store_is_counted() -> None:
    events = {uuid.uuid4(): history("a", started(1, T0 + 1), completed(1, T0 + 2))}
    result = verdict([submission("a", status=503)], events)
    assert (result.refused_5xx, result.stored_though_5xx, result.accepted) == (1, 1, 0)


def lost_then_retried(token: str) -> list[Event]:
    """Attempt 1 on w1 recorded worker_lost at T0 + 12; attempt 2 completed on w2."""
    return history(
        token,
        started(1, T0 + 1),
        lost(1, T0 + 12),
        scheduled(2, T0 + 12),
        started(2, T0 + 13, "w2"),
        completed(2, T0 + 14),
    )


def test_worker_lost_is_false_unless_the_suite_killed_or_cut_off_the_worker() -> None:
    events = {uuid.uuid4(): lost_then_retried("a")}
    runs = [run("a", T0 + 1.1, T0 + 11.5), run("a", T0 + 13.1, T0 + 13.9, "w2")]
    unexplained = verdict([submission("a")], events, runs)
    assert (unexplained.worker_lost, unexplained.false_worker_lost) == (1, 1)
    assert unexplained.rerun_after_lost == 1  # ran in the lost attempt and again after
    killed = Window("killed", frozenset({"w1"}), T0 + 2, T0 + 2)
    assert verdict([submission("a")], events, runs, [killed]).false_worker_lost == 0
    short_cut = Window("cut off", frozenset({"w1"}), T0 + 2, T0 + 2 + LEASE * 0.5)
    assert verdict([submission("a")], events, runs, [short_cut]).false_worker_lost == 1


def test_a_run_alive_after_its_worker_lost_is_unfenced() -> None:
    events = {uuid.uuid4(): lost_then_retried("a")}
    fenced = [run("a", T0 + 1.1, T0 + 12 + FENCE_SLACK - 0.1)]
    assert verdict([submission("a")], events, fenced).unfenced_runs == 0
    unfenced = [run("a", T0 + 1.1, T0 + 12 + FENCE_SLACK + 2)]
    assert verdict([submission("a")], events, unfenced).unfenced_runs == 1


def test_two_runs_in_one_attempt_are_a_duplicate_run() -> None:
    events = {uuid.uuid4(): history("a", started(1, T0 + 1), completed(1, T0 + 5))}
    runs = [run("a", T0 + 1.1, T0 + 2), run("a", T0 + 2.5, T0 + 4)]
    assert verdict([submission("a")], events, runs).duplicate_runs == 1


def test_lateness_is_the_end_past_the_deadline() -> None:
    expired = ("TaskExpired", T0 + 61.5, {"attempt": 1, "detected_by": "reaper"})
    events = {uuid.uuid4(): history("a", started(1, T0 + 1), expired)}
    result = verdict([submission("a")], events)
    assert result.max_lateness is not None
    assert abs(result.max_lateness - 1.5) < 1e-6
