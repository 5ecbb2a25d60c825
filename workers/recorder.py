"""Recording what became of an attempt a worker handled: the outcome of its run, or its
expiry. The ledger refuses an outcome when another came first or the worker no longer
holds the attempt's lease; either is logged and nothing more."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ledger import Decision, Ledger, TaskState
from ledger.errors import AttemptLeaseLost, TransitionRefused
from workers.executors.base import RunOutcome
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class OutcomeRecorder:
    def __init__(
        self,
        ledger: Ledger,
        execute: Callable[[Decision], Awaitable[TaskState]],
        metrics: WorkerMetrics,
    ) -> None:
        """`execute`: runs a ledger command (the worker's, sharing its transactions)."""
        self.ledger = ledger
        self.execute = execute
        self.metrics = metrics

    async def record(self, task: TaskState, outcome: RunOutcome) -> None:
        task_id, attempt = task.id, task.attempt
        context = {"task_id": str(task_id), "attempt": attempt, "outcome": outcome.kind}
        if outcome.kind == "completed":
            assert outcome.result is not None
            result = outcome.result
            await self.settle(self.ledger.complete_decision(task_id, attempt, result), context)
        elif outcome.kind == "failed":
            assert outcome.error is not None
            error = outcome.error
            await self.settle(
                self.ledger.fail_decision(task_id, attempt, error, retryable=outcome.retryable),
                context,
            )
        elif outcome.kind == "expired":
            await self.settle(
                self.ledger.expire_decision(task_id, attempt, detected_by="worker"), context
            )
        # "cancelled": the TaskCancelled event is already there; nothing to add.
        log.info("attempt finished", extra=context)

    async def settle(self, decision: Decision, context: dict[str, object]) -> None:
        """Record an outcome; if the rules refuse it, someone else recorded one first."""
        try:
            self.metrics.outcome_recorded(await self.execute(decision))
        except AttemptLeaseLost as lost:
            log.warning(
                "outcome not recorded: this worker no longer holds the attempt's lease",
                extra={**context, "reason": str(lost)},
            )
        except TransitionRefused as refused:
            log.info(
                "outcome not recorded: another came first",
                extra={**context, "reason": str(refused)},
            )
