"""The broker port's contract (workers/broker.py), held by every implementation.

One suite, run against `MemoryBroker` (the in-process broker of `taskledger dev`) and
`RabbitMQBroker` (a real RabbitMQ; each test in a namespace of its own, so parallel runs
never share a queue). What the port's docstrings promise, and what the dispatcher and the
worker rely on, is asserted the same way of both; where they differ the test says so (a
strict xfail naming the divergence) rather than asking less. The last tests are about
what only a broker shared by processes has: connections, closing, poison messages.

A *client* is one process's handle on the broker: for RabbitMQ a `RabbitMQBroker` of its
own (its own connection) on the same queues; for the in-process broker, the broker itself.

No test sleeps to let something happen: each awaits the delivery or cancel it expects.
Only "nothing more arrives" is a bounded wait (QUIET_SECONDS), which a broken bound fails
at once (the broker pushes or hands out the extra command within milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

import aio_pika
import pytest
import pytest_asyncio

from tests import services
from workers.broker import Broker, BrokerUnavailable, Delivery, RunAttempt
from workers.memory import MemoryBroker
from workers.rabbitmq import RabbitMQBroker

pytestmark = [pytest.mark.asyncio]

WAIT_SECONDS = 5.0  # for what must arrive
QUIET_SECONDS = 0.3  # for what must not

T = TypeVar("T")


# -- the brokers under test -------------------------------------------------------------------


@dataclass
class Brokers:
    """One broker under test, reached through clients."""

    connect: Callable[[], Broker]  # a new client of the same broker (same queues)
    dead_letters: Callable[[], Awaitable[list[bytes]]]  # bodies dead-lettered so far
    already_settled: type[Exception]  # what settling a delivery a second time raises


KINDS = ["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


@pytest_asyncio.fixture(params=KINDS)
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    if request.param == "memory":
        async with _memory() as made:
            yield made
    else:
        async with _rabbitmq() as made:
            yield made


@contextlib.asynccontextmanager
async def _memory() -> AsyncIterator[Brokers]:
    broker = MemoryBroker()

    async def dead_letters() -> list[bytes]:
        return [command.encode() for command in broker.dead_letters]

    try:
        yield Brokers(lambda: broker, dead_letters, RuntimeError)
    finally:
        await broker.close()


@contextlib.asynccontextmanager
async def _rabbitmq() -> AsyncIterator[Brokers]:
    problem = services.broker_problem()
    if problem:
        services.unavailable("RabbitMQ", problem)
    namespace = f"test.contract.{uuid.uuid4().hex[:12]}"
    made: list[RabbitMQBroker] = []

    def connect() -> Broker:
        client = RabbitMQBroker(services.BROKER_URL, namespace)
        made.append(client)
        return client

    async def dead_letters() -> list[bytes]:
        return await _drain(f"{namespace}.attempts.dead")

    try:
        yield Brokers(connect, dead_letters, aio_pika.exceptions.MessageProcessError)
    finally:
        for client in made:
            await client.close()
        # A closed client never reconnects: the queues go with a client of their own.
        cleaner = RabbitMQBroker(services.BROKER_URL, namespace)
        try:
            await cleaner.delete_all()
        finally:
            await cleaner.close()


@contextlib.asynccontextmanager
async def raw_channel(confirms: bool = False) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A RabbitMQ channel on a connection of the test's own, beside the broker's clients."""
    connection = await aio_pika.connect(services.BROKER_URL)
    try:
        yield await connection.channel(publisher_confirms=confirms)
    finally:
        await connection.close()


async def _drain(queue_name: str) -> list[bytes]:
    """Every message body in a RabbitMQ queue, taken out of it."""
    async with raw_channel() as channel:
        queue = await channel.declare_queue(queue_name, passive=True)
        bodies = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        return bodies


# -- reading a consumer and a cancel listener ---------------------------------------------------


async def within(awaitable: Awaitable[T], what: str, seconds: float = WAIT_SECONDS) -> T:
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"{what}: nothing after {seconds} s") from None


class Consumer:
    """One `consume()` stream, read a delivery at a time (use it as `async with`)."""

    def __init__(self, broker: Broker, prefetch: int) -> None:
        self._stream = cast(AsyncGenerator[Delivery, None], broker.consume(prefetch))
        self._next: asyncio.Task[Delivery] | None = None

    def upcoming(self) -> asyncio.Task[Delivery]:
        """The next delivery, as a task: await it, or check that it does not come."""
        if self._next is None or self._next.done():
            self._next = asyncio.create_task(self._take())
        return self._next

    async def _take(self) -> Delivery:
        return await anext(self._stream)

    async def take(self) -> Delivery:
        return await within(asyncio.shield(self.upcoming()), "waiting for a delivery")

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop consuming (what it holds stays with it until settled)."""
        if self._next is not None and not self._next.done():
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await self._next
        await self._stream.aclose()


async def quiet(upcoming: asyncio.Task[Any], what: str) -> None:
    """`upcoming` does not finish within QUIET_SECONDS."""
    done, _ = await asyncio.wait({upcoming}, timeout=QUIET_SECONDS)
    assert not done, f"{what}, yet it got {upcoming.result()}"


class Listener:
    """A `cancels()` stream read in the background, every id kept in arrival order."""

    def __init__(self, broker: Broker) -> None:
        self.ids: list[uuid.UUID] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._listen(broker))

    async def _listen(self, broker: Broker) -> None:
        async for task_id in broker.cancels():
            self.ids.append(task_id)
            self._arrived.set()

    async def until(self, heard: Callable[[list[uuid.UUID]], bool]) -> None:
        async def wait() -> None:
            while not heard(self.ids):
                self._arrived.clear()
                await self._arrived.wait()

        await within(wait(), f"waiting for a cancel (heard {self.ids})")

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def listening(broadcaster: Broker, listeners: list[Listener]) -> set[uuid.UUID]:
    """Wait until every listener hears broadcasts: nothing tells when a subscription is in
    place, so probe ids are broadcast until each listener has heard one. Returns the probe
    ids (some may still arrive later), for the test to leave out of what it checks."""
    probes: set[uuid.UUID] = set()

    def heard_a_probe(ids: list[uuid.UUID]) -> bool:
        return not probes.isdisjoint(ids)

    async def probe() -> None:
        while deaf := [listener for listener in listeners if not heard_a_probe(listener.ids)]:
            probe_id = uuid.uuid4()
            probes.add(probe_id)
            await broadcaster.broadcast_cancel(probe_id)
            waits = [asyncio.create_task(listener.until(heard_a_probe)) for listener in deaf]
            _, pending = await asyncio.wait(waits, timeout=0.1)
            for wait in pending:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    await within(probe(), "waiting for the cancel listeners to subscribe")
    return probes


async def everyone_hears_only_a_new_cancel(
    broadcaster: Broker, listeners: list[Listener], probes: set[uuid.UUID]
) -> None:
    """Broadcast a new cancel: every listener hears it, and nothing else but probes."""
    task_id = uuid.uuid4()
    await broadcaster.broadcast_cancel(task_id)
    for listener in listeners:
        await listener.until(lambda ids: task_id in ids)
        assert [i for i in listener.ids if i not in probes] == [task_id]


def commands(count: int) -> list[RunAttempt]:
    return [RunAttempt(uuid.uuid4(), attempt) for attempt in range(1, count + 1)]


async def one_published(brokers: Brokers) -> tuple[Broker, RunAttempt]:
    """A client, and the one command it published."""
    (command,) = commands(1)
    broker = brokers.connect()
    await broker.publish([command])
    return broker, command


# -- publish and consume ------------------------------------------------------------------------


async def test_published_commands_are_delivered_as_sent(brokers: Brokers) -> None:
    broker = brokers.connect()
    sent = commands(3)
    await broker.publish(sent)
    async with Consumer(broker, prefetch=10) as consumer:
        deliveries = [await consumer.take() for _ in sent]
        for delivery in deliveries:
            await delivery.ack()
    assert Counter(d.command for d in deliveries) == Counter(sent)
    assert not any(d.redelivered for d in deliveries)


async def test_publish_returns_once_the_broker_holds_the_commands(brokers: Brokers) -> None:
    publisher, observer = brokers.connect(), brokers.connect()
    await observer.queue_depth()  # the observer is connected before the publish
    await publisher.publish(commands(4))
    assert await observer.queue_depth() == 4


async def test_each_command_goes_to_exactly_one_of_several_consumers(brokers: Brokers) -> None:
    sent = commands(20)
    received: list[RunAttempt] = []
    all_in = asyncio.Event()

    async def work(consumer: Consumer) -> None:
        while True:
            delivery = await consumer.upcoming()
            received.append(delivery.command)
            await delivery.ack()
            if len(received) >= len(sent):
                all_in.set()

    async with (
        Consumer(brokers.connect(), prefetch=4) as first,
        Consumer(brokers.connect(), prefetch=4) as second,
    ):
        workers = [asyncio.create_task(work(c)) for c in (first, second)]
        await brokers.connect().publish(sent)
        try:
            await within(all_in.wait(), f"waiting for 20 deliveries (got {len(received)})")
            assert await brokers.connect().queue_depth() == 0
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    assert Counter(received) == Counter(sent)


async def test_queue_depth_counts_the_commands_waiting_not_those_held(brokers: Brokers) -> None:
    broker = brokers.connect()
    assert await broker.queue_depth() == 0
    await broker.publish(commands(3))
    assert await broker.queue_depth() == 3
    async with Consumer(broker, prefetch=2) as consumer:
        held = [await consumer.take(), await consumer.take()]
        assert await broker.queue_depth() == 1
        for delivery in held:
            await delivery.ack()


# -- settling -----------------------------------------------------------------------------------


async def test_an_acked_command_is_never_delivered_again(brokers: Brokers) -> None:
    (command,), (later,) = commands(1), commands(1)
    first = brokers.connect()
    await first.publish([command])
    async with Consumer(first, prefetch=1) as consumer:
        await (await consumer.take()).ack()
    await first.close()  # with RabbitMQ, what a closed client did not settle comes back
    second = brokers.connect()
    await second.publish([later])
    async with Consumer(second, prefetch=10) as consumer:
        delivery = await consumer.take()
        assert (delivery.command, delivery.redelivered) == (later, False)
        assert await second.queue_depth() == 0
        await quiet(consumer.upcoming(), "the acked command must not come back")
        await delivery.ack()


async def test_a_requeued_command_comes_back_marked_redelivered(brokers: Brokers) -> None:
    broker, command = await one_published(brokers)
    async with Consumer(broker, prefetch=1) as consumer:
        first = await consumer.take()
        assert not first.redelivered
        await first.requeue()
        again = await consumer.take()
        assert (again.command, again.redelivered) == (command, True)
        await again.ack()


async def test_a_command_requeued_by_one_consumer_goes_to_another(brokers: Brokers) -> None:
    (command,) = commands(1)
    await brokers.connect().publish([command])
    async with Consumer(brokers.connect(), prefetch=1) as holder:
        held = await holder.take()
        async with Consumer(brokers.connect(), prefetch=1) as other:
            upcoming = other.upcoming()
            await quiet(upcoming, "a command held by a consumer went to another")
            await holder.stop()  # so that only the other one can take it back
            await held.requeue()
            again = await within(upcoming, "waiting for the requeued command")
            assert (again.command, again.redelivered) == (command, True)
            await again.ack()


async def test_a_rejected_command_is_dead_lettered_and_never_redelivered(
    brokers: Brokers,
) -> None:
    (poison,), (later,) = commands(1), commands(1)
    broker = brokers.connect()
    await broker.publish([poison])
    async with Consumer(broker, prefetch=10) as consumer:
        await (await consumer.take()).reject()
        await broker.publish([later])
        delivery = await consumer.take()
        assert (delivery.command, delivery.redelivered) == (later, False)
        await delivery.ack()
        await quiet(consumer.upcoming(), "the rejected command must not come back")
    assert [RunAttempt.decode(body) for body in await brokers.dead_letters()] == [poison]


async def test_a_delivery_is_settled_once_and_a_second_try_harms_no_other(
    brokers: Brokers,
) -> None:
    broker = brokers.connect()
    await broker.publish(commands(2))
    async with Consumer(broker, prefetch=2) as consumer:
        first, second = await consumer.take(), await consumer.take()
        await first.ack()
        for settle in (first.ack, first.requeue, first.reject):
            with pytest.raises(brokers.already_settled):
                await settle()
        # With RabbitMQ a second ack on the wire would close the channel and give back
        # every command it held: the other delivery still settles, and nothing comes back.
        await second.ack()
        await quiet(consumer.upcoming(), "a settled command came back")
    assert await broker.queue_depth() == 0
    assert await brokers.dead_letters() == []


async def test_a_delivery_can_be_settled_after_its_consumer_stopped(brokers: Brokers) -> None:
    """A stopping worker stops consuming first, then gives back the commands it holds
    that no slot took (workers/worker.py, shutdown)."""
    broker, command = await one_published(brokers)
    async with Consumer(broker, prefetch=1) as consumer:
        held = await consumer.take()
    await held.requeue()
    async with Consumer(broker, prefetch=1) as consumer:
        again = await consumer.take()
        assert (again.command, again.redelivered) == (command, True)
        await again.ack()


async def test_a_command_held_by_a_client_that_goes_away_is_redelivered(
    brokers: Brokers,
) -> None:
    (command,) = commands(1)
    lost = brokers.connect()
    await lost.publish([command])
    async with Consumer(lost, prefetch=1) as consumer:
        held = await consumer.take()
        assert not held.redelivered
        await lost.close()  # a worker that died: its connection gone, the command unsettled
        async with Consumer(brokers.connect(), prefetch=1) as rescuer:
            again = await rescuer.take()
            assert (again.command, again.redelivered) == (command, True)
            await again.ack()


# -- prefetch -----------------------------------------------------------------------------------


async def test_prefetch_bounds_the_unsettled_deliveries(brokers: Brokers) -> None:
    broker = brokers.connect()
    await broker.publish(commands(3))
    async with Consumer(broker, prefetch=2) as consumer:
        first, second = await consumer.take(), await consumer.take()
        third = consumer.upcoming()
        await quiet(third, "a consumer with prefetch 2 holding 2 must get no third")
        await first.ack()  # one settled: room for one more
        await (await within(third, "waiting for the third after an ack")).ack()
        await second.ack()


async def test_prefetch_counts_requeued_deliveries_as_settled(brokers: Brokers) -> None:
    broker, command = await one_published(brokers)
    async with Consumer(broker, prefetch=1) as consumer:
        for _ in range(3):  # a requeue frees the credit it took, every time
            delivery = await consumer.take()
            assert delivery.command == command
            await delivery.requeue()
        await (await consumer.take()).ack()


async def test_prefetch_is_counted_per_consumer(brokers: Brokers) -> None:
    first_command, second_command, third_command = commands(3)
    publisher = brokers.connect()
    async with (
        Consumer(brokers.connect(), prefetch=1) as first,
        Consumer(brokers.connect(), prefetch=1) as second,
    ):
        await publisher.publish([first_command])
        held_by_first = await first.take()
        await publisher.publish([second_command])
        held_by_second = await second.take()
        await publisher.publish([third_command])
        first_next, second_next = first.upcoming(), second.upcoming()
        await quiet(first_next, "both consumers are full")
        await held_by_first.ack()
        # The first consumer's ack freed the first consumer's credit, not the second's.
        delivery = await within(first_next, "waiting for the first consumer's next delivery")
        assert delivery.command == third_command
        await quiet(second_next, "the second consumer still holds its one delivery")
        await delivery.ack()
        await held_by_second.ack()


# -- cancels ------------------------------------------------------------------------------------


async def test_a_cancel_reaches_every_listener_of_every_client(brokers: Brokers) -> None:
    broadcaster = brokers.connect()
    listeners = [Listener(brokers.connect()), Listener(brokers.connect())]
    try:
        probes = await listening(broadcaster, listeners)
        await everyone_hears_only_a_new_cancel(broadcaster, listeners, probes)
    finally:
        for listener in listeners:
            await listener.stop()


async def test_a_listener_hears_only_cancels_broadcast_after_it_started(
    brokers: Brokers,
) -> None:
    broadcaster = brokers.connect()
    await broadcaster.broadcast_cancel(uuid.uuid4())  # before anyone listens: heard by none
    listener = Listener(brokers.connect())
    try:
        probes = await listening(broadcaster, [listener])
        await everyone_hears_only_a_new_cancel(broadcaster, [listener], probes)
    finally:
        await listener.stop()


async def test_a_listener_that_stops_leaves_the_others_hearing(brokers: Brokers) -> None:
    broadcaster = brokers.connect()
    stopping, staying = Listener(brokers.connect()), Listener(brokers.connect())
    try:
        probes = await listening(broadcaster, [stopping, staying])
        await stopping.stop()
        await everyone_hears_only_a_new_cancel(broadcaster, [staying], probes)
    finally:
        await staying.stop()


# -- health and closing -------------------------------------------------------------------------


async def test_a_usable_broker_reports_no_problem(brokers: Brokers) -> None:
    broker = brokers.connect()
    assert await broker.problem() is None
    await broker.publish(commands(1))
    assert await broker.problem() is None


async def test_closing_twice_is_harmless(brokers: Brokers) -> None:
    broker = brokers.connect()
    await broker.publish(commands(1))
    await broker.close()
    await broker.close()


# -- what only a broker shared by processes has (RabbitMQ) -------------------------------------


@pytest_asyncio.fixture
async def rabbitmq() -> AsyncIterator[Brokers]:
    async with _rabbitmq() as made:
        yield made


@pytest.mark.rabbitmq
async def test_a_closed_client_never_reconnects(rabbitmq: Brokers) -> None:
    client = rabbitmq.connect()
    await client.publish(commands(1))
    await client.close()
    with pytest.raises(BrokerUnavailable, match="closed"):
        await client.publish(commands(1))
    with pytest.raises(BrokerUnavailable, match="closed"):
        await client.broadcast_cancel(uuid.uuid4())
    with pytest.raises(BrokerUnavailable, match="closed"):
        await anext(client.consume(prefetch=1))
    assert await client.queue_depth() is None
    assert "closed" in (await client.problem() or "")
    assert await rabbitmq.connect().queue_depth() == 1  # what it published stays


@pytest.mark.rabbitmq
async def test_a_consumer_ends_when_its_client_closes(rabbitmq: Brokers) -> None:
    """The worker then consumes again (workers/worker.py, `_consume`); RabbitMQ only: the
    in-process broker's consumer never ends."""
    client = rabbitmq.connect()
    consumer = Consumer(client, prefetch=1)
    upcoming = consumer.upcoming()
    await quiet(upcoming, "an empty queue delivers nothing")
    await client.close()
    with pytest.raises(StopAsyncIteration):
        await within(upcoming, "waiting for the consumer to end")
    await consumer.stop()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.rabbitmq
async def test_an_unreachable_broker_is_reported_without_its_password() -> None:
    url = f"amqp://guest:s3cret-password@127.0.0.1:{_closed_port()}/"
    client = RabbitMQBroker(url, f"test.contract.{uuid.uuid4().hex[:12]}")
    try:
        problem = await client.problem()
        assert problem is not None
        assert "127.0.0.1" in problem
        assert "s3cret" not in problem
        assert await client.queue_depth() is None
        with pytest.raises(BrokerUnavailable) as refused:
            await client.publish(commands(1))
        assert "s3cret" not in str(refused.value)
    finally:
        await client.close()


@pytest.mark.rabbitmq
async def test_a_poison_message_is_dead_lettered_and_the_consumer_goes_on(
    rabbitmq: Brokers, caplog: pytest.LogCaptureFixture
) -> None:
    client = rabbitmq.connect()
    assert isinstance(client, RabbitMQBroker)
    (command,) = commands(1)
    await client.publish([])  # declares the queues
    async with raw_channel(confirms=True) as channel:
        await channel.default_exchange.publish(
            aio_pika.Message(b"not a command"), routing_key=client.queue
        )
    await client.publish([command])
    async with Consumer(client, prefetch=1) as consumer:
        delivery = await consumer.take()
        assert delivery.command == command
        await delivery.ack()
    assert await rabbitmq.dead_letters() == [b"not a command"]
    assert "poison message" in caplog.text


@pytest.mark.rabbitmq
async def test_published_commands_are_persistent(rabbitmq: Brokers) -> None:
    client = rabbitmq.connect()
    assert isinstance(client, RabbitMQBroker)
    (command,) = commands(1)
    await client.publish([command])
    async with raw_channel() as channel:
        # Declaring it again as durable is accepted only if it is durable already.
        queue = await channel.declare_queue(
            client.queue,
            durable=True,
            arguments={
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": client.dead_letters,
            },
        )
        message = await queue.get(no_ack=True)
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert RunAttempt.decode(message.body) == command
