"""Random sequences of every command against the Task aggregate, checked against a model.

Commands name attempts near the current one (the one before, the current, the next), so
the sequences include what a redelivered worker command, a slow reaper and a client
racing each other look like: stale starts, outcomes for finished attempts, expiries after
a retry. The model says which commands the rules accept; the invariants say what must
hold of the task and its event log after every step.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eventsourcing.application import project_aggregate
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

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
    TransitionRefused,
)
from ledger.retry import RetryPolicy
from ledger.store import replay
from ledger.values import AttemptError, AttemptResult, Status, TaskLimits

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LIMITS = TaskLimits()
OUTCOME_EVENTS = {"AttemptCompleted", "AttemptFailed", "TaskExpired", "TaskCancelled"}


class FixedBackoff(RetryPolicy):
    """Deterministic delays so the model can predict whether a retry fits the deadline."""

    def delay(self, retry_number: int) -> float:
        return 2.0 * retry_number


@dataclass
class ModelAttempt:
    number: int
    reason: str
    deadline: datetime
    started: bool = False
    outcome: str | None = None


@dataclass
class Model:
    ttl: float
    max_attempts: int
    attempts: list[ModelAttempt] = field(default_factory=list)
    run_first: int = 1
    run_scheduled_at: datetime = T0

    @property
    def current(self) -> ModelAttempt:
        return self.attempts[-1]

    @property
    def status(self) -> Status:
        outcome = self.current.outcome
        if outcome is not None:
            return Status(outcome)
        return Status.IN_PROGRESS if self.current.started else Status.PENDING


class TaskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.policy = FixedBackoff()
        self.events: list[Any] = []

    @initialize(
        ttl=st.sampled_from([5, 10, 30, 60.5]),
        max_attempts=st.integers(1, 4),
    )
    def submit(self, ttl: float, max_attempts: int) -> None:
        self.task = Task.submit(
            task_id=uuid.uuid4(),
            now=self.now,
            description="d",
            language="python",
            code="pass",
            data=None,
            ttl_seconds=ttl,
            max_attempts=max_attempts,
            tenant="t",
            submitted_by="client",
            idempotency_key=None,
            limits=LIMITS,
        )
        self.model = Model(ttl=ttl, max_attempts=max_attempts)
        self.model.attempts.append(ModelAttempt(1, "submitted", self.now + timedelta(seconds=ttl)))
        self._collect()

    # -- helpers ------------------------------------------------------------------------------

    def _collect(self) -> list[Any]:
        new = list(self.task.collect_events())
        self.events.extend(new)
        return new

    def _attempt(self, offset: int) -> int:
        return self.model.current.number + offset

    def _run(self, expected: type[Exception] | None, command: Any) -> list[Any]:
        """Run `command`; it must be refused with `expected`, or accepted if None."""
        before = (self.task.version, self.model.status)
        if expected is None:
            command()
            new = self._collect()
            assert new, "an accepted command must record at least one event"
            if before[1].is_terminal:
                self._check_terminal_changes_only_by_retry_or_description(new)
            return new
        try:
            command()
        except expected:
            pass
        else:
            raise AssertionError(f"expected {expected.__name__}, the command was accepted")
        assert self.task.version == before[0], "a refused command changed the task"
        assert self._collect() == []
        return []

    def _running_refusal(self, attempt: int) -> type[TransitionRefused] | None:
        model = self.model
        if attempt != model.current.number:
            return AttemptNotCurrent
        if model.status.is_terminal:
            return TaskIsTerminal
        if not model.current.started:
            return AttemptNotStarted
        return None

    def _check_terminal_changes_only_by_retry_or_description(self, new: list[Any]) -> None:
        for event in new:
            name = type(event).__name__
            if name == "AttemptScheduled":
                assert event.reason == "manual-retry"
            elif name == "TaskUpdated":
                assert set(event.changes) == {"description"}
            elif name == "WebhookAttempted":
                pass  # a fact about a delivery, recorded in any state
            else:
                raise AssertionError(f"{name} recorded on a terminal task")

    # -- the world moves on -------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.001, 0.5, 1, 3, 7, 20]))
    def time_passes(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # -- worker commands ----------------------------------------------------------------------

    @rule(offset=st.integers(-1, 1), worker=st.sampled_from(["w1", "w2"]))
    def start(self, offset: int, worker: str) -> None:
        attempt, model = self._attempt(offset), self.model
        expected: type[Exception] | None
        if attempt != model.current.number:
            expected = AttemptNotCurrent
        elif model.status.is_terminal:
            expected = TaskIsTerminal
        elif model.current.started:
            expected = AttemptAlreadyStarted
        elif self.now >= model.current.deadline:
            expected = DeadlinePassed
        else:
            expected = None
        if self._run(expected, lambda: self.task.start_attempt(attempt, worker, self.now)):
            model.current.started = True

    @rule(offset=st.integers(-1, 1))
    def complete(self, offset: int) -> None:
        attempt = self._attempt(offset)
        expected = self._running_refusal(attempt)
        result = AttemptResult(stdout="ok")
        if self._run(expected, lambda: self.task.complete_attempt(attempt, result, self.now)):
            self.model.current.outcome = "Completed"

    @rule(offset=st.integers(-1, 1), retryable=st.booleans())
    def fail(self, offset: int, retryable: bool) -> None:
        attempt, model = self._attempt(offset), self.model
        expected = self._running_refusal(attempt)
        error = AttemptError("program_error", "boom")
        new = self._run(
            expected,
            lambda: self.task.fail_attempt(
                attempt, error, retryable=retryable, now=self.now, policy=self.policy
            ),
        )
        if not new:
            return
        model.current.outcome = "Failed"
        in_run = attempt - model.run_first + 1
        not_before = self.now + timedelta(seconds=self.policy.delay(in_run))
        deadline = model.current.deadline
        if retryable and in_run < model.max_attempts and not_before < deadline:
            assert [type(e).__name__ for e in new] == ["AttemptFailed", "AttemptScheduled"]
            scheduled = new[1]
            assert scheduled.reason == "auto-retry"
            assert scheduled.deadline == deadline, "an automatic retry moved the deadline"
            assert scheduled.not_before == not_before
            model.attempts.append(ModelAttempt(attempt + 1, "auto-retry", deadline))
        else:
            assert [type(e).__name__ for e in new] == ["AttemptFailed"]

    # -- the reaper ---------------------------------------------------------------------------

    @rule(offset=st.integers(-1, 1), detected_by=st.sampled_from(["worker", "reaper"]))
    def expire(self, offset: int, detected_by: str) -> None:
        attempt, model = self._attempt(offset), self.model
        expected: type[Exception] | None
        if attempt != model.current.number:
            expected = AttemptNotCurrent
        elif model.status.is_terminal:
            expected = TaskIsTerminal
        elif self.now < model.current.deadline:
            expected = DeadlineNotReached
        else:
            expected = None
        if self._run(expected, lambda: self.task.expire(attempt, detected_by, self.now)):
            model.current.outcome = "Expired"

    # -- client commands ----------------------------------------------------------------------

    @rule()
    def cancel(self) -> None:
        expected = TaskIsTerminal if self.model.status.is_terminal else None
        if self._run(expected, lambda: self.task.cancel("client", "", self.now)):
            self.model.current.outcome = "Cancelled"

    @rule(ttl=st.one_of(st.none(), st.sampled_from([1, 15, 90])))
    def retry(self, ttl: float | None) -> None:
        model = self.model
        ok = model.status in (Status.FAILED, Status.EXPIRED, Status.CANCELLED)
        expected = None if ok else NotRetryable
        if self._run(expected, lambda: self.task.retry(self.now, ttl, LIMITS, "client")):
            model.ttl = ttl if ttl is not None else model.ttl
            number = model.current.number + 1
            deadline = self.now + timedelta(seconds=model.ttl)
            model.attempts.append(ModelAttempt(number, "manual-retry", deadline))
            model.run_first = number
            model.run_scheduled_at = self.now

    @rule(description=st.sampled_from(["d", "renamed"]))
    def update_description(self, description: str) -> None:
        changes = description != self.task.description
        try:
            changed = self.task.update({"description": description}, "client", self.now, LIMITS)
        except TransitionRefused as refused:
            raise AssertionError("a description may change in any state") from refused
        assert changed == changes
        self._collect()

    @rule(
        field_value=st.sampled_from(
            [("data", {"k": 1}), ("code", "print(2)"), ("max_attempts", 2), ("ttl_seconds", 45)]
        )
    )
    def update_locked_field(self, field_value: tuple[str, Any]) -> None:
        name, value = field_value
        model = self.model
        unchanged = getattr(self.task, name) == value
        try:
            changed = self.task.update({name: value}, "client", self.now, LIMITS)
        except FieldLocked:
            assert model.status is not Status.PENDING
            assert not unchanged
            assert self._collect() == []
            return
        except InvalidTask:  # the new ttl would put the deadline in the past
            assert name == "ttl_seconds"
            assert model.run_scheduled_at + timedelta(seconds=value) <= self.now
            assert self._collect() == []
            return
        assert changed != unchanged
        assert model.status is Status.PENDING or unchanged
        self._collect()
        if changed and name == "max_attempts":
            model.max_attempts = value
        if changed and name == "ttl_seconds":
            model.ttl = value
            model.current.deadline = model.run_scheduled_at + timedelta(seconds=value)

    @rule(
        url=st.sampled_from([None, "https://hooks.example.com/a", "https://hooks.example.com/b"]),
        events=st.sampled_from([None, ["AttemptCompleted"], ["AttemptStarted", "TaskExpired"]]),
    )
    def update_callback(self, url: str | None, events: list[str] | None) -> None:
        patch = {"callback_url": url, "callback_events": events}
        unchanged = (self.task.callback_url, self.task.callback_events) == (url, events)
        try:
            changed = self.task.update(patch, "client", self.now, LIMITS)
        except TaskIsTerminal:
            assert self.model.status.is_terminal
            assert not unchanged
            assert self._collect() == []
            return
        assert changed != unchanged
        assert not self.model.status.is_terminal or unchanged
        assert (self.task.callback_url, self.task.callback_events) == (url, events)
        self._collect()

    @rule(
        outcome=st.sampled_from(["delivered", "failed", "gave-up"]),
        code=st.sampled_from([None, 200, 500]),
    )
    def webhook_attempted(self, outcome: str, code: int | None) -> None:
        before = (self.task.status, self.task.current.number)
        self._run(
            None,
            lambda: self.task.record_webhook_attempt(
                delivery_id=uuid.uuid4(),
                trigger_version=self.task.version,
                trigger_type="AttemptCompleted",
                url="https://hooks.example.com/a",
                delivery_attempt=1,
                outcome=outcome,
                status_code=code,
                error=None if code == 200 else "boom",
                next_attempt_at=None,
                now=self.now,
            ),
        )
        assert (self.task.status, self.task.current.number) == before
        assert self.task.last_delivery is not None
        assert self.task.last_delivery["outcome"] == outcome

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def status_is_derived_as_the_model_says(self) -> None:
        assert self.task.status == self.model.status

    @invariant()
    def attempts_are_numbered_without_gaps(self) -> None:
        assert [a.number for a in self.task.attempts] == list(range(1, len(self.task.attempts) + 1))
        assert len(self.task.attempts) == len(self.model.attempts)
        assert self.task.current.deadline == self.model.current.deadline

    @invariant()
    def run_attempt_counts_from_the_runs_first_attempt(self) -> None:
        model = self.model
        assert self.task.run_attempt == model.current.number - model.run_first + 1

    @invariant()
    def at_most_one_start_and_one_outcome_per_attempt(self) -> None:
        starts: dict[int, int] = {}
        outcomes: dict[int, int] = {}
        for event in self.events:
            name = type(event).__name__
            if name == "AttemptStarted":
                starts[event.attempt] = starts.get(event.attempt, 0) + 1
            elif name in OUTCOME_EVENTS:
                outcomes[event.attempt] = outcomes.get(event.attempt, 0) + 1
        assert all(n == 1 for n in starts.values()), starts
        assert all(n == 1 for n in outcomes.values()), outcomes

    @invariant()
    def versions_count_the_events(self) -> None:
        assert [e.originator_version for e in self.events] == list(range(1, len(self.events) + 1))
        assert self.task.version == len(self.events)

    @invariant()
    def the_task_rebuilt_from_its_events_equals_the_live_one(self) -> None:
        assert project_aggregate(None, self.events) == self.task
        assert replay(self.events) == self.task  # what the ledger loads with


TaskMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_task_state_machine = TaskMachine.TestCase
