"""The in-process broker: valid only when every role runs in one process (`taskledger dev`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from uuid import UUID

from workers.broker import Broker, Delivery, RunAttempt


class MemoryDelivery(Delivery):
    def __init__(
        self,
        broker: MemoryBroker,
        command: RunAttempt,
        redelivered: bool,
        credit: asyncio.Semaphore,
    ) -> None:
        self.broker = broker
        self.command = command
        self.redelivered = redelivered
        self.credit = credit  # its consumer's: settling frees room there, not elsewhere
        self.settled = False

    async def _settle(self) -> None:
        if self.settled:
            raise RuntimeError("delivery already settled")
        self.settled = True
        self.broker._unsettled.discard(self)
        self.credit.release()

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
        self._unsettled: set[MemoryDelivery] = set()
        self._cancel_listeners: list[asyncio.Queue[UUID]] = []
        self.dead_letters: list[RunAttempt] = []

    async def publish(self, commands: Sequence[RunAttempt]) -> None:
        for command in commands:
            self._queue.put_nowait((command, False))

    async def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        credit = asyncio.Semaphore(prefetch)  # per consumer, as RabbitMQ's basic.qos
        while True:
            await credit.acquire()
            command, redelivered = await self._queue.get()
            delivery = MemoryDelivery(self, command, redelivered, credit)
            self._unsettled.add(delivery)
            yield delivery

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
        """Give back what is held unsettled, marked redelivered, as RabbitMQ does when a
        client's connection closes (a late settle then raises)."""
        for delivery in list(self._unsettled):
            delivery.settled = True
            self._queue.put_nowait((delivery.command, True))
        self._unsettled.clear()
