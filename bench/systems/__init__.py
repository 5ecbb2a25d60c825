"""The systems the comparison runs, behind one small interface: each starts its own
processes with fresh state of its own, runs one scenario per call and returns raw
figures; bench/compare.py alternates, summarises and judges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

NOOP_CODE = "print(sum(range(1000)))"  # scenario 3's program (both systems)
LOOP_CODE = "while True:\n    pass\n"  # scenario 5's program


@dataclass
class Batch:
    """Tasks submitted as fast as the client can, then waited for until all ended."""

    tasks: int  # submitted
    completed: int  # ended as expected (Completed / SUCCESS)
    submit_s: float  # first submit sent .. last submit answered
    total_s: float  # first submit sent .. the last task's end as the system recorded it
    run_ms: list[float] = field(default_factory=list)  # per task: the program's run
    worker_ms: list[float] = field(default_factory=list)  # per task: start .. end on the worker
    lag_ms: dict[str, list[float]] = field(default_factory=dict)  # projection -> live lags
    lag_resolution_ms: float | None = None  # median gap between the lag monitor's samples
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.completed / self.total_s if self.total_s > 0 else 0.0


@dataclass
class RoundTrip:
    """One submit-and-wait, with what the system recorded about the run."""

    rtt_ms: float  # submit sent .. terminal state received by the client
    ok: bool
    task_id: str = ""
    run_ms: float | None = None  # the program's process (the executor's own measure)
    worker_ms: float | None = None  # start .. end of the task on the worker
    legs_ms: dict[str, float] = field(default_factory=dict)  # where the time went, if known


@dataclass
class Expiry:
    """One task past its time limit: how late the system recorded its end."""

    lateness_ms: float | None  # recorded end - deadline (None: it did not expire)
    status: str


class System(Protocol):
    name: str
    database_url: str  # the database this system writes to

    def processes(self) -> dict[str, int]: ...  # role -> pid, each counted with its children
    def start(self) -> None: ...  # returns once a first task has made the round trip
    def ensure_running(self) -> list[str]: ...  # restarts what died; what it restarted
    def close(self) -> None: ...
    def facts(self) -> dict[str, Any]: ...  # how it runs (processes, versions), for the report
    def noop_batch(self, tasks: int) -> Batch: ...
    def live_lag(self, tasks: int, batch: Batch) -> None: ...  # the load again, watched
    def round_trips(self, count: int) -> list[RoundTrip]: ...
    def python_batch(self, tasks: int, code: str) -> Batch: ...
    def csharp_round_trips(self, sources: Sequence[str]) -> list[RoundTrip]: ...
    # Loops with a time limit, never more at once than the worker runs: each is running
    # on a worker when its limit passes.
    def expire_on_worker(self, tasks: int, ttl_seconds: float) -> list[Expiry]: ...
