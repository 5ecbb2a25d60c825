"""The in-process broker: valid only when every role runs in one process (`taskledger dev`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from uuid import UUID

from workers.broker import Broker, Delivery, RunAttempt


class MemoryDelivery(Delivery):
    def __init__(self, broker: MemoryBroker, command: RunAttempt, redelivered: bool) -> None:
        self.broker = broker
        self.command = command
        self.redelivered = redelivered
        self.settled = False

    async def _settle(self) -> None:
        if self.settled:
            raise RuntimeError("delivery already settled")
        self.settled = True
        self.broker._unsettled -= 1
        self.broker._credit.release()

    async def ack(self) -> None:
        await self._settle()

    async def requeue(self) -> None:
        await self._settle()
        self.broker._queue.put_nowait((self.command, True))

    async def reject(self) -> None:
        await self._settle()
        self.broker.dead_letters.append(self.command)


class MemoryBroker(Broker):
    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[RunAttempt, bool]] = asyncio.Queue()
        self._credit = asyncio.Semaphore(0)
        self._unsettled = 0
        self._cancel_listeners: list[asyncio.Queue[UUID]] = []
        self.dead_letters: list[RunAttempt] = []

    async def publish(self, commands: Sequence[RunAttempt]) -> None:
        for command in commands:
            self._queue.put_nowait((command, False))

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        credit = asyncio.Semaphore(prefetch)
        self._credit = credit
        while True:
            await credit.acquire()
            command, redelivered = await self._queue.get()
            self._unsettled += 1
            yield MemoryDelivery(self, command, redelivered)

    async def broadcast_cancel(self, task_id: UUID) -> None:
        for listener in self._cancel_listeners:
            listener.put_nowait(task_id)

    async def cancels(self) -> AsyncIterator[UUID]:
        listener: asyncio.Queue[UUID] = asyncio.Queue()
        self._cancel_listeners.append(listener)
        try:
            while True:
                yield await listener.get()
        finally:
            self._cancel_listeners.remove(listener)

    async def queue_depth(self) -> int | None:
        return self._queue.qsize()

    async def problem(self) -> str | None:
        return None

    async def close(self) -> None:
        return None
