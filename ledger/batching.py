"""Blocking ledger calls from many coroutines, run together.

The ledger is synchronous (eventsourcing has no asyncio API), so each call from async
code costs a hop to a thread, a read and a write. A worker holding many attempts, or an
API answering many submissions, would pay that per call. Here the calls that arrive while
a round is running wait for the next round, and a round is one thread hop and one batch
call (`Ledger.execute_many`, `Ledger.submit_many`): one read, one transaction. A lone
call goes at once; a round only ever waits for the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import anyio.to_thread

from ledger.errors import LedgerUnavailable

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    """`run(item)` from any coroutine; `batch(items)` runs in a thread, one outcome per
    item (an Exception outcome is raised to that item's caller)."""

    def __init__(
        self, batch: Callable[[Sequence[In]], Sequence[Out | Exception]], *, max_batch: int = 256
    ) -> None:
        self._batch = batch
        self.max_batch = max_batch
        self._queue: list[tuple[In, asyncio.Future[Out | Exception]]] = []
        self._round: asyncio.Task[None] | None = None
        self.rounds = 0
        self.items = 0

    async def run(self, item: In) -> Out:
        future: asyncio.Future[Out | Exception] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._round is None or self._round.done():
            # A fresh context: the round serves many callers, not the first one's log
            # context (which task, which request).
            self._round = asyncio.create_task(self._rounds(), context=contextvars.Context())
        outcome = await future
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def close(self) -> None:
        """Cancel the calls still queued. The round under way is not cancelled: its thread
        writes regardless, so it finishes and its callers get their outcomes."""
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        if self._round is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._round

    async def _rounds(self) -> None:
        while self._queue:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            items = [item for item, _ in batch]
            try:
                # Not abandoned when cancelled: the thread would go on writing regardless.
                outcomes = await anyio.to_thread.run_sync(self._batch, items)
            except Exception as error:
                log.exception("a round of ledger calls failed")
                outcomes = [LedgerUnavailable(f"ledger round failed: {error}") for _ in batch]
            self.rounds += 1
            self.items += len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
