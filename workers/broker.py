"""The broker port: how attempt commands and cancel notices travel to workers.

Two implementations: `rabbitmq.py` (aio-pika; durable, confirmed, shared by processes)
and `memory.py` (in-process; the embedded default and unit tests). No AMQP type leaves
`rabbitmq.py`. The composition root chooses one from the URL (`taskledger/brokers.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from uuid import UUID

import orjson


@dataclass(frozen=True)
class RunAttempt:
    """Run attempt `attempt` of task `task_id` (the worker reads the rest from the ledger)."""

    task_id: UUID
    attempt: int

    def encode(self) -> bytes:
        return orjson.dumps({"task_id": str(self.task_id), "attempt": self.attempt})

    @classmethod
    def decode(cls, body: bytes) -> RunAttempt:
        fields = orjson.loads(body)
        return cls(UUID(fields["task_id"]), int(fields["attempt"]))


class Delivery(ABC):
    """A command handed to one consumer; it stays with that consumer until settled."""

    command: RunAttempt
    redelivered: bool  # the broker gave it to another consumer before, who did not settle

    @abstractmethod
    async def ack(self) -> None:
        """Done with it (whatever the outcome): the broker forgets it."""

    @abstractmethod
    async def requeue(self) -> None:
        """Give it back for another consumer (it comes back marked redelivered)."""

    @abstractmethod
    async def reject(self) -> None:
        """Unprocessable (a poison message): dead-letter it, never redeliver."""


class Broker(ABC):
    @abstractmethod
    async def publish(self, commands: Sequence[RunAttempt]) -> None:
        """Send commands; returns once the broker has them (confirmed, persistent)."""

    @abstractmethod
    def consume(self, prefetch: int) -> AsyncIterator[Delivery]:
        """Commands for this consumer, at most `prefetch` unsettled at once."""

    @abstractmethod
    async def broadcast_cancel(self, task_id: UUID) -> None:
        """Tell every worker that the task was cancelled (kill it if you run it)."""

    @abstractmethod
    def cancels(self) -> AsyncIterator[UUID]:
        """Cancelled task ids, as broadcast from now on."""

    @abstractmethod
    async def queue_depth(self) -> int | None:
        """Commands waiting in the queue, if the broker can tell."""

    @abstractmethod
    async def problem(self) -> str | None:
        """Why the broker is not usable right now, or None."""

    @abstractmethod
    async def close(self) -> None: ...


class BrokerUnavailable(Exception):
    pass
