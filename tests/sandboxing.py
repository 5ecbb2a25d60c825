"""Helpers for tests that run programs in the sandbox through the executors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from ledger.jsonvalue import JSONValue
from workers.executors.base import RunOutcome, RunRequest


def request(code: str, data: JSONValue = None, *, seconds: float = 30, slot: int = 0) -> RunRequest:
    """Attempt 1 of a new task running `code` in `slot`, due in `seconds`."""
    deadline = datetime.now(UTC) + timedelta(seconds=seconds)
    return RunRequest(uuid.uuid4(), 1, code, data, deadline, slot)


def describe(outcome: RunOutcome) -> str:
    """The whole outcome, stderr included (pytest would cut a long repr short)."""
    error = outcome.error
    if error is None:
        return repr(outcome)
    return f"{outcome.kind}: {error.kind}: {error.message}\n--- stderr:\n{error.stderr}"
