"""Projections of the ledger's event log into query views.

- `task_status`: one row per task (the task list, counts by status, the reaper's scan);
- `audit`: one row per event (the audit queries);
- `task_periods`: one row per version of each task, with the period it held (the task
  list as of any time);
- `api_keys`: one row per issued API key (the keys page and `GET /api/keys`);
- `webhook_deliveries`: one row per webhook delivery owed, and where it stands (the
  deliverer's work list).

Each view is rebuildable from the log (`taskledger projections rebuild NAME`).
"""

from projections.api_keys import ApiKeysProjection
from projections.audit import AuditProjection
from projections.base import Projection
from projections.task_periods import TaskPeriodsProjection
from projections.task_status import TaskStatusProjection
from projections.webhook_deliveries import WebhookDeliveriesProjection


def all_projections() -> dict[str, Projection]:
    return {
        p.name: p
        for p in (
            TaskStatusProjection(),
            AuditProjection(),
            TaskPeriodsProjection(),
            ApiKeysProjection(),
            WebhookDeliveriesProjection(),
        )
    }


__all__ = [
    "ApiKeysProjection",
    "AuditProjection",
    "Projection",
    "TaskPeriodsProjection",
    "TaskStatusProjection",
    "WebhookDeliveriesProjection",
    "all_projections",
]
