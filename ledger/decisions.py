"""Deciding on tasks: load, decide, save, one task at a time or many in one transaction.

Optimistic concurrency is the arbiter between writers. Every command is "load, decide,
save"; if another writer saved first, the save fails on the (task, version) primary key,
and the command reloads and decides again against the new state, a bounded number of
times. So when a worker's AttemptCompleted and the reaper's TaskExpired race for the same
attempt, exactly one is stored and the other is refused by the rules it re-checks.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from ledger.domain import Task
from ledger.errors import AttemptLeaseLost, ContentionExhausted, LedgerUnavailable, TaskNotFound
from ledger.leases import LeaseLostError
from ledger.state import TaskState
from ledger.store import EventStore, unavailable

log = logging.getLogger("ledger.service")  # the name operators filter "task transition" by


@dataclass(frozen=True)
class Decision:
    """What to decide on one task, as a value (see Ledger.execute_many)."""

    task_id: UUID
    decide: Callable[[Task], Any]  # raises the rule's refusal, or appends events
    fresh: bool = False  # read the task from the store even if this process holds it


def log_transition(task: Task, events: Sequence[object]) -> None:
    """One line per transition, for whoever follows a task through the logs."""
    log.info(
        "task transition",
        extra={
            "task_id": str(task.id),
            "attempt": task.current.number,
            "events": [type(e).__name__ for e in events],
            "status": str(task.status),
            "version": task.version,
        },
    )


class Decisions:
    """Runs decisions against the store, keeping the tasks this process saved last."""

    def __init__(
        self, store: EventStore, *, max_contention_retries: int = 16, recent_capacity: int = 1024
    ) -> None:
        self.store = store
        self.max_contention_retries = max_contention_retries
        # Lost version races so far (each one cost a reload and a second decision).
        self.version_conflicts = 0
        # Tasks this process saved last, so that the next decision on one (a worker's
        # AttemptCompleted after its AttemptStarted) need not read it back. Never
        # trusted for a query nor for a refusal; see `run`.
        self._recent: OrderedDict[UUID, Task] = OrderedDict()
        self._recent_lock = threading.Lock()
        self.recent_capacity = recent_capacity
        self.recent_hits = 0

    def run(self, task_id: UUID, tenant: str | None, decide: Callable[[Task], Any]) -> TaskState:
        """Load, decide, save; on a lost version race, reload and decide again.

        The first try may start from the copy this process saved last (no read). That
        copy can be stale, so only a decision it leads to that then saves is kept: the
        save of version v+1 succeeding proves nobody else wrote after version v, i.e.
        the copy was the current state. A refusal or a no-op decided on the copy is
        decided again on the task read from the store.
        """
        recent = self.take(task_id)
        for _ in range(self.max_contention_retries):
            trusted = recent is None
            task = self.store.load(task_id, tenant) if recent is None else recent
            recent = None
            if tenant is not None and task.tenant != tenant:
                raise TaskNotFound(task_id)
            try:
                decide(task)  # raises TransitionRefused & co. when the rules say no
            except Exception:
                if trusted:
                    raise
                continue
            if not task.pending_events:
                if trusted:
                    self.keep(task)
                    return TaskState.of(task)
                continue
            try:
                log_transition(task, self.store.record(task))
            except LeaseLostError as lost:
                raise AttemptLeaseLost(task_id, str(lost)) from None
            except IntegrityError:
                if trusted:
                    self.version_conflicts += 1
                continue
            if not trusted:
                self.recent_hits += 1
            self.keep(task)
            return TaskState.of(task)
        raise ContentionExhausted(task_id, self.max_contention_retries)

    def take(self, task_id: UUID) -> Task | None:
        with self._recent_lock:
            return self._recent.pop(task_id, None)  # one command at a time owns a copy

    def keep(self, task: Task) -> None:
        with self._recent_lock:
            self._recent[task.id] = task
            self._recent.move_to_end(task.id)
            while len(self._recent) > self.recent_capacity:
                self._recent.popitem(last=False)

    def run_many(self, commands: Sequence[Decision]) -> list[TaskState | Exception]:
        """Run commands on many tasks at once: one read for the tasks this process does
        not hold, one transaction for all their events. Each command gets the outcome
        `execute` would give it: its task's new state, or the exception it would raise
        (returned, not raised). Anything the batch cannot decide safely (a second
        command on the same task, a stale copy, a lost version race) is run on its own
        afterwards, as `execute` would.
        """
        results: list[TaskState | Exception | None] = [None] * len(commands)
        alone: list[int] = []
        held: dict[int, tuple[Task, bool]] = {}  # index -> (task, read from the store)
        to_read: list[int] = []
        seen: set[UUID] = set()
        for i, command in enumerate(commands):
            if command.task_id in seen:
                alone.append(i)
                continue
            seen.add(command.task_id)
            copy = None if command.fresh else self.take(command.task_id)
            if copy is None:
                to_read.append(i)
            else:
                held[i] = (copy, False)
        if to_read:
            try:
                loaded = self.store.load_many([commands[i].task_id for i in to_read])
            except LedgerUnavailable as error:
                for i in to_read:
                    results[i] = LedgerUnavailable(str(error))
                loaded = {}
            for i in to_read:
                task = loaded.get(commands[i].task_id)
                if task is not None:
                    held[i] = (task, True)
                elif results[i] is None:
                    results[i] = TaskNotFound(commands[i].task_id)
        deciding: list[int] = []
        for i, (task, trusted) in held.items():
            try:
                commands[i].decide(task)
            except Exception as refused:  # noqa: BLE001 - the command's own outcome
                if trusted:
                    results[i] = refused
                else:
                    alone.append(i)
                continue
            if task.pending_events:
                deciding.append(i)
            elif trusted:
                self.keep(task)
                results[i] = TaskState.of(task)
            else:
                alone.append(i)
        pending = {i: held[i][0].collect_events() for i in deciding}
        errors = self.store.record_many([pending[i] for i in deciding])
        for i, met in zip(deciding, errors, strict=True):
            task, trusted = held[i]
            if met is None:
                log_transition(task, pending[i])
                self.keep(task)
                self.recent_hits += not trusted
                results[i] = TaskState.of(task)
            elif isinstance(met, LeaseLostError):
                results[i] = AttemptLeaseLost(commands[i].task_id, str(met))
            elif isinstance(met, IntegrityError):
                self.version_conflicts += trusted
                alone.append(i)
            else:
                results[i] = unavailable(met)
        for i in sorted(alone):
            try:
                results[i] = self.run(commands[i].task_id, None, commands[i].decide)
            except Exception as outcome:  # noqa: BLE001 - the command's own outcome
                results[i] = outcome
        return [r if r is not None else LedgerUnavailable("no outcome") for r in results]
