"""The Batcher (ledger/batching.py): blocking calls from many coroutines, run in rounds.

The batch function is a stand-in that records its rounds; it can hold a round in its
thread, so that the test knows calls made meanwhile are waiting for the next one.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Sequence

import pytest

from ledger.batching import Batcher
from ledger.errors import LedgerUnavailable

pytestmark = [pytest.mark.asyncio]

WAIT_SECONDS = 5.0


class Backend:
    """A batch function: the outcome of item n is n * 10, or a ValueError for n < 0; the
    rounds numbered in `failing` (from 1) raise instead. While `held`, a round stays in
    its thread until `release()`."""

    def __init__(self, held: bool = False, failing: frozenset[int] = frozenset()) -> None:
        self.rounds: list[list[int]] = []
        self.failing = failing
        self._entered = threading.Event()
        self._open = threading.Event()
        if not held:
            self._open.set()

    def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        self.rounds.append(list(items))
        self._entered.set()
        self._open.wait(WAIT_SECONDS)
        if len(self.rounds) in self.failing:
            raise RuntimeError("server closed the connection")
        return [ValueError(f"item {n}") if n < 0 else n * 10 for n in items]

    async def round_running(self) -> None:
        assert await asyncio.to_thread(self._entered.wait, WAIT_SECONDS), "no round began"

    def release(self) -> None:
        self._open.set()


async def queued(batcher: Batcher[int, int], items: Sequence[int]) -> list[asyncio.Task[int]]:
    """Calls of `run`, a task each, returned once every item is queued."""
    tasks = []
    for item in items:
        calling = asyncio.Event()

        async def call(item: int = item, calling: asyncio.Event = calling) -> int:
            calling.set()
            return await batcher.run(item)  # run() queues the item before it first waits

        tasks.append(asyncio.create_task(call()))
        await calling.wait()
    return tasks


async def outcomes(tasks: Sequence[asyncio.Task[int]]) -> list[int | BaseException]:
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT_SECONDS)


async def test_a_lone_call_goes_at_once_in_a_round_of_its_own() -> None:
    backend = Backend()
    batcher = Batcher(backend)
    assert await batcher.run(4) == 40
    assert backend.rounds == [[4]]
    assert (batcher.rounds, batcher.items) == (1, 1)


async def test_calls_made_during_a_round_wait_for_it_and_share_the_next() -> None:
    backend = Backend(held=True)
    batcher = Batcher(backend)
    (first,) = await queued(batcher, [1])
    await backend.round_running()
    later = await queued(batcher, [2, 3, 4])
    assert backend.rounds == [[1]]  # none of them joined the round under way
    backend.release()
    assert await outcomes([first, *later]) == [10, 20, 30, 40]
    assert backend.rounds == [[1], [2, 3, 4]]
    assert (batcher.rounds, batcher.items) == (2, 4)


async def test_a_round_takes_at_most_max_batch_calls_in_their_order() -> None:
    backend = Backend(held=True)
    batcher = Batcher(backend, max_batch=2)
    (first,) = await queued(batcher, [0])
    await backend.round_running()
    later = await queued(batcher, [1, 2, 3, 4, 5])
    backend.release()
    assert await outcomes([first, *later]) == [0, 10, 20, 30, 40, 50]
    assert backend.rounds == [[0], [1, 2], [3, 4], [5]]


async def test_an_exception_outcome_is_raised_to_its_own_caller_only() -> None:
    backend = Backend(held=True)
    batcher = Batcher(backend)
    (first,) = await queued(batcher, [1])
    await backend.round_running()
    later = await queued(batcher, [2, -3, 4])
    backend.release()
    with pytest.raises(ValueError, match="item -3"):
        await asyncio.wait_for(later[1], WAIT_SECONDS)
    assert await outcomes([first, later[0], later[2]]) == [10, 20, 40]
    assert len(backend.rounds) == 2  # one round for all three


async def test_a_failed_round_fails_its_callers_as_unavailable_and_the_next_round_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Backend(held=True, failing=frozenset({1}))
    batcher = Batcher(backend)
    (first,) = await queued(batcher, [1])
    await backend.round_running()
    second = await queued(batcher, [2, 3])
    backend.release()
    results = await outcomes([first, *second])
    assert isinstance(results[0], LedgerUnavailable)
    assert "server closed the connection" in str(results[0])
    assert results[1:] == [20, 30]
    assert "a round of ledger calls failed" in caplog.text


async def test_a_round_runs_in_a_context_of_its_own_not_its_first_caller_s() -> None:
    """The round serves many callers: the first one's log context (which task, which
    request) must not label the others' work."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[str | None] = []

    def batch(items: Sequence[int]) -> list[int]:
        seen.append(request_id.get(None))
        return list(items)

    batcher: Batcher[int, int] = Batcher(batch)
    request_id.set("first caller")
    assert await batcher.run(1) == 1
    assert seen == [None]


async def test_close_cancels_the_calls_still_waiting_for_a_round() -> None:
    backend = Backend(held=True)
    batcher = Batcher(backend)
    (first,) = await queued(batcher, [1])
    await backend.round_running()
    waiting = await queued(batcher, [2, 3])
    closing = asyncio.create_task(batcher.close())
    backend.release()  # the round under way is not abandoned: close waits for its thread
    await asyncio.wait_for(closing, WAIT_SECONDS)
    await asyncio.wait(waiting, timeout=WAIT_SECONDS)
    assert all(task.cancelled() for task in waiting)
    assert backend.rounds == [[1]]
    first.cancel()  # see the next test


async def test_close_gives_the_round_under_way_its_outcomes() -> None:
    backend = Backend(held=True)
    batcher = Batcher(backend)
    (first,) = await queued(batcher, [1])
    await backend.round_running()
    closing = asyncio.create_task(batcher.close())
    backend.release()
    await asyncio.wait_for(closing, WAIT_SECONDS)
    try:
        # Its thread has returned: the outcome is there, nothing is left to wait for.
        assert await asyncio.wait_for(first, 1.0) == 10
    finally:
        first.cancel()
