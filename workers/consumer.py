"""What a worker takes from the broker, for as long as it runs and whatever the broker
does: attempt commands (each handled in a task of its own) and cancel notices."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any
from uuid import UUID

from workers.broker import Broker, Delivery

log = logging.getLogger(__name__)


async def consume(
    broker: Broker,
    prefetch: int,
    handle: Callable[[Delivery], Coroutine[Any, Any, None]],
    handlers: set[asyncio.Task[None]],
    worker_id: str,
) -> None:
    """Take commands, each `handle`d in a task kept in `handlers` until it ends. A broker
    out of reach at the start, or a consumer it ends, is retried every second (a worker
    started while RabbitMQ was down never consumed at all)."""
    while True:
        try:
            async for delivery in broker.consume(prefetch=prefetch):
                task = asyncio.create_task(handle(delivery))
                handlers.add(task)
                task.add_done_callback(handlers.discard)
            log.warning("the broker ended this worker's consumer; consuming again")
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a worker must outlive its broker
            log.warning(
                "cannot take commands from the broker; retrying in 1 s. Running "
                "attempts go on; check TASKLEDGER_BROKER_URL and RabbitMQ",
                extra={"worker_id": worker_id, "error": str(error)},
            )
        await asyncio.sleep(1)


async def follow_cancels(broker: Broker, cancel: Callable[[UUID], None]) -> None:
    """`cancel` each task whose cancel the broker broadcasts."""
    while True:
        try:
            async for task_id in broker.cancels():
                cancel(task_id)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - keep listening whatever the broker did
            log.warning("cancel listener failed; retrying", extra={"error": str(error)})
            await asyncio.sleep(1)
