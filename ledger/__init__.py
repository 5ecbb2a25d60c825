"""The task ledger: the Task aggregate, its events and rules, and the service over the event store.

Imports nothing of taskledger's other packages. Modules:

- `domain`: the Task aggregate and its events; `values`: what it is made of (statuses,
  attempts, outcomes, limits); `checks`: the checks on its fields.
- `service`: the Ledger, commands and queries; `state`: what it answers.
- `store`: the event store (SQL, bounds, schema lock, error mapping); `log`: the events in
  position order, for followers; `keys`: API keys; `leases`: attempt leases.
"""

from ledger.clock import Clock, ManualClock, SystemClock
from ledger.decisions import Decision
from ledger.domain import Task
from ledger.retry import RetryPolicy
from ledger.service import Ledger, SubmitRequest
from ledger.state import HistoryEntry, Submission, TaskState
from ledger.values import AttemptError, AttemptResult, Status, TaskLimits

__all__ = [
    "AttemptError",
    "AttemptResult",
    "Clock",
    "Decision",
    "HistoryEntry",
    "Ledger",
    "ManualClock",
    "RetryPolicy",
    "Status",
    "Submission",
    "SubmitRequest",
    "SystemClock",
    "Task",
    "TaskLimits",
    "TaskState",
]
