"""What the comparison with Celery measures, the goals of issue 18, and its table: per
metric the median over the rounds and its range for each system, the ratio
taskledger/Celery, the goal and whether it is met.

Every goal is a ratio to another figure of the same run, because this machine's speed
varies 2-3x between runs: Celery's figure of the same metric, a baseline of the machine
measured beside it (a bare `mono hello.exe`, a bare `python3 -I -S -c pass`), or another
of taskledger's own figures (its round trip p50). The verdict is the median over the
rounds of the ratio within each round, each round's figures being measured minutes
apart at most."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.report import markdown_table, median, over_rounds

TASKLEDGER = "taskledger"
CELERY = "Celery"


@dataclass(frozen=True)
class Goal:
    """taskledger's figure at most (at least, with `at_least`) `bound` times a reference
    figure of the same run: metric `reference` (this metric's key when empty) of system
    `of`; `against` names the reference in the table's goal column."""

    bound: float
    against: str
    reference: str = ""
    of: str = CELERY
    at_least: bool = False

    def text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}x {self.against}"

    def ratios(self, key: str, record: Record) -> list[float]:
        """Per round with both figures, taskledger's figure of `key` / the reference."""
        ours = record.values.get(key, {}).get(TASKLEDGER, {})
        theirs = record.values.get(self.reference or key, {}).get(self.of, {})
        return [ours[r] / theirs[r] for r in sorted(ours) if theirs.get(r)]

    def verdict(self, key: str, record: Record) -> str:
        """'yes (xR)' or 'NO: xR, …' for R the median of the rounds' ratios; else why
        there is none."""
        if not record.get(key, TASKLEDGER):
            return "no figure"
        ratios = self.ratios(key, record)
        if not ratios:
            return f"no figure of the reference ({self.against}) in the same round"
        ratio = statistics.median(ratios)
        met = ratio >= self.bound if self.at_least else ratio <= self.bound
        if met:
            return f"yes (x{ratio:.2f})"
        if not self.at_least:
            return f"NO: x{ratio:.2f}, {ratio / self.bound:.2f}x over"
        return f"NO: x{ratio:.2f}" + (f", needs {self.bound / ratio:.2f}x more" if ratio else "")


def celerys(bound: float, at_least: bool = False) -> Goal:
    """A bound relative to Celery's figure of the same metric."""
    return Goal(bound, "Celery" if at_least else "Celery's", at_least=at_least)


def own(bound: float, reference: str, against: str) -> Goal:
    """A bound relative to another of taskledger's figures (or a shared baseline)."""
    return Goal(bound, against, reference, of=TASKLEDGER)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    goal: Goal | None = None
    celery_na: str | None = None  # why Celery has no figure here
    shared: bool = False  # one figure for both columns (a baseline of the machine)

    @property
    def scenario(self) -> str:
        return SCENARIO_LABELS[self.key.split(".")[0]]

    @property
    def digits(self) -> int | None:
        return 0 if "/s" in self.label else None


SCENARIO_LABELS = {
    "noop": "1. no-op",
    "rtt": "2. round trip",
    "python": "3. python",
    "csharp": "4. C#",
    "ttl": "5. TTL",
}
NO_START = "n/a: records no start"
REAPER = "n/a: nothing expires without a worker"
NONE = "all at once, no worker (reaper):"
LAG = "live view lag,"
RTT = "round trip p50"  # taskledger's, the reference of the live lag and the reaper
METRICS = [
    Metric("noop.rate", "throughput, tasks/s", celerys(2, at_least=True)),
    Metric("noop.submit_rate", "submit rate of the client, tasks/s"),
    Metric("noop.cpu_ms", "CPU per task, ms (all cores, see below)", celerys(0.5)),
    Metric("noop.lag_task_status_p50", f"{LAG} task_status p50, ms", celery_na="n/a: no views"),
    Metric(
        "noop.lag_task_status_p99",
        f"{LAG} task_status p99, ms",
        own(1, "rtt.p50", RTT),
        "n/a: no views",
    ),
    Metric(
        "noop.lag_audit_p99", f"{LAG} audit p99, ms", own(1, "rtt.p50", RTT), "n/a: no audit trail"
    ),
    Metric("rtt.p50", "p50, ms", celerys(1)),
    Metric("rtt.p90", "p90, ms"),
    Metric("rtt.p99", "p99, ms"),
    Metric("python.bare_p50", "bare `python3 -I -S -c pass` p50, ms (baseline)", shared=True),
    Metric("python.rate", "throughput, tasks/s"),
    Metric("python.cpu_ms", "CPU per task, ms (all cores, see below)"),
    Metric("python.run_p50", "program run p50, ms (executor's measure)"),
    Metric(
        "python.overhead_p50",
        "overhead p50: run - program's own time, ms",
        own(0.5, "python.bare_p50", "bare python3"),
    ),
    Metric("python.worker_p50", "on the worker p50: Started..Completed, ms", celery_na=NO_START),
    Metric("csharp.bare_p50", "bare `mono hello.exe` p50, ms (baseline)", shared=True),
    Metric("csharp.warm_rtt_p50", "cached: round trip p50, ms"),
    Metric(
        "csharp.warm_worker_p50",
        "cached: on the worker p50, ms",
        own(1.3, "csharp.bare_p50", "bare mono"),
    ),
    Metric("csharp.warm_run_p50", "cached: mono process p50, ms"),
    Metric("csharp.cold_rtt_p50", "compiled first: round trip p50, ms"),
    Metric("csharp.cold_worker_p50", "compiled first: on the worker p50, ms"),
    Metric("ttl.worker_p50", "on a worker: lateness p50, ms"),
    Metric("ttl.worker_p99", "on a worker: lateness p99, ms"),
    Metric("ttl.worker_max", "on a worker: lateness max, ms"),
    Metric("ttl.reaper_p50", f"{NONE} p50, ms", celery_na=REAPER),
    Metric("ttl.reaper_p99", f"{NONE} p99, ms", own(5, "rtt.p50", RTT), celery_na=REAPER),
    Metric("ttl.reaper_max", f"{NONE} max, ms", celery_na=REAPER),
]


@dataclass
class Record:
    """Every figure of the run: key -> system -> one value per round."""

    rounds: int
    values: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def put(self, key: str, system: str, round_: int, value: float | None) -> None:
        if value is not None and value == value:  # not NaN
            self.values.setdefault(key, {}).setdefault(system, {})[round_] = value

    def get(self, key: str, system: str) -> list[float]:
        return list(self.values.get(key, {}).get(system, {}).values())

    def medians(self, prefix: str, system: str) -> dict[str, float]:
        """Per key under `prefix` (its rest), the median over the rounds."""
        return {
            key.removeprefix(prefix): statistics.median(by[system].values())
            for key, by in self.values.items()
            if key.startswith(prefix) and by.get(system)
        }


def judge(metric: Metric, record: Record) -> str:
    return metric.goal.verdict(metric.key, record) if metric.goal else ""


def table(record: Record, scenarios: Sequence[str]) -> tuple[str, list[list[str]]]:
    """The markdown table of the metrics of `scenarios`; and its rows."""
    rows = []
    for m in METRICS:
        if not m.key.startswith(tuple(f"{s}." for s in scenarios)):
            continue
        values = [record.get(m.key, system) for system in (TASKLEDGER, CELERY)]
        tl, celery = median(values[0]), median(values[1])
        failed = f"FAILED (all {record.rounds} rounds)"
        cells = [over_rounds(v, m.digits) if v else failed for v in values]
        ratio = f"{tl / celery:.2f}" if tl is not None and celery and not m.shared else "-"
        goal, met = (m.goal.text() if m.goal else ""), judge(m, record)
        rows.append([m.scenario, m.label, cells[0], m.celery_na or cells[1], ratio, goal, met])
    headers = ["scenario", "metric", "taskledger", "Celery", "taskledger/Celery", "goal", "met?"]
    return markdown_table(headers, rows), rows
