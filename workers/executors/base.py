"""What an executor is: it runs one attempt's program and says how it ended."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol
from uuid import UUID

from ledger import AttemptError, AttemptResult
from ledger.jsonvalue import JSONValue

OutcomeKind = Literal["completed", "failed", "expired", "cancelled"]


@dataclass(frozen=True)
class RunRequest:
    task_id: UUID
    attempt: int
    code: str
    data: JSONValue
    deadline: datetime  # aware UTC: the program must be dead by then
    slot: int  # which sandbox slot (unprivileged user) of this worker runs it


@dataclass(frozen=True)
class RunOutcome:
    kind: OutcomeKind
    result: AttemptResult | None = None  # when completed
    error: AttemptError | None = None  # when failed
    retryable: bool = False  # when failed: may the ledger retry automatically?


class Executor(Protocol):
    language: str
    # Runs programs in a sandbox slot (a worker has `concurrency` of them); False for an
    # executor that runs nothing (echo), which needs no slot.
    needs_slot: bool

    async def run(self, request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        """Run the program until it ends, its deadline passes (then kill it and answer
        `expired`), or `cancelled` is set (then kill it and answer `cancelled`)."""
        ...

    async def start(self) -> None:
        """Get ready before the first attempt (the sandbox checks and logs its layers)."""
        ...

    async def close(self) -> None: ...
