"""The Task aggregate's rules, one example each. The state machine test covers interleavings."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.application import project_aggregate

from ledger.domain import Task
from ledger.errors import (
    AttemptAlreadyStarted,
    AttemptNotCurrent,
    AttemptNotStarted,
    DeadlineNotReached,
    DeadlinePassed,
    FieldLocked,
    InvalidTask,
    NotRetryable,
    TaskIsTerminal,
)
from ledger.retry import RetryPolicy
from ledger.values import AttemptError, AttemptResult, Status, TaskLimits

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LIMITS = TaskLimits()
FAST_RETRIES = RetryPolicy(base_seconds=1, rng=random.Random(7))
ERROR = AttemptError("program_error", "exit status 1", exit_code=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def submit(**fields: Any) -> Task:
    values: dict[str, Any] = {
        "task_id": uuid.uuid4(),
        "now": T0,
        "description": "add numbers",
        "language": "python",
        "code": "print(1 + 1)",
        "data": {"n": 1},
        "ttl_seconds": 60,
        "max_attempts": 3,
        "tenant": "acme",
        "submitted_by": "key-1",
        "idempotency_key": None,
        "limits": LIMITS,
    }
    values.update(fields)
    return Task.submit(**values)


def event_types(task: Task) -> list[str]:
    return [type(e).__name__ for e in task.collect_events()]


def test_submit_records_submission_and_first_attempt_with_deadline() -> None:
    task = submit(ttl_seconds=30)
    assert event_types(task) == ["TaskSubmitted", "AttemptScheduled"]
    assert task.status is Status.PENDING
    assert task.current.number == 1
    assert task.current.deadline == at(30)
    assert task.current.reason == "submitted"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ttl_seconds", 0),
        ("ttl_seconds", -1),
        ("ttl_seconds", float("nan")),
        ("ttl_seconds", 86_401),
        ("ttl_seconds", True),
        ("max_attempts", 0),
        ("max_attempts", 11),
        ("max_attempts", 2.0),
        ("language", ""),
        ("language", "c sharp"),
        ("description", "x" * 1_001),
        ("code", "x" * (64 * 1024 + 1)),
        ("data", {"x": float("inf")}),
        ("data", {"x": 2**64}),
        ("data", {1: "non-string key"}),
        ("data", {"x": {1, 2}}),
        ("tenant", ""),
        ("description", "nul\x00"),
        ("code", "print(1)\x00"),
    ],
)
def test_submit_refuses_invalid_fields_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidTask) as refused:
        submit(**{field: value})
    assert refused.value.field == field


def test_a_started_attempt_completes() -> None:
    task = submit()
    task.start_attempt(1, "w1", at(1))
    assert task.status is Status.IN_PROGRESS
    task.complete_attempt(1, AttemptResult(stdout="2\n"), at(2))
    assert task.status is Status.COMPLETED
    assert task.current.result == {
        "stdout": "2\n",
        "stderr": "",
        "exit_code": 0,
        "duration_ms": 0.0,
        "truncated": False,
    }


def test_an_attempt_starts_at_most_once() -> None:
    task = submit()
    task.start_attempt(1, "w1", at(1))
    with pytest.raises(AttemptAlreadyStarted, match="already started by worker w1"):
        task.start_attempt(1, "w2", at(1))


def test_an_attempt_cannot_start_after_its_deadline() -> None:
    task = submit(ttl_seconds=10)
    with pytest.raises(DeadlinePassed, match="expire the task instead"):
        task.start_attempt(1, "w1", at(10))


def test_outcomes_need_a_started_attempt() -> None:
    task = submit()
    with pytest.raises(AttemptNotStarted):
        task.complete_attempt(1, AttemptResult(), at(1))
    with pytest.raises(AttemptNotStarted):
        task.fail_attempt(1, ERROR, retryable=True, now=at(1), policy=FAST_RETRIES)


def test_commands_for_another_attempt_are_stale() -> None:
    task = submit()
    with pytest.raises(AttemptNotCurrent, match="current attempt is 1"):
        task.start_attempt(2, "w1", at(1))
    task.start_attempt(1, "w1", at(1))
    with pytest.raises(AttemptNotCurrent):
        task.complete_attempt(0, AttemptResult(), at(1))


def test_one_outcome_per_attempt() -> None:
    task = submit()
    task.start_attempt(1, "w1", at(1))
    task.complete_attempt(1, AttemptResult(), at(2))
    with pytest.raises(TaskIsTerminal, match="already Completed"):
        task.complete_attempt(1, AttemptResult(), at(2))
    with pytest.raises(TaskIsTerminal):
        task.fail_attempt(1, ERROR, retryable=True, now=at(2), policy=FAST_RETRIES)
    with pytest.raises(TaskIsTerminal):
        task.expire(1, "reaper", at(100))


def test_a_retryable_failure_schedules_a_retry_after_a_backoff_with_the_same_deadline() -> None:
    task = submit(ttl_seconds=60, max_attempts=3)
    task.start_attempt(1, "w1", at(1))
    task.fail_attempt(1, ERROR, retryable=True, now=at(2), policy=FAST_RETRIES)
    assert task.status is Status.PENDING
    second = task.current
    assert second.number == 2
    assert second.reason == "auto-retry"
    assert second.deadline == at(60)
    assert at(2.5) <= second.not_before <= at(3)  # 1 s step, equal jitter: [0.5, 1] s


def test_retries_stop_at_max_attempts() -> None:
    task = submit(ttl_seconds=600, max_attempts=2)
    task.start_attempt(1, "w1", at(1))
    task.fail_attempt(1, ERROR, retryable=True, now=at(2), policy=FAST_RETRIES)
    task.start_attempt(2, "w1", at(5))
    task.fail_attempt(2, ERROR, retryable=True, now=at(6), policy=FAST_RETRIES)
    assert task.status is Status.FAILED
    assert task.current.number == 2


def test_permanent_errors_are_never_retried() -> None:
    task = submit(max_attempts=5)
    task.start_attempt(1, "w1", at(1))
    compile_error = AttemptError("compile_error", "CS1002: ; expected")
    task.fail_attempt(1, compile_error, retryable=False, now=at(2), policy=FAST_RETRIES)
    assert task.status is Status.FAILED
    assert len(task.attempts) == 1


def test_no_retry_when_the_backoff_would_end_after_the_deadline() -> None:
    task = submit(ttl_seconds=3, max_attempts=5)
    task.start_attempt(1, "w1", at(1))
    task.fail_attempt(1, ERROR, retryable=True, now=at(2.9), policy=FAST_RETRIES)
    assert task.status is Status.FAILED


def test_backoff_delays_grow() -> None:
    policy = RetryPolicy(base_seconds=1, max_seconds=1_000, rng=random.Random(1))
    delays = [policy.delay(n) for n in range(1, 8)]
    assert delays == sorted(delays)
    assert all(2 ** (n - 2) <= d <= 2 ** (n - 1) for n, d in enumerate(delays, start=1))


def test_expire_only_after_the_deadline() -> None:
    task = submit(ttl_seconds=10)
    with pytest.raises(DeadlineNotReached):
        task.expire(1, "reaper", at(9.999))
    task.expire(1, "reaper", at(10))
    assert task.status is Status.EXPIRED
    assert task.current.detected_by == "reaper"


def test_cancel_only_what_is_not_terminal() -> None:
    task = submit()
    task.start_attempt(1, "w1", at(1))
    task.cancel("key-1", "changed my mind", at(2))
    assert task.status is Status.CANCELLED
    with pytest.raises(TaskIsTerminal, match="cannot be cancelled"):
        task.cancel("key-1", "again", at(3))


@pytest.mark.parametrize("end", ["failed", "expired", "cancelled"])
def test_a_client_retry_opens_a_new_run_with_a_new_deadline_and_budget(end: str) -> None:
    task = submit(ttl_seconds=10, max_attempts=1)
    task.start_attempt(1, "w1", at(1))
    if end == "failed":
        task.fail_attempt(1, ERROR, retryable=True, now=at(2), policy=FAST_RETRIES)
    elif end == "expired":
        task.expire(1, "worker", at(10))
    else:
        task.cancel("key-1", "", at(2))
    task.retry(at(20), ttl_seconds=5, limits=LIMITS, by="key-1")
    assert task.status is Status.PENDING
    assert task.current.number == 2
    assert task.current.reason == "manual-retry"
    assert task.current.deadline == at(25)
    assert task.ttl_seconds == 5
    assert [a.number for a in task.attempts] == [1, 2]


def test_run_attempt_counts_the_attempts_of_the_current_run() -> None:
    """`attempt` counts over the task's life; `run_attempt` is what max_attempts bounds."""
    task = submit(ttl_seconds=600, max_attempts=2)
    assert (task.current.number, task.run_attempt) == (1, 1)
    task.start_attempt(1, "w1", at(1))
    task.fail_attempt(1, ERROR, retryable=True, now=at(2), policy=FAST_RETRIES)
    assert (task.current.number, task.run_attempt) == (2, 2)  # an automatic retry: same run
    task.start_attempt(2, "w1", at(5))
    task.fail_attempt(2, ERROR, retryable=True, now=at(6), policy=FAST_RETRIES)
    assert task.status is Status.FAILED
    assert (task.current.number, task.run_attempt) == (2, 2)
    task.retry(at(20), None, LIMITS, "key-1")
    assert (task.current.number, task.run_attempt) == (3, 1)  # a manual retry: a new run
    task.start_attempt(3, "w1", at(21))
    task.fail_attempt(3, ERROR, retryable=True, now=at(22), policy=FAST_RETRIES)
    assert (task.current.number, task.run_attempt) == (4, 2)
    # Derived from the events: the task rebuilt from them says the same.
    rebuilt = project_aggregate(None, task.collect_events())
    assert rebuilt is not None
    assert (rebuilt.current.number, rebuilt.run_attempt) == (4, 2)


@pytest.mark.parametrize("state", ["pending", "in_progress", "completed"])
def test_only_failed_expired_or_cancelled_tasks_can_be_retried(state: str) -> None:
    task = submit()
    if state != "pending":
        task.start_attempt(1, "w1", at(1))
    if state == "completed":
        task.complete_attempt(1, AttemptResult(), at(2))
    with pytest.raises(NotRetryable):
        task.retry(at(3), None, LIMITS, "key-1")


def test_update_merges_data_while_pending() -> None:
    task = submit(data={"a": 1, "b": {"c": 2}})
    assert task.update({"data": {"b": {"c": None, "d": 3}}}, "key-1", at(1), LIMITS)
    assert task.data == {"a": 1, "b": {"d": 3}}


def test_an_update_that_changes_nothing_records_nothing() -> None:
    task = submit(description="same")
    task.collect_events()
    assert not task.update({"description": "same"}, "key-1", at(1), LIMITS)
    assert task.collect_events() == []


def test_after_pending_only_the_description_may_change() -> None:
    task = submit()
    task.start_attempt(1, "w1", at(1))
    assert task.update({"description": "renamed"}, "key-1", at(2), LIMITS)
    with pytest.raises(FieldLocked, match="code can only change while it is Pending"):
        task.update({"code": "print(2)"}, "key-1", at(2), LIMITS)


def test_updating_the_ttl_while_pending_moves_the_deadline() -> None:
    task = submit(ttl_seconds=60)
    task.update({"ttl_seconds": 120}, "key-1", at(5), LIMITS)
    assert task.current.deadline == at(120)
    with pytest.raises(InvalidTask, match="deadline in the past"):
        task.update({"ttl_seconds": 4}, "key-1", at(5), LIMITS)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"status": "Completed"}, "status"),
        ({"description": None}, "description"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"data": {"x": float("nan")}}, "data"),
    ],
)
def test_update_refuses_bad_patches_naming_the_field(patch: dict[str, Any], field: str) -> None:
    task = submit()
    with pytest.raises(InvalidTask) as refused:
        task.update(patch, "key-1", at(1), LIMITS)
    assert refused.value.field == field


def test_program_output_with_nul_bytes_is_kept_storable() -> None:
    task = submit()
    task.start_attempt(1, "w1", at(1))
    task.complete_attempt(1, AttemptResult(stdout="a\x00b", stderr="\x00"), at(2))
    assert task.current.result is not None
    assert (task.current.result["stdout"], task.current.result["stderr"]) == ("a\ufffdb", "\ufffd")


def test_a_refused_command_changes_nothing() -> None:
    task = submit()
    task.collect_events()
    version = task.version
    with pytest.raises(AttemptNotStarted):
        task.complete_attempt(1, AttemptResult(), at(1))
    assert task.version == version
    assert task.collect_events() == []


def test_a_task_rebuilt_from_its_events_equals_the_live_one() -> None:
    task = submit()
    events = list(task.collect_events())
    task.start_attempt(1, "w1", at(1))
    task.fail_attempt(1, ERROR, retryable=True, now=at(2), policy=FAST_RETRIES)
    task.update({"description": "renamed"}, "key-1", at(3), LIMITS)
    events += task.collect_events()
    assert project_aggregate(None, events) == task
