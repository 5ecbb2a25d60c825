"""Prometheus metrics of the worker, the dispatcher and the reaper.

One `WorkerMetrics` per process, on that process's registry: `taskledger worker` serves it
on its own `--metrics-port` (`serving`); `taskledger api` and `taskledger dev` put it on
the API's registry, so their `/metrics` shows the dispatcher and the reaper (and dev's
worker pool) beside the API.

Counters count the transitions this process appended: an outcome the ledger refused
(another writer came first) or a dropped duplicate command is not counted, so across a
deployment every task's completion, failure or expiry is counted exactly once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ledger import Status, TaskState

log = logging.getLogger(__name__)

# A program's run: from milliseconds (echo, a print) to the longest TTL's hour.
RUN_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
# Waiting in the queue: milliseconds when workers keep up, minutes to hours when not.
WAIT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600,
)  # fmt: skip
# Overheads of the machinery (deadline to TaskExpired, event to publish): milliseconds
# when healthy; the upper buckets catch a stalled role.
OVERHEAD_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.tasks_completed = Counter(
            "taskledger_tasks_completed_total",
            "Tasks completed (AttemptCompleted appended by this process), by language.",
            ["language"],
            registry=self.registry,
        )
        self.tasks_failed = Counter(
            "taskledger_tasks_failed_total",
            "Tasks that ended Failed (an attempt failed with no retry left), by language.",
            ["language"],
            registry=self.registry,
        )
        self.attempts_failed = Counter(
            "taskledger_attempts_failed_total",
            "Attempts that failed (retried or not), by language and error kind.",
            ["language", "kind"],
            registry=self.registry,
        )
        self.tasks_expired = Counter(
            "taskledger_tasks_expired_total",
            "Tasks expired (TaskExpired appended by this process), by language and detector.",
            ["language", "detected_by"],
            registry=self.registry,
        )
        self.attempt_seconds = Histogram(
            "taskledger_attempt_duration_seconds",
            "Wall time of a program's run in the sandbox, by language and outcome.",
            ["language", "outcome"],
            buckets=RUN_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "taskledger_queue_wait_seconds",
            "From an attempt being due (its not_before) to its AttemptStarted, by language.",
            ["language"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.deadline_lateness_seconds = Histogram(
            "taskledger_deadline_lateness_seconds",
            "From a task's deadline to its TaskExpired event, by detector.",
            ["detected_by"],
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.dispatcher_lag_seconds = Histogram(
            "taskledger_dispatcher_lag_seconds",
            "From a command being due (its AttemptScheduled stored, or its backoff over) "
            "to the broker confirming its publication.",
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.commands_published = Counter(
            "taskledger_dispatcher_commands_published_total",
            "Attempt commands the dispatcher published (not counting its replay after a "
            "restart of what it had published already).",
            registry=self.registry,
        )
        self.busy_slots = Gauge(
            "taskledger_worker_busy_slots",
            "Sandbox slots of a worker running a program right now.",
            ["worker_id"],
            registry=self.registry,
        )
        self.slots = Gauge(
            "taskledger_worker_slots",
            "Sandbox slots of a worker (its --concurrency).",
            ["worker_id"],
            registry=self.registry,
        )

    # -- hooks ---------------------------------------------------------------------------

    def worker_started(self, worker_id: str, slots: int, busy: Callable[[], float]) -> None:
        """A worker's slots; `busy` is read at every scrape."""
        self.slots.labels(worker_id).set(slots)
        self.busy_slots.labels(worker_id).set_function(busy)

    def attempt_started(self, task: TaskState) -> None:
        """This process appended AttemptStarted: `task` is the state it returned."""
        if task.started_at is not None:
            waited = (task.started_at - task.not_before).total_seconds()
            self.queue_wait_seconds.labels(task.language).observe(max(0.0, waited))

    def attempt_ran(self, language: str, outcome: str, seconds: float) -> None:
        self.attempt_seconds.labels(language, outcome).observe(seconds)

    def outcome_recorded(self, task: TaskState) -> None:
        """This process appended an outcome (AttemptCompleted, AttemptFailed or
        TaskExpired): `task` is the state the ledger returned for it."""
        ended = task.attempts[-1]
        if ended.outcome is None and len(task.attempts) > 1:
            ended = task.attempts[-2]  # it failed and the retry is already scheduled
        if ended.outcome == "completed":
            self.tasks_completed.labels(task.language).inc()
        elif ended.outcome == "failed":
            kind = str((ended.error or {}).get("kind", "unknown"))
            self.attempts_failed.labels(task.language, kind).inc()
            if task.status is Status.FAILED:
                self.tasks_failed.labels(task.language).inc()
        elif ended.outcome == "expired" and ended.finished_at is not None:
            detected_by = ended.detected_by or "unknown"
            self.tasks_expired.labels(task.language, detected_by).inc()
            late = (ended.finished_at - ended.deadline).total_seconds()
            self.deadline_lateness_seconds.labels(detected_by).observe(max(0.0, late))

    def commands_dispatched(self, published_at: datetime, due: Iterable[datetime]) -> None:
        """The broker confirmed commands that were due at the times in `due`."""
        for since in due:
            self.dispatcher_lag_seconds.observe(max(0.0, (published_at - since).total_seconds()))
            self.commands_published.inc()


@contextlib.contextmanager
def serving(registry: CollectorRegistry, port: int | None, host: str = "0.0.0.0") -> Iterator[None]:  # noqa: S104 - scraped from other machines
    """Serve `registry` as Prometheus text on http://host:port/metrics while in the block
    (nothing when `port` is None)."""
    if port is None:
        yield
        return
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as error:
        raise OSError(
            error.errno, f"cannot serve metrics on {host}:{port}: {error.strerror or error}"
        ) from None
    log.info("serving metrics", extra={"url": f"http://{host}:{port}/metrics"})
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
