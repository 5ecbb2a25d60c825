"""The echo executor runs nothing: its result is the task's data, as JSON on stdout."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson

from ledger import AttemptResult
from workers.executors.base import RunOutcome, RunRequest


class EchoExecutor:
    language = "echo"
    needs_slot = False

    async def run(self, request: RunRequest, cancelled: asyncio.Event) -> RunOutcome:
        if cancelled.is_set():
            return RunOutcome("cancelled")
        if datetime.now(UTC) >= request.deadline:
            return RunOutcome("expired")
        stdout = orjson.dumps(request.data).decode()
        return RunOutcome("completed", result=AttemptResult(stdout=stdout, exit_code=0))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
