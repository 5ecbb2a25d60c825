"""Writers that race each other from separate processes (importable by `spawn` children)."""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from uuid import UUID

from ledger import AttemptError, AttemptResult, Ledger
from ledger.clock import OffsetClock
from ledger.errors import TransitionRefused


@dataclass(frozen=True)
class RaceResult:
    task_id: UUID
    action: str
    won: bool


def act(ledger: Ledger, action: str, task_id: UUID, worker: str) -> None:
    if action == "start":
        ledger.start_attempt(task_id, 1, worker)
    elif action == "complete":
        ledger.complete_attempt(task_id, 1, AttemptResult(stdout=worker))
    elif action == "fail":
        ledger.fail_attempt(task_id, 1, AttemptError("program_error", worker), retryable=False)
    elif action == "expire":
        ledger.expire(task_id, 1, detected_by=worker)
    elif action == "cancel":
        ledger.cancel(task_id, by=worker, reason="race")
    else:
        raise ValueError(action)


_barrier: Barrier | None = None


def keep_barrier(barrier: Barrier) -> None:
    """Pool initializer: a barrier can reach a child only when the child is created."""
    global _barrier
    _barrier = barrier


def race_in_child(
    env: dict[str, str], task_ids: list[UUID], action: str, name: str
) -> tuple[list[RaceResult], int]:
    """Perform `action` on each task in turn, all racers released together per task.

    The racer's clock runs an hour ahead, so every deadline has passed for it.
    """
    assert _barrier is not None
    barrier = _barrier
    ledger = Ledger(env, clock=OffsetClock(3600))
    results = []
    try:
        for task_id in task_ids:
            barrier.wait(timeout=60)
            try:
                act(ledger, action, task_id, name)
            except TransitionRefused:
                results.append(RaceResult(task_id, action, won=False))
            else:
                results.append(RaceResult(task_id, action, won=True))
        return results, ledger.version_conflicts
    finally:
        ledger.close()
