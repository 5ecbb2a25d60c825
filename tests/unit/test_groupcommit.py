"""Group commit: concurrent saves share transactions; a stale write fails alone."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence

import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from ledger.groupcommit import GroupCommit


def event(stream: uuid.UUID, version: int) -> StoredEvent:
    return StoredEvent(stream, version, "topic", b"{}")


class Store:
    """Pure stand-in for the recorder: the (stream, version) key, transactions recorded.
    The first transaction can be held open to make later writers queue behind it."""

    def __init__(self, hold_first: bool = False) -> None:
        self.keys: set[tuple[uuid.UUID, int]] = set()
        self.transactions: list[list[tuple[uuid.UUID, int]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_with: BaseException | None = None

    def insert(self, events: Sequence[StoredEvent]) -> None:
        keys = [(e.originator_id, e.originator_version) for e in events]
        first = not self.transactions
        self.transactions.append(keys)
        if first:
            self.entered.set()
            self.release.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        if len(set(keys)) != len(keys) or self.keys & set(keys):
            raise IntegrityError("duplicate key value violates unique constraint")
        self.keys |= set(keys)


def run_threads(targets: list[threading.Thread]) -> None:
    for thread in targets:
        thread.start()
    for thread in targets:
        thread.join(10)
        assert not thread.is_alive()


def queue_behind_first(
    commit: GroupCommit, store: Store, writes: list[list[StoredEvent]]
) -> dict[int, BaseException | None]:
    """Hold a first write open, start `writes` behind it, release; each write's error."""
    outcomes: dict[int, BaseException | None] = {}

    def save(index: int, events: list[StoredEvent]) -> None:
        try:
            commit.save(events)
        except BaseException as error:  # noqa: BLE001 - recorded for the assertions
            outcomes[index] = error
        else:
            outcomes[index] = None

    first = threading.Thread(target=save, args=(-1, [event(uuid.uuid4(), 1)]))
    first.start()
    assert store.entered.wait(10)
    others = [threading.Thread(target=save, args=(i, w)) for i, w in enumerate(writes)]
    for thread in others:
        thread.start()
    while len(commit._queue) < len(writes):
        threading.Event().wait(0.001)
    store.release.set()
    first.join(10)
    for thread in others:
        thread.join(10)
    return outcomes


def test_a_lone_write_is_written_at_once_in_its_own_transaction() -> None:
    store = Store()
    commit = GroupCommit(store.insert)
    stream = uuid.uuid4()
    commit.save([event(stream, 1), event(stream, 2)])
    assert store.transactions == [[(stream, 1), (stream, 2)]]


def test_writes_that_arrive_during_a_write_share_the_next_transaction() -> None:
    store = Store(hold_first=True)
    commit = GroupCommit(store.insert)
    writes = [[event(uuid.uuid4(), 1), event(uuid.uuid4(), 2)] for _ in range(6)]
    outcomes = queue_behind_first(commit, store, writes)
    assert all(outcomes[i] is None for i in range(6))
    assert len(store.transactions) == 2
    assert len(store.transactions[1]) == 12
    assert (commit.transactions, commit.writes) == (2, 7)


def test_a_batch_never_exceeds_its_event_budget_and_keeps_each_write_whole() -> None:
    store = Store(hold_first=True)
    commit = GroupCommit(store.insert, max_batch_events=5)
    streams = [uuid.uuid4() for _ in range(4)]
    writes = [[event(s, 1), event(s, 2)] for s in streams]
    outcomes = queue_behind_first(commit, store, writes)
    assert all(outcomes[i] is None for i in range(4))
    assert [len(t) for t in store.transactions[1:]] == [4, 4]
    assert store.keys >= {(s, v) for s in streams for v in (1, 2)}


def test_a_stale_write_fails_alone_and_the_rest_of_its_batch_is_stored() -> None:
    store = Store(hold_first=True)
    commit = GroupCommit(store.insert)
    taken = uuid.uuid4()
    store.keys.add((taken, 1))  # someone else already wrote version 1 of this stream
    fresh = [uuid.uuid4() for _ in range(3)]
    writes = [[event(fresh[0], 1)], [event(taken, 1)], [event(fresh[1], 1)], [event(fresh[2], 1)]]
    outcomes = queue_behind_first(commit, store, writes)
    assert isinstance(outcomes[1], IntegrityError)
    assert [outcomes[i] for i in (0, 2, 3)] == [None, None, None]
    assert {(s, 1) for s in fresh} <= store.keys
    assert commit.split_batches == 1


def test_a_store_failure_reaches_every_writer_of_the_batch_with_its_own_exception() -> None:
    store = Store(hold_first=True)
    commit = GroupCommit(store.insert)
    store.fail_with = OSError("connection refused")
    outcomes = queue_behind_first(commit, store, [[event(uuid.uuid4(), 1)] for _ in range(3)])
    errors = [outcomes[i] for i in range(3)]
    assert all(isinstance(e, OSError) and e.__cause__ is store.fail_with for e in errors)
    assert len({id(e) for e in errors}) == 3


def test_many_threads_lose_nothing_and_each_key_is_written_once() -> None:
    store = Store()
    commit = GroupCommit(store.insert)
    streams = [uuid.uuid4() for _ in range(40)]
    errors: list[BaseException] = []

    def writer(stream: uuid.UUID) -> None:
        for version in range(1, 6):
            try:
                commit.save([event(stream, version)])
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

    run_threads([threading.Thread(target=writer, args=(s,)) for s in streams])
    assert errors == []
    assert store.keys == {(s, v) for s in streams for v in range(1, 6)}
    assert commit.writes == 200


def test_nothing_to_write_touches_nothing() -> None:
    store = Store()
    GroupCommit(store.insert).save([])
    assert store.transactions == []


@pytest.mark.parametrize("racers", [2, 8])
def test_racing_writes_of_one_version_have_exactly_one_winner(racers: int) -> None:
    store = Store()
    commit = GroupCommit(store.insert)
    stream = uuid.uuid4()
    barrier = threading.Barrier(racers)
    results: list[bool] = []

    def racer() -> None:
        barrier.wait()
        try:
            commit.save([event(stream, 1)])
        except IntegrityError:
            results.append(False)
        else:
            results.append(True)

    run_threads([threading.Thread(target=racer) for _ in range(racers)])
    assert sorted(results) == [False] * (racers - 1) + [True]
