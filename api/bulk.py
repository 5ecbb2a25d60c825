"""Bulk retry and cancel of the tasks a filter selects (`POST /api/tasks/bulk`, and the
dashboard's "Retry all matching…").

Every acted-on task gets the ordinary event of a retry or cancel, carrying the bulk id;
each task is decided on its own (a task whose state forbids the action is refused and
counted, the others go ahead), in transactions of BATCH tasks.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from api.auth import Principal
from api.context import ApiContext
from api.errors import ApiProblem
from ledger.errors import TaskNotFound, TransitionRefused
from projections.queries import TaskFilter, list_tasks

log = logging.getLogger("api.bulk")

Action = Literal["retry", "cancel"]
MAX_TASKS = 1_000  # per bulk action
BATCH = 100  # tasks decided in one transaction
REFUSED_LISTED = 100


@dataclass
class BulkResult:
    bulk_id: str
    action: Action
    matched: int = 0
    done: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    refused_tasks: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {
            "bulk_id": self.bulk_id,
            "action": self.action,
            "matched": self.matched,
            "done": self.done,
            "refused": dict(self.refused),
            "refused_tasks": self.refused_tasks,
        }


def matching_ids(
    ctx: ApiContext, principal: Principal, filters: TaskFilter, limit: int
) -> list[UUID]:
    """The ids of the caller's tasks the filter selects, as the task list has them; a
    422 (nothing done) when more than `limit` match."""
    ids: list[UUID] = []
    cursor = None
    while True:
        with ctx.queries.connection() as conn:
            page = list_tasks(
                conn,
                ctx.schema,
                tenant=principal.scope,
                filters=filters,
                limit=min(500, limit + 1),
                cursor=cursor,
                columns=("id",),
            )
        ids.extend(row["id"] for row in page.items)
        if len(ids) > limit:
            raise ApiProblem(
                422,
                "too-many-tasks",
                f"more than {limit} tasks match; narrow the filter (a bulk action takes at "
                f"most {limit} tasks{'' if limit == MAX_TASKS else ', the limit you gave'})",
                errors=[{"field": "limit", "message": f"more than {limit} tasks match"}],
            )
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


def bulk_action(
    ctx: ApiContext,
    principal: Principal,
    action: Action,
    filters: TaskFilter,
    *,
    reason: str = "",
    limit: int = MAX_TASKS,
) -> BulkResult:
    """Retry or cancel each task the filter selects (blocking: run it off the loop)."""
    result = BulkResult(bulk_id=f"bulk-{uuid.uuid4().hex[:16]}", action=action)
    ids = matching_ids(ctx, principal, filters, limit)
    result.matched = len(ids)
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        decisions = [
            ctx.ledger.client_decision(
                task_id,
                action,
                by=principal.key_id,
                tenant=principal.scope,
                reason=reason,
                bulk_id=result.bulk_id,
            )
            for task_id in chunk
        ]
        for task_id, outcome in zip(chunk, ctx.ledger.execute_many(decisions), strict=True):
            if isinstance(outcome, TransitionRefused | TaskNotFound):
                why = outcome.reason if isinstance(outcome, TransitionRefused) else "not found"
                result.refused[why] += 1
                if len(result.refused_tasks) < REFUSED_LISTED:
                    result.refused_tasks.append({"id": task_id, "why": why})
            elif isinstance(outcome, Exception):
                # The store failed (or a bug): stop here. What was done carries the bulk id.
                log.error(
                    "bulk action stopped: a task could not be decided",
                    extra={"bulk_id": result.bulk_id, "task_id": str(task_id), "done": result.done},
                )
                raise outcome
            else:
                result.done += 1
                if action == "cancel":
                    ctx.metrics.tasks_cancelled.labels(outcome.language).inc()
    log.info(
        "bulk action",
        extra={
            "bulk_id": result.bulk_id,
            "action": action,
            "tenant": principal.tenant,
            "key_id": principal.key_id,
            "matched": result.matched,
            "done": result.done,
            "refused": sum(result.refused.values()),
        },
    )
    return result
