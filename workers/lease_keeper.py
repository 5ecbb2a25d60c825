"""A worker's leases on the attempts it runs (see `workers/worker.py`): renewed with a
heartbeat every `heartbeat_seconds`, which also says what the worker is doing; a run whose
lease is lost, or every run once no renewal has got through for nearly a whole lease, is
killed."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from uuid import UUID

from ledger.leases import Leases, WorkerInfo

log = logging.getLogger(__name__)

Attempt = tuple[UUID, int]  # (task id, attempt number)


class LeaseKeeper:
    def __init__(
        self,
        leases: Leases | None,
        *,
        worker_id: str,
        slots: int,
        heartbeat_seconds: float,
        busy: Callable[[], int],
        kill: Callable[[UUID, int], None],
    ) -> None:
        """`leases`: the store's (None: a store without leases, nothing to renew);
        `busy`: the slots running a program now; `kill(task_id, attempt)`: kill that run."""
        self.leases = leases
        self.worker_id = worker_id
        self.slots = slots
        self.heartbeat_seconds = heartbeat_seconds
        self._busy = busy
        self._kill = kill
        self.started_at = datetime.now(UTC)
        self._host, self._version = socket.gethostname(), _version()
        # Attempts this worker started and has not settled: their leases are renewed.
        self.held: dict[Attempt, str] = {}  # (task, attempt) -> language
        self.lost: set[Attempt] = set()

    def _info(self) -> WorkerInfo:
        running = [
            {"task_id": str(task_id), "attempt": attempt, "language": language}
            for (task_id, attempt), language in self.held.items()
        ]
        return WorkerInfo(
            worker_id=self.worker_id,
            host=self._host,
            pid=os.getpid(),
            version=self._version,
            slots=self.slots,
            busy=self._busy(),
            running=running,
            started_at=self.started_at,
        )

    async def beat(self, *, stopped: bool = False) -> set[Attempt] | None:
        """One heartbeat: the leases still held, or None when the store did not answer."""
        leases = self.leases
        if leases is None:
            return set(self.held)
        info = self._info()
        try:
            when = datetime.now(UTC) if stopped else None
            return await asyncio.to_thread(leases.heartbeat, info, stopped=when)
        except Exception as error:  # noqa: BLE001 - the next beat tries again
            log.warning(
                "heartbeat failed: leases not renewed",
                extra={"worker_id": self.worker_id, "error": str(error)},
            )
            return None

    async def keep(self) -> None:
        """Renew the leases of the running attempts; kill the runs whose lease is lost,
        and every run once no renewal has got through for nearly a whole lease.

        A beat that gets no answer (a partition, a store that stopped answering) counts
        as a failed renewal after `heartbeat_seconds`, and no second beat is begun while
        it hangs: the check that fences the runs must not wait on the call it judges (it
        did, and a partitioned worker ran its programs on while the leader handed their
        attempts to another worker). Renewals count from when their beat began, and the
        runs are killed a heartbeat before the lease lapses by this clock, so they are
        gone by the time the leader can take the lease."""
        leases = self.leases
        if leases is None:
            return
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        fence_after = max(leases.lease_seconds - self.heartbeat_seconds, self.heartbeat_seconds)
        beat: asyncio.Task[set[Attempt] | None] | None = None
        began = renewed_at
        asked: set[Attempt] = set()
        try:
            while True:
                if beat is None:
                    # What this beat renews: an attempt started while it hangs is not in
                    # its answer, and must not be taken for lost when the answer comes.
                    asked = set(self.held)
                    beat, began = asyncio.create_task(self.beat()), loop.time()
                done, _ = await asyncio.wait({beat}, timeout=self.heartbeat_seconds)
                held = None
                if done:
                    held, beat = beat.result(), None
                if held is not None:
                    renewed_at = began
                    lost = asked - held
                elif loop.time() - renewed_at > fence_after:
                    lost = set(self.held)  # cut off from the store: the leader takes them
                else:
                    lost = set()
                for task_id, attempt in lost & set(self.held):
                    if (task_id, attempt) in self.lost:
                        continue
                    self.lost.add((task_id, attempt))
                    log.warning(
                        "lease lost: killing the run",
                        extra={"task_id": str(task_id), "attempt": attempt},
                    )
                    self._kill(task_id, attempt)
                if done:
                    await asyncio.sleep(self.heartbeat_seconds)
        finally:
            if beat is not None:
                beat.cancel()


def _version() -> str:
    try:
        return metadata.version("taskledger")
    except metadata.PackageNotFoundError:
        return "unknown"
