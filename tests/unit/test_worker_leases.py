"""A worker's lease keeping (LeaseKeeper.keep) judged against a stand-in store whose
heartbeat the test holds: pure logic of what the worker kills and when."""

from __future__ import annotations

import asyncio
import threading
import uuid
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import pytest

from workers.memory import MemoryBroker
from workers.metrics import WorkerMetrics
from workers.worker import Worker

HEARTBEAT = 0.05


class Leases:
    """Answers each heartbeat with the attempts it was asked to renew, once let go."""

    lease_seconds = 1.0

    def __init__(self) -> None:
        self.go = threading.Event()
        self.go.set()
        self.beats = 0

    def heartbeat(self, info: Any, stopped: Any = None) -> set[tuple[UUID, int]]:
        self.beats += 1
        self.go.wait()
        return {(UUID(r["task_id"]), r["attempt"]) for r in info.running}


def worker_over(leases: Leases) -> Worker:
    ledger = SimpleNamespace(leases=leases, execute_many=lambda commands: [])
    return Worker(
        ledger,  # type: ignore[arg-type]
        MemoryBroker(),
        {},
        heartbeat_seconds=HEARTBEAT,
        metrics=WorkerMetrics(),
    )


def running(worker: Worker) -> tuple[tuple[UUID, int], asyncio.Event]:
    held = (uuid.uuid4(), 1)
    cancel = asyncio.Event()
    worker.lease_keeper.held[held] = "python"
    worker._running[str(held[0])] = (cancel, 1)
    return held, cancel


@pytest.mark.asyncio
async def test_a_run_started_while_a_beat_hangs_is_not_taken_for_lost() -> None:
    leases = Leases()
    worker = worker_over(leases)
    keeping = asyncio.create_task(worker.lease_keeper.keep())
    try:
        _, first = running(worker)
        while leases.beats < 2:
            await asyncio.sleep(HEARTBEAT / 5)
        leases.go.clear()  # the next beat hangs...
        beats = leases.beats
        while leases.beats == beats:
            await asyncio.sleep(HEARTBEAT / 5)
        _, second = running(worker)  # ...while another attempt starts
        await asyncio.sleep(HEARTBEAT * 3)
        leases.go.set()  # its answer renews what it was asked, not the new one
        beats = leases.beats
        while leases.beats < beats + 2:
            await asyncio.sleep(HEARTBEAT / 5)
        assert not second.is_set(), "a healthy run was killed as if its lease were lost"
        assert not first.is_set()
    finally:
        leases.go.set()
        keeping.cancel()
