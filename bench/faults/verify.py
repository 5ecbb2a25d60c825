"""The verdict on one round, after the fact: from the tasks' events (read straight from
the ledger's table), the runs the programs reported (bench/faults/runs.py), the
submissions' answers and what the suite did when (`Window`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg

from bench.faults.load import Submission
from bench.faults.runs import Run

TOPIC = "ledger.domain:Task."
# outcome event -> the status it leaves (unless a retry is scheduled in the same save)
ENDS = {
    "AttemptCompleted": "Completed",
    "AttemptFailed": "Failed",
    "TaskExpired": "Expired",
    "TaskCancelled": "Cancelled",
}
# A worker that loses its lease kills the run at its next heartbeat (2 s by default); a run
# seen alive longer than this after its attempt was recorded worker_lost was not fenced.
FENCE_SLACK = 3.0


@dataclass(frozen=True)
class Event:
    version: int
    type: str
    at: float  # the event's timestamp (the writer's clock), as time.time()
    data: dict[str, Any]


@dataclass(frozen=True)
class Window:
    """Something the suite did to the deployment, from `start` to `end` (time.time())."""

    what: str  # "killed" (a process) or "cut off" (from PostgreSQL)
    workers: frozenset[str]  # labels of the workers it concerns
    start: float
    end: float


def read_round(database_url: str, round_name: str) -> dict[UUID, list[Event]]:
    """The events of every task of round `round_name` in the store (found by the
    description the load gives them), in order."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state"
            " FROM taskledger_events e WHERE e.originator_id IN ("
            "  SELECT originator_id FROM taskledger_events"
            "  WHERE topic = %s AND convert_from(state, 'UTF8') LIKE %s)"
            " ORDER BY e.originator_id, e.originator_version",
            (f"{TOPIC}TaskSubmitted", f'%"description":"faults {round_name} %'),
        ).fetchall()
    events: dict[UUID, list[Event]] = defaultdict(list)
    for task_id, version, topic, state in rows:
        data = orjson.loads(state)
        at = datetime.fromisoformat(data["timestamp"]).timestamp()
        events[task_id].append(Event(int(version), str(topic).removeprefix(TOPIC), at, data))
    return dict(events)


@dataclass
class Attempt:
    number: int
    worker: str | None = None  # label of the worker that started it
    started_at: float | None = None
    outcomes: list[Event] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    @property
    def lost(self) -> bool:
        return any(_worker_lost(e) for e in self.outcomes)


def _worker_lost(outcome: Event) -> bool:
    return outcome.type == "AttemptFailed" and outcome.data["error"]["kind"] == "worker_lost"


@dataclass
class TaskReport:
    """One task's history, replayed."""

    task_id: UUID
    token: str
    kind: str
    status: str = "Pending"
    deadline: float | None = None  # of the run (a client's submit)
    ended: list[Event] = field(default_factory=list)  # events that made it terminal
    attempts: dict[int, Attempt] = field(default_factory=dict)
    unattributed_runs: list[Run] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in ENDS.values()

    @property
    def lateness(self) -> float | None:
        """Seconds its end came after its deadline (None: before, or not ended)."""
        if not self.ended or self.deadline is None:
            return None
        late = self.ended[-1].at - self.deadline
        return late if late > 0 else None


def replay(
    task_id: UUID, events: Sequence[Event], worker_label: Callable[[str], str]
) -> TaskReport:
    submitted = events[0].data if events and events[0].type == "TaskSubmitted" else {}
    token = str((submitted.get("data") or {}).get("token", ""))
    kind = str(submitted.get("description", "")).removeprefix("faults ").split(" ", 1)[-1]
    kind = kind.rsplit(" ", 1)[0]
    report = TaskReport(task_id, token, kind)
    for i, event in enumerate(events):
        following = events[i + 1] if i + 1 < len(events) else None
        n = event.data.get("attempt")
        attempt = report.attempts.setdefault(int(n), Attempt(int(n))) if n is not None else None
        if event.type == "AttemptScheduled":
            report.status = "Pending"
            if event.data["reason"] != "auto-retry":
                report.deadline = datetime.fromisoformat(event.data["deadline"]).timestamp()
        elif event.type == "AttemptStarted":
            assert attempt is not None
            report.status = "InProgress"
            attempt.worker = worker_label(str(event.data["worker_id"]))
            attempt.started_at = event.at
        elif event.type in ENDS:
            assert attempt is not None
            attempt.outcomes.append(event)
            retried = following is not None and following.type == "AttemptScheduled"
            if event.type == "AttemptFailed" and retried:
                continue  # a retry was scheduled in the same save: not an end
            report.status = ENDS[event.type]
            report.ended.append(event)
    return report


def attribute(report: TaskReport, runs: Iterable[Run]) -> None:
    """Give each run of the task to the attempt its worker had started last before it.

    AttemptStarted's timestamp is taken (from the same clock) before the event is stored,
    and the worker starts the program only after that: a run is later than its attempt's
    start. Retries of a failing program come a backoff (0.5 s or more) apart."""
    for run in runs:
        candidates = [
            a
            for a in report.attempts.values()
            if a.worker == run.worker and a.started_at is not None and a.started_at <= run.at
        ]
        if candidates:
            max(candidates, key=lambda a: a.started_at or 0.0).runs.append(run)
        else:
            report.unattributed_runs.append(run)


def explained(attempt: Attempt, lost_at: float, windows: Sequence[Window], lease: float) -> bool:
    """Whether a worker_lost outcome has a cause the suite made: the attempt's worker was
    killed, or cut off from PostgreSQL for a whole lease (less a heartbeat), while the
    attempt ran."""
    began = attempt.started_at or lost_at
    for window in windows:
        if attempt.worker not in window.workers:
            continue
        if window.end < began - 1 or window.start > lost_at:
            continue
        if window.what == "killed" or window.end - window.start >= lease * 0.8:
            return True
    return False


@dataclass
class RoundResult:
    fault: str
    description: str
    submitted: int = 0
    accepted: int = 0
    refused_5xx: int = 0
    unanswered: int = 0
    stored_though_5xx: int = 0
    stored_though_unanswered: int = 0
    ended_once: int = 0
    lost: int = 0
    duplicate_outcomes: int = 0
    rerun_after_lost: int = 0  # tasks whose program ran in a lost attempt and again later
    duplicate_runs: int = 0  # attempts whose program ran more than once
    unattributed_runs: int = 0
    worker_lost: int = 0
    false_worker_lost: int = 0
    unfenced_runs: int = 0  # runs still alive FENCE_SLACK s after their worker_lost
    max_lateness: float | None = None  # seconds: recorded end - deadline
    max_run_past_deadline: float | None = None  # seconds: a run's last sign of life - deadline
    recovery: float | None = None  # seconds: until every live worker completed a probe
    recovered: dict[str, float] = field(default_factory=dict)  # worker -> seconds
    ends: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> status -> n
    notes: list[str] = field(default_factory=list)


def judge(
    result: RoundResult,
    submissions: Sequence[Submission],
    events: dict[UUID, list[Event]],
    runs: Sequence[Run],
    windows: Sequence[Window],
    worker_label: Callable[[str], str],
    lease: float,
) -> None:
    """Fill `result` from what the round left."""
    by_token = {s.token: s for s in submissions}
    reports = [replay(task_id, evs, worker_label) for task_id, evs in events.items()]
    stored = {r.token: r for r in reports}
    runs_by_token: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        runs_by_token[run.token].append(run)

    result.submitted = len(submissions)
    for s in submissions:
        if s.accepted:
            result.accepted += 1
        elif s.status is None:
            result.unanswered += 1
            result.stored_though_unanswered += s.token in stored
        elif s.status >= 500:
            result.refused_5xx += 1
            result.stored_though_5xx += s.token in stored
    missing = [s for s in submissions if s.accepted and s.token not in stored]
    if missing:
        result.notes.append(f"{len(missing)} accepted submissions are not in the store")
    result.lost += len(missing)

    ends: dict[str, Counter[str]] = defaultdict(Counter)
    late: list[float] = []
    alive_late: list[float] = []
    for report in reports:
        attribute(report, runs_by_token.get(report.token, []))
        ends[report.kind][report.status] += 1
        if report.token in by_token and by_token[report.token].accepted:
            result.ended_once += report.terminal and len(report.ended) == 1
        if not report.terminal:
            result.lost += 1
        if report.lateness is not None:
            late.append(report.lateness)
        if report.deadline is not None:
            alive_late += [
                run.last_seen - report.deadline
                for a in report.attempts.values()
                for run in a.runs
                if run.last_seen > report.deadline
            ]
        for attempt in report.attempts.values():
            result.duplicate_outcomes += len(attempt.outcomes) > 1
            if len(attempt.runs) > 1:
                result.duplicate_runs += 1
                result.notes.append(
                    f"attempt {attempt.number} of task {report.task_id} ({report.kind}) ran"
                    f" {len(attempt.runs)} times on {attempt.worker}, started at"
                    f" {', '.join(_clock(r.at) for r in attempt.runs)}"
                )
            for outcome in attempt.outcomes:
                if _worker_lost(outcome):
                    result.worker_lost += 1
                    for run in attempt.runs:
                        if run.last_seen > outcome.at + FENCE_SLACK:
                            result.unfenced_runs += 1
                            result.notes.append(
                                f"attempt {attempt.number} of task {report.task_id}"
                                f" ({report.kind}) was recorded worker_lost at"
                                f" {_clock(outcome.at)}; its run on {attempt.worker} was still"
                                f" alive at {_clock(run.last_seen)}"
                            )
                    if not explained(attempt, outcome.at, windows, lease):
                        result.false_worker_lost += 1
                        result.notes.append(
                            f"false worker_lost: task {report.task_id} attempt {attempt.number}"
                            f" on {attempt.worker}: {outcome.data['error']['message'][:160]}"
                        )
        ran = [a for a in report.attempts.values() if a.runs]
        if any(a.lost for a in ran) and len(ran) > 1:
            result.rerun_after_lost += 1
        result.unattributed_runs += len(report.unattributed_runs)
        for run in report.unattributed_runs:
            result.notes.append(
                f"a run of task {report.task_id} ({report.kind}) on {run.worker} at"
                f" {_clock(run.at)} matches no attempt that worker started"
            )
    result.max_lateness = max(late) if late else None
    result.max_run_past_deadline = max(alive_late) if alive_late else None
    result.ends = {kind: dict(counts) for kind, counts in sorted(ends.items())}


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:-3]
