"""What the comparison with Celery measures, the goals of issue 7, and its table: per
metric the median over the rounds and its range for each system, the ratio
taskledger/Celery, the goal and whether the median meets it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.report import markdown_table, median, over_rounds

TASKLEDGER = "taskledger"
CELERY = "Celery"


@dataclass(frozen=True)
class Goal:
    kind: str  # "ratio_min", "ratio_max" (taskledger/Celery), "max", "baseline_max"
    bound: float
    baseline: str = ""  # metric key of the baseline for "baseline_max"

    def text(self) -> str:
        return {
            "ratio_min": f">= {self.bound:g}x Celery",
            "ratio_max": f"<= {self.bound:g}x Celery",
            "baseline_max": f"<= {self.bound:g}x bare mono",
            "max": f"<= {self.bound:,g} ms",
        }[self.kind]


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
METRICS = [
    Metric("noop.rate", "throughput, tasks/s", Goal("ratio_min", 3)),
    Metric("noop.submit_rate", "submit rate of the client, tasks/s"),
    Metric("noop.cpu_ms", "CPU per task, ms (all cores, see below)"),
    Metric("noop.lag_task_status_p50", f"{LAG} task_status p50, ms", celery_na="n/a: no views"),
    Metric(
        "noop.lag_task_status_p99", f"{LAG} task_status p99, ms", Goal("max", 50), "n/a: no views"
    ),
    Metric("noop.lag_audit_p99", f"{LAG} audit p99, ms", Goal("max", 50), "n/a: no audit trail"),
    Metric("rtt.p50", "p50, ms", Goal("ratio_max", 0.5)),
    Metric("rtt.p90", "p90, ms"),
    Metric("rtt.p99", "p99, ms"),
    Metric("python.bare_p50", "bare `python3 -I -S -c pass` p50, ms (baseline)", shared=True),
    Metric("python.rate", "throughput, tasks/s"),
    Metric("python.cpu_ms", "CPU per task, ms (all cores, see below)"),
    Metric("python.run_p50", "program run p50, ms (executor's measure)"),
    Metric("python.overhead_p50", "overhead p50: run - program's own time, ms", Goal("max", 4)),
    Metric("python.worker_p50", "on the worker p50: Started..Completed, ms", celery_na=NO_START),
    Metric("csharp.bare_p50", "bare `mono hello.exe` p50, ms (baseline)", shared=True),
    Metric("csharp.warm_rtt_p50", "cached: round trip p50, ms"),
    Metric(
        "csharp.warm_worker_p50",
        "cached: on the worker p50, ms",
        Goal("baseline_max", 1.3, baseline="csharp.bare_p50"),
    ),
    Metric("csharp.warm_run_p50", "cached: mono process p50, ms"),
    Metric("csharp.cold_rtt_p50", "compiled first: round trip p50, ms"),
    Metric("csharp.cold_worker_p50", "compiled first: on the worker p50, ms"),
    Metric("ttl.worker_p50", "on a worker: lateness p50, ms"),
    Metric("ttl.worker_p99", "on a worker: lateness p99, ms", Goal("max", 50)),
    Metric("ttl.worker_max", "on a worker: lateness max, ms"),
    Metric("ttl.reaper_p50", f"{NONE} p50, ms", celery_na=REAPER),
    Metric("ttl.reaper_p99", f"{NONE} p99, ms", Goal("max", 250), celery_na=REAPER),
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


def judge(metric: Metric, tl: float | None, celery: float | None, record: Record) -> str:
    goal = metric.goal
    if goal is None:
        return ""
    if tl is None:
        return "no figure"
    if goal.kind in ("ratio_min", "ratio_max"):
        if not celery:
            return "no Celery figure"
        ratio = tl / celery
        if goal.kind == "ratio_min":
            more = f"NO: x{ratio:.2f}, needs {goal.bound / ratio:.2f}x more"
            return "yes" if ratio >= goal.bound else more
        slower = f"NO: x{ratio:.2f}, {ratio / goal.bound:.2f}x too slow"
        return "yes" if ratio <= goal.bound else slower
    if goal.kind == "baseline_max":
        base = median(record.get(goal.baseline, TASKLEDGER))
        if not base:
            return "no baseline"
        ratio = tl / base
        return f"yes (x{ratio:.2f})" if ratio <= goal.bound else f"NO: x{ratio:.2f} of bare mono"
    return "yes" if tl <= goal.bound else f"NO: {tl / goal.bound:.2f}x the bound"


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
        goal, met = (m.goal.text() if m.goal else ""), judge(m, tl, celery, record)
        rows.append([m.scenario, m.label, cells[0], m.celery_na or cells[1], ratio, goal, met])
    headers = ["scenario", "metric", "taskledger", "Celery", "taskledger/Celery", "goal", "met?"]
    return markdown_table(headers, rows), rows
