"""Projections of the ledger's event log into query views.

- `task_status`: one row per task (the task list, counts by status, the reaper's scan);
- `audit`: one row per event (the audit queries).

Each view is rebuildable from the log (`taskledger projections rebuild NAME`).
"""

from projections.audit import AuditProjection
from projections.base import Projection
from projections.task_status import TaskStatusProjection


def all_projections() -> dict[str, Projection]:
    return {p.name: p for p in (TaskStatusProjection(), AuditProjection())}


__all__ = ["AuditProjection", "Projection", "TaskStatusProjection", "all_projections"]
