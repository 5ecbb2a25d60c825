"""Choosing the broker implementation from its URL: the composition root's choice, so that
the broker port (`workers/broker.py`) knows neither implementation."""

from __future__ import annotations

from workers.broker import Broker
from workers.memory import MemoryBroker


def broker_for(url: str, namespace: str = "taskledger") -> Broker:
    """`memory://`: the in-process broker; anything else: RabbitMQ at `url`, its queues
    named under `namespace`."""
    if url.startswith("memory://"):
        return MemoryBroker()
    # Imported here: aio-pika takes ~70 ms to import, which `taskledger dev` never needs.
    from workers.rabbitmq import RabbitMQBroker

    return RabbitMQBroker(url, namespace)
