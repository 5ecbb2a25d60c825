"""The task timeline of the dashboard (api/ui/timeline.py), from events and attempt states
made up here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from api.ui.timeline import LABEL_WIDTH, WIDTH, build
from ledger.state import AttemptState, HistoryEntry

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def entry(version: int, kind: str, seconds: float, **data: Any) -> HistoryEntry:
    return HistoryEntry(version=version, type=kind, at=at(seconds), data=data)


def scheduled(
    version: int, seconds: float, attempt: int, reason: str, by: str, wait: float = 0.0
) -> HistoryEntry:
    return entry(
        version,
        "AttemptScheduled",
        seconds,
        attempt=attempt,
        reason=reason,
        not_before=at(seconds + wait),
        deadline=at(seconds + 30),
        ttl_seconds=30.0,
        by=by,
    )


def attempt(
    number: int,
    scheduled: float,
    *,
    reason: str = "submitted",
    wait: float = 0.0,
    deadline: float | None = None,
    started: float | None = None,
    worker: str | None = None,
    finished: float | None = None,
    outcome: str | None = None,
) -> AttemptState:
    """An attempt as the ledger's state has it (TaskState.attempts)."""
    return AttemptState(
        number=number,
        reason=reason,
        scheduled_at=at(scheduled),
        not_before=at(scheduled + wait),
        deadline=at(scheduled + 30 if deadline is None else deadline),
        started_at=None if started is None else at(started),
        worker_id=worker,
        finished_at=None if finished is None else at(finished),
        outcome=outcome,
        result=None,
        error=None,
        retryable=None,
        detected_by=None,
    )


SUBMITTED = entry(1, "TaskSubmitted", 0, submitted_by="cfg-1234", description="d")


def test_a_failed_attempt_then_an_automatic_retry_after_a_backoff() -> None:
    events = [
        SUBMITTED,
        scheduled(2, 0, 1, "submitted", "cfg-1234"),
        entry(3, "AttemptStarted", 1, attempt=1, worker_id="w-1"),
        entry(
            4,
            "AttemptFailed",
            3,
            attempt=1,
            error={"kind": "program_error", "message": "boom"},
            retryable=True,
        ),
        scheduled(5, 3, 2, "auto-retry", "ledger:retry-policy", wait=2),
        entry(6, "AttemptStarted", 6, attempt=2, worker_id="w-2"),
        entry(7, "AttemptCompleted", 8, attempt=2, result={"exit_code": 0, "duration_ms": 5.0}),
    ]
    attempts = [
        attempt(1, 0, started=1, worker="w-1", finished=3, outcome="failed"),
        attempt(
            2,
            3,
            reason="auto-retry",
            wait=2,
            started=6,
            worker="w-2",
            finished=8,
            outcome="completed",
        ),
    ]
    timeline = build(events, attempts, at(100))  # terminal: drawn to its last event
    assert timeline.end == at(8)
    first, second = timeline.rows
    assert [(s.kind, s.start, s.end) for s in first.segments] == [
        ("queued", at(0), at(1)),
        ("running", at(1), at(3)),
    ]
    assert [(s.kind, s.start, s.end) for s in second.segments] == [
        ("backoff", at(3), at(5)),
        ("queued", at(5), at(6)),
        ("running", at(6), at(8)),
    ]
    assert first.outcome == "failed"
    assert second.outcome == "completed"
    texts = [s.text for s in first.steps]
    assert texts[0] == "submitted by key cfg-1234"
    assert texts[1].startswith("scheduled (submitted) by key cfg-1234")
    assert "started by worker w-1" in texts
    assert any(t.startswith("failed on worker w-1: program_error: boom") for t in texts)
    assert second.steps[0].text.startswith("scheduled (auto-retry) by the retry policy")
    assert "backoff of 2.0 s" in second.steps[0].text
    # Deadlines past the drawing's end are not lines in it (the page says "deadline →").
    assert first.deadline_x is None
    running = second.segments[-1]
    assert running.x + running.width == WIDTH - 24.0
    assert first.segments[0].x == LABEL_WIDTH


def test_an_open_attempt_runs_to_now_and_expiry_and_cancel_name_who() -> None:
    events = [
        SUBMITTED,
        scheduled(2, 0, 1, "submitted", "cfg-1234"),
        entry(3, "AttemptStarted", 1, attempt=1, worker_id="w-1"),
    ]
    running = attempt(1, 0, started=1, worker="w-1")
    timeline = build(events, [running], at(10))
    (row,) = timeline.rows
    assert timeline.end == at(10)
    assert row.segments[-1].kind == "running"
    assert row.segments[-1].ongoing
    assert row.deadline_x is None  # 30 s deadline, drawing ends at 10 s
    expired = build(
        [*events, entry(4, "TaskExpired", 30, attempt=1, detected_by="reaper:r1")],
        [attempt(1, 0, started=1, worker="w-1", finished=30, outcome="expired")],
        at(40),
    )
    assert "detected by the reaper (reaper:r1)" in expired.rows[0].steps[-1].text
    assert expired.rows[0].deadline_x is not None
    cancelled = build(
        [*events, entry(4, "TaskCancelled", 5, attempt=1, by="cfg-9", reason="stop")],
        [attempt(1, 0, started=1, worker="w-1", finished=5, outcome="cancelled")],
        at(40),
    )
    assert cancelled.rows[0].steps[-1].text == "cancelled by key cfg-9: stop"
    assert cancelled.summary.startswith("Timeline of 1 attempt,")


def test_the_deadline_drawn_is_the_attempts_deadline_now_not_the_scheduled_one() -> None:
    """A TTL change while Pending moves the attempt's deadline (TaskUpdated): the timeline
    draws the attempt as the ledger's state has it, not as AttemptScheduled first set it."""
    events = [
        SUBMITTED,
        scheduled(2, 0, 1, "submitted", "cfg-1234"),  # deadline at 30 s
        entry(3, "TaskUpdated", 2, changes={"ttl_seconds": 5.0}, by="cfg-1234"),
    ]
    timeline = build(events, [attempt(1, 0, deadline=5)], at(10))
    (row,) = timeline.rows
    assert row.deadline == at(5)
    assert row.deadline_x is not None  # within the drawing, which ends at 10 s
    assert row.steps[-1].text == "ttl_seconds changed by key cfg-1234"
