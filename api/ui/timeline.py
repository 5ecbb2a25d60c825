"""A task's timeline, from its events: one row per attempt, its backoff, queued and
running segments, its deadline, and who did each step (the client's key, the retry
policy, the worker, the reaper). Pure: the page draws it as SVG and as a list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ledger.state import AttemptState, HistoryEntry

# The drawing's coordinates (its viewBox; the page scales it to its width).
WIDTH = 900.0
LABEL_WIDTH = 120.0  # the attempt names, left of the plot
RIGHT_MARGIN = 24.0
ROW_HEIGHT = 48.0
BAR_HEIGHT = 18.0
TOP = 10.0
AXIS_HEIGHT = 30.0


@dataclass(frozen=True)
class Step:
    at: datetime
    text: str


@dataclass(frozen=True)
class Segment:
    kind: str  # "backoff", "queued", "running"
    start: datetime
    end: datetime
    ongoing: bool  # still going at the timeline's end
    label: str
    x: float = 0.0
    width: float = 0.0


@dataclass
class AttemptRow:
    number: int
    reason: str
    scheduled_at: datetime
    not_before: datetime
    deadline: datetime
    started_at: datetime | None = None
    worker_id: str | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    steps: list[Step] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    y: float = 0.0
    deadline_x: float | None = None  # None: after the timeline's end


@dataclass(frozen=True)
class Tick:
    x: float
    at: datetime
    anchor: str  # SVG text-anchor


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    rows: list[AttemptRow]
    before: list[Step]  # steps before the first attempt (none today: submit schedules one)
    ticks: list[Tick]
    height: float
    width: float = WIDTH
    label_width: float = LABEL_WIDTH

    @property
    def summary(self) -> str:
        """The drawing's accessible name."""
        count = len(self.rows)
        return (
            f"Timeline of {count} attempt{'s' if count != 1 else ''}, "
            f"{self.start:%H:%M:%S} to {self.end:%H:%M:%S} UTC; the list below says the same"
        )


def _actor(by: str) -> str:
    """Who a `by` names, in words."""
    if by.startswith("ledger:"):
        return f"the retry policy ({by})"
    return f"key {by}"


def _attempt_step(row: AttemptRow, entry: HistoryEntry) -> None:
    """The step an attempt's event is, in words, added to its row."""
    data: dict[str, Any] = entry.data
    kind = entry.type
    if kind == "AttemptScheduled":
        wait = (data["not_before"] - entry.at).total_seconds()
        text = f"scheduled ({data['reason']}) by {_actor(str(data['by']))}" + (
            f", to start after a backoff of {wait:.1f} s" if wait > 0 else ""
        )
    elif kind == "AttemptStarted":
        text = f"started by worker {data['worker_id']}"
    elif kind == "AttemptCompleted":
        result = data.get("result") or {}
        text = (
            f"completed on worker {row.worker_id} (exit code {result.get('exit_code', 0)}, "
            f"{float(result.get('duration_ms', 0.0)):.0f} ms)"
        )
    elif kind == "AttemptFailed":
        error = data.get("error") or {}
        where = f" on worker {row.worker_id}" if row.worker_id else ""
        again = "; the retry policy may try again" if data.get("retryable") else ""
        text = f"failed{where}: {error.get('kind', '?')}: {error.get('message', '')}{again}"
    elif kind == "TaskExpired":
        text = f"expired at its deadline, detected by the reaper ({data['detected_by']})"
    elif kind == "TaskCancelled":
        reason = f": {data['reason']}" if data.get("reason") else ""
        text = f"cancelled by {_actor(str(data['by']))}{reason}"
    else:
        return
    row.steps.append(Step(entry.at, text))


def _delivery_text(data: dict[str, Any]) -> str:
    """A webhook delivery attempt, in words."""
    what = f"webhook for {data.get('trigger_type')} (try {data.get('delivery_attempt')})"
    outcome = data.get("outcome")
    why = data.get("error") or (
        f"status {data['status_code']}" if data.get("status_code") is not None else ""
    )
    if outcome == "delivered":
        return f"{what} delivered (status {data.get('status_code')})"
    if outcome == "gave-up":
        return f"{what} failed, given up: {why}"
    return f"{what} failed: {why}; tried again later"


def build(
    entries: Sequence[HistoryEntry], attempts: Sequence[AttemptState], now: datetime
) -> Timeline:
    """The timeline of a task whose events are `entries` (in order) and whose attempts
    are then `attempts` (the ledger's state at the last of them: their times, deadlines
    and outcomes, so a deadline a TTL change moved is drawn where it is), as seen at
    `now`: what has not ended by then is drawn up to then. The events say who did each
    step."""
    rows = {
        a.number: AttemptRow(
            number=a.number,
            reason=a.reason,
            scheduled_at=a.scheduled_at,
            not_before=a.not_before,
            deadline=a.deadline,
            started_at=a.started_at,
            worker_id=a.worker_id,
            finished_at=a.finished_at,
            outcome=a.outcome,
        )
        for a in attempts
    }
    before: list[Step] = []
    current: AttemptRow | None = None
    for entry in entries:
        if entry.type == "TaskSubmitted":
            before.append(Step(entry.at, f"submitted by {_actor(str(entry.data['submitted_by']))}"))
            continue
        if entry.type == "TaskUpdated":
            changed = ", ".join(sorted(entry.data.get("changes", {})))
            step = Step(entry.at, f"{changed} changed by {_actor(str(entry.data['by']))}")
            (current.steps if current is not None else before).append(step)
            continue
        if entry.type == "WebhookAttempted":
            step = Step(entry.at, _delivery_text(entry.data))
            (current.steps if current is not None else before).append(step)
            continue
        number = entry.data.get("attempt")
        row = rows.get(number) if isinstance(number, int) else None
        if row is not None:
            _attempt_step(row, entry)
            current = row
    ordered = sorted(rows.values(), key=lambda r: r.number)
    if ordered:
        ordered[0].steps[:0] = before
        before = []
    start = entries[0].at if entries else now
    last = entries[-1].at if entries else now
    end = max(now if any(r.finished_at is None for r in ordered) else last, last)
    if end <= start:
        end = start + timedelta(seconds=1)
    span = (end - start).total_seconds()
    plot = WIDTH - LABEL_WIDTH - RIGHT_MARGIN

    def x(at: datetime) -> float:
        return LABEL_WIDTH + plot * min(max((at - start).total_seconds() / span, 0.0), 1.0)

    for index, row in enumerate(ordered):
        row.y = TOP + index * ROW_HEIGHT
        row.segments = [
            Segment(s.kind, s.start, s.end, s.ongoing, s.label, x(s.start), x(s.end) - x(s.start))
            for s in _segments(row, end)
        ]
        row.deadline_x = x(row.deadline) if row.deadline <= end else None
    ticks = [
        Tick(x(start), start, "start"),
        Tick(x(start + (end - start) / 2), start + (end - start) / 2, "middle"),
        Tick(x(end), end, "end"),
    ]
    height = TOP + max(len(ordered), 1) * ROW_HEIGHT + AXIS_HEIGHT
    return Timeline(start, end, ordered, before, ticks, height)


def _segments(row: AttemptRow, end: datetime) -> list[Segment]:
    segments = []
    stop = row.finished_at or end
    backoff_end = min(row.not_before, row.started_at or stop, stop)
    if backoff_end > row.scheduled_at:
        ongoing = row.finished_at is None and row.started_at is None and end < row.not_before
        segments.append(Segment("backoff", row.scheduled_at, backoff_end, ongoing, "backoff"))
    queued_from = max(row.scheduled_at, row.not_before)
    queued_to = row.started_at or stop
    if queued_to > queued_from:
        ongoing = row.started_at is None and row.finished_at is None
        segments.append(Segment("queued", queued_from, queued_to, ongoing, "queued"))
    if row.started_at is not None:
        segments.append(
            Segment(
                "running",
                row.started_at,
                stop,
                row.finished_at is None,
                f"running on {row.worker_id}",
            )
        )
    return segments
