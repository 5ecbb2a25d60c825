"""The task ledger: the Task aggregate, its events and rules, and the service over the event store.

Imports nothing of taskledger's other packages.
"""

from ledger.application import HistoryEntry, Ledger, Submission, TaskState
from ledger.clock import Clock, ManualClock, SystemClock
from ledger.domain import AttemptError, AttemptResult, Status, Task, TaskLimits
from ledger.retry import RetryPolicy

__all__ = [
    "AttemptError",
    "AttemptResult",
    "Clock",
    "HistoryEntry",
    "Ledger",
    "ManualClock",
    "RetryPolicy",
    "Status",
    "Submission",
    "SystemClock",
    "Task",
    "TaskLimits",
    "TaskState",
]
