"""The task status view's fold (projections/task_status.py), the whole of the view's logic.

The fold sees events as the projection runner hands them over: stored, then read back
through the store's mapper. Whatever the Task aggregate accepted, in whatever order, the
row folded from its events must say what the aggregate says. The sequences of commands
are those of the aggregate's own state machine (tests/unit/test_task_state_machine.py):
every event type, stale and refused commands, retries, updates while Pending.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.domain import DomainEventProtocol
from hypothesis import settings
from hypothesis.stateful import invariant

from ledger.log import Change, event_payload
from ledger.persistence import EventMapper, OrjsonTranscoder
from ledger.values import Outcome
from projections.task_status import COLUMNS, SUMMARY_CHARS, fold
from tests.unit import test_task_state_machine as aggregate_machine

MAPPER = EventMapper(transcoder=OrjsonTranscoder())
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def as_stored_and_read(event: DomainEventProtocol[uuid.UUID], position: int) -> Change:
    """The event as the runner's `read_changes` gives it to the view."""
    stored = MAPPER.to_stored_event(event)
    read = MAPPER.to_domain_event(stored)
    return Change(
        position=position,
        stream="Task",
        task_id=read.originator_id,
        version=stored.originator_version,
        type=type(read).__name__,
        at=vars(read)["timestamp"],
        data=event_payload(read),
        size=len(stored.state),
    )


class FoldMachine(aggregate_machine.TaskMachine):
    """The aggregate's state machine, with the view's row folded from every new event."""

    def __init__(self) -> None:
        super().__init__()
        self.row: dict[str, Any] | None = None
        self.position = 0

    def _collect(self) -> list[Any]:
        new = super()._collect()
        for event in new:
            self.position += 10  # positions are global: other tasks' events come between
            self.row = fold(self.row, as_stored_and_read(event, self.position))
        return new

    @invariant()
    def the_row_says_what_the_task_says(self) -> None:
        task, current = self.task, self.task.current
        failed = current.outcome is Outcome.FAILED
        if current.outcome is Outcome.COMPLETED:
            summary = (current.result or {})["stdout"]
        elif failed:
            summary = (current.error or {})["message"]
        else:
            summary = None
        assert self.row == {
            "id": task.id,
            "tenant": task.tenant,
            "description": task.description,
            "language": task.language,
            "status": str(task.status),
            "attempt": current.number,
            "max_attempts": task.max_attempts,
            "ttl_seconds": task.ttl_seconds,
            "scheduled_at": task.run_first.scheduled_at,
            "deadline": current.deadline,
            "not_before": current.not_before,
            "created_at": task.created_on,
            "updated_at": task.modified_on,
            "started_at": current.started_at,
            "finished_at": current.finished_at,
            "worker_id": current.worker_id,
            "summary": summary,
            "error_kind": (current.error or {})["kind"] if failed else None,
            "version": task.version,
            "position": self.position,
            "last_delivery_id": (task.last_delivery or {}).get("delivery_id"),
            "last_delivery_outcome": (task.last_delivery or {}).get("outcome"),
            "last_delivery_at": (task.last_delivery or {}).get("at"),
        }


FoldMachine.TestCase.settings = settings(
    aggregate_machine.TaskMachine.TestCase.settings, max_examples=150
)
test_the_folded_row_agrees_with_the_aggregate = FoldMachine.TestCase


# -- single changes -----------------------------------------------------------------------------


def change(kind: str, data: dict[str, Any], *, version: int = 2, position: int = 7) -> Change:
    return Change(
        position=position,
        stream="Task",
        task_id=uuid.UUID(int=1),
        version=version,
        type=kind,
        at=T0 + timedelta(seconds=version),
        data=data,
    )


def submitted() -> dict[str, Any]:
    return fold(
        None,
        change(
            "TaskSubmitted",
            {
                "tenant": "acme",
                "description": "d",
                "language": "python",
                "max_attempts": 3,
                "ttl_seconds": 30,
            },
            version=1,
            position=1,
        ),
    )


def test_a_submitted_task_has_every_column_and_is_pending() -> None:
    row = submitted()
    assert set(row) == set(COLUMNS)
    assert (row["status"], row["attempt"], row["version"], row["position"]) == ("Pending", 0, 1, 1)


def test_an_event_of_a_task_the_view_never_saw_is_refused() -> None:
    with pytest.raises(LookupError, match="AttemptStarted at position 7 for unknown task"):
        fold(None, change("AttemptStarted", {"attempt": 1, "worker_id": "w"}))


def test_folding_leaves_the_row_it_was_given_as_it_was() -> None:
    row = submitted()
    before = copy.deepcopy(row)
    after = fold(row, change("AttemptStarted", {"attempt": 1, "worker_id": "w"}))
    assert row == before
    assert after["status"] == "InProgress"


# What each outcome's summary is made of: the program's output, or the error's message.
TEXT_OF_OUTCOME = {
    "AttemptCompleted": lambda text: {"attempt": 1, "result": {"stdout": text}},
    "AttemptFailed": lambda text: {"attempt": 1, "error": {"kind": "k", "message": text}},
}


@pytest.mark.parametrize("kind", sorted(TEXT_OF_OUTCOME))
@pytest.mark.parametrize(
    ("text", "summary"),
    [
        ("  short output \n", "short output"),
        ("x" * SUMMARY_CHARS, "x" * SUMMARY_CHARS),
        ("x" * (SUMMARY_CHARS + 1), "x" * (SUMMARY_CHARS - 1) + "…"),
        ("", None),
    ],
)
def test_an_outcome_s_summary_is_its_text_stripped_and_cut_to_the_column(
    kind: str, text: str, summary: str | None
) -> None:
    row = fold(submitted(), change(kind, TEXT_OF_OUTCOME[kind](text)))
    assert row["summary"] == summary
