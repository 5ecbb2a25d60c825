"""taskledger against Celery, in the same run, on this machine.

Both systems are started as their users run them, against the local PostgreSQL and
RabbitMQ, each with fresh state of its own (a new database each, a queue namespace each):

- taskledger: ``taskledger api`` (API + dispatcher + reaper + projections) and one
  ``taskledger worker --concurrency N`` (``--concurrency``, default 2); every task goes
  through the HTTP API (raw asyncio client, ``--connections`` keep-alive connections);
- Celery (``bench/celery_app.py``): one ``celery worker --pool prefork --concurrency 2``,
  RabbitMQ broker, PostgreSQL result backend (``db+postgresql+psycopg://``),
  ``task_acks_late=True``; tasks sent with ``.delay()`` from this process.

``--rounds`` rounds (default 3); in each, every scenario runs for both systems, in turn,
the order alternating between rounds. The table gives, per metric, the median over the
rounds and their range, the ratio taskledger/Celery of the medians, the goal of issue 7
and whether the median meets it. Scenarios (``--scenarios``; sizes are options):

1. ``noop``: 5,000 no-op tasks submitted as fast as the client can; tasks/s from the first
   submit to the last task's end as the system recorded it (taskledger: the newest
   ``finished_at``; Celery: the newest ``date_done``). taskledger's live projection lag
   is measured meanwhile by ``bench.lag_monitor`` (a separate process).
2. ``rtt``: 200 sequential submit-and-wait round trips of the same no-op; p50/p90/p99.
3. ``python``: 1,000 tasks ``print(sum(range(1000)))``, taskledger's sandboxed executor vs a
   Celery task running ``subprocess.run([sys.executable, "-I", "-c", code])``; tasks/s, the
   program's run per task (each system's own measure) and the overhead beyond the
   program's own run time (measured in this process with timeit).
4. ``csharp``: 100 round trips of one small program (assembly cached) and 10 distinct
   programs (compiled first); the bare ``mono hello.exe`` of the same program is timed in
   the same round as the baseline.
5. ``ttl``: tasks that loop forever with a 1 s limit: lateness of the recorded end after
   the deadline. Running on a worker (both systems, ``--ttl-on-worker`` tasks, never more
   at once than the worker runs), then taskledger only: ``--ttl-tasks`` submitted at once
   with the worker running, and again with the worker stopped (the reaper alone).
6. ``projections``: rebuild of each view over 100,000 events (taskledger only; Celery keeps
   no event history to rebuild from).

Everything is stopped at the end, also on failure, Ctrl-C or SIGTERM; a scenario that
fails is reported in the table and the run goes on. ``--quick`` runs small sizes, one
round (a check of the harness, not a measurement).

Run: ``.venv/bin/python -m bench`` (or ``-m bench --only compare [--quick] [--rounds N]``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench._support import (
    benchmark_parser,
    eprint,
    machine_facts,
    markdown_table,
    percentile,
    temporary_database,
    write_results,
)
from bench.cpu import CpuMeter
from bench.systems import NOOP_CODE, Batch, Expiry, RoundTrip, System

NAME = "compare"
SUMMARY = "taskledger against Celery in the same run: throughput, latency, code, TTL, views"

SCENARIOS = ("noop", "rtt", "python", "csharp", "ttl", "projections")
TASKLEDGER = "taskledger"
CELERY = "Celery"
BASELINE = "baseline"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
TTL_SECONDS = 1.0

HELLO_CS = 'class Hello { static void Main() { System.Console.WriteLine("hello"); } }\n'


def distinct_cs(token: str, n: int) -> str:
    return (
        f"class Hello{n} {{ static void Main() {{"
        f' System.Console.WriteLine("hello {token} {n}"); }} }}\n'
    )


@dataclass(frozen=True)
class Sizes:
    noop_tasks: int = 5_000
    round_trips: int = 200
    python_tasks: int = 1_000
    csharp_warm: int = 100
    csharp_cold: int = 10
    mono_runs: int = 20
    ttl_tasks: int = 200
    ttl_on_worker: int = 20
    rebuild_events: int = 100_000


QUICK = Sizes(
    noop_tasks=300,
    round_trips=30,
    python_tasks=100,
    csharp_warm=10,
    csharp_cold=2,
    mono_runs=10,
    ttl_tasks=40,
    ttl_on_worker=4,
    rebuild_events=20_000,
)


# -- what is measured, and the goals -------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    kind: str  # "ratio_min", "ratio_max" (taskledger/Celery), "max", "min", "baseline_max"
    bound: float
    unit: str = ""
    baseline: str = ""  # metric key of the baseline for "baseline_max"

    def text(self) -> str:
        if self.kind == "ratio_min":
            return f">= {self.bound:g}x Celery"
        if self.kind == "ratio_max":
            return f"<= {self.bound:g}x Celery"
        if self.kind == "baseline_max":
            return f"<= {self.bound:g}x bare mono"
        sign = "<=" if self.kind == "max" else ">="
        return f"{sign} {self.bound:,g}{self.unit}"


@dataclass(frozen=True)
class Metric:
    key: str
    scenario: str
    label: str
    unit: str  # "tasks/s", "ms", "events/s", "count"
    goal: Goal | None = None
    celery_na: str | None = None  # why Celery has no figure here
    shared: bool = False  # one figure for both columns (a baseline of the machine)


METRICS: list[Metric] = [
    Metric("noop.rate", "1. no-op", "throughput, tasks/s", "tasks/s", Goal("ratio_min", 3)),
    Metric("noop.submit_rate", "1. no-op", "submit rate of the client, tasks/s", "tasks/s"),
    Metric("noop.cpu_ms", "1. no-op", "CPU per task, ms (all cores, see below)", "ms"),
    Metric("rtt.p50", "2. round trip", "p50, ms", "ms", Goal("ratio_max", 0.5)),
    Metric("rtt.p90", "2. round trip", "p90, ms", "ms"),
    Metric("rtt.p99", "2. round trip", "p99, ms", "ms"),
    Metric("python.rate", "3. python", "throughput, tasks/s", "tasks/s"),
    Metric("python.cpu_ms", "3. python", "CPU per task, ms (all cores, see below)", "ms"),
    Metric("python.run_p50", "3. python", "program run p50, ms (executor's measure)", "ms"),
    Metric(
        "python.overhead_p50",
        "3. python",
        "overhead p50: run - program's own time, ms",
        "ms",
        Goal("max", 4, " ms"),
    ),
    Metric(
        "python.worker_p50",
        "3. python",
        "on the worker p50: Started..Completed, ms",
        "ms",
        celery_na="n/a: records no start",
    ),
    Metric(
        "csharp.bare_p50", "4. C#", "bare `mono hello.exe` p50, ms (baseline)", "ms", shared=True
    ),
    Metric("csharp.warm_rtt_p50", "4. C#", "cached: round trip p50, ms", "ms"),
    Metric(
        "csharp.warm_worker_p50",
        "4. C#",
        "cached: on the worker p50, ms",
        "ms",
        Goal("baseline_max", 1.3, baseline="csharp.bare_p50"),
    ),
    Metric("csharp.warm_run_p50", "4. C#", "cached: mono process p50, ms", "ms"),
    Metric("csharp.cold_rtt_p50", "4. C#", "compiled first: round trip p50, ms", "ms"),
    Metric("csharp.cold_worker_p50", "4. C#", "compiled first: on the worker p50, ms", "ms"),
    Metric("ttl.worker_p50", "5. TTL", "on a worker: lateness p50, ms", "ms"),
    Metric(
        "ttl.worker_p99", "5. TTL", "on a worker: lateness p99, ms", "ms", Goal("max", 50, " ms")
    ),
    Metric("ttl.worker_max", "5. TTL", "on a worker: lateness max, ms", "ms"),
    Metric(
        "ttl.burst_p50",
        "5. TTL",
        "all at once, worker running: p50, ms",
        "ms",
        celery_na="n/a: no deadline while queued",
    ),
    Metric(
        "ttl.burst_p99",
        "5. TTL",
        "all at once, worker running: p99, ms",
        "ms",
        celery_na="n/a: no deadline while queued",
    ),
    Metric(
        "ttl.burst_by_worker",
        "5. TTL",
        "all at once, worker running: expired by the worker",
        "count",
        celery_na="n/a",
    ),
    Metric(
        "ttl.reaper_p50",
        "5. TTL",
        "all at once, no worker (reaper): p50, ms",
        "ms",
        celery_na="n/a: nothing expires without a worker",
    ),
    Metric(
        "ttl.reaper_p99",
        "5. TTL",
        "all at once, no worker (reaper): p99, ms",
        "ms",
        Goal("max", 250, " ms"),
        celery_na="n/a: nothing expires without a worker",
    ),
    Metric(
        "ttl.reaper_max",
        "5. TTL",
        "all at once, no worker (reaper): max, ms",
        "ms",
        celery_na="n/a: nothing expires without a worker",
    ),
    Metric(
        "rebuild.task_status",
        "6. projections",
        "rebuild task_status, events/s",
        "events/s",
        Goal("min", 20_000),
        celery_na="n/a: no event history",
    ),
    Metric(
        "rebuild.audit",
        "6. projections",
        "rebuild audit, events/s",
        "events/s",
        Goal("min", 20_000),
        celery_na="n/a: no event history",
    ),
    Metric(
        "lag.task_status_p50",
        "6. projections",
        "live lag under 1.'s load, task_status p50, ms",
        "ms",
        celery_na="n/a: no views",
    ),
    Metric(
        "lag.task_status_p99",
        "6. projections",
        "live lag under 1.'s load, task_status p99, ms",
        "ms",
        Goal("max", 50, " ms"),
        celery_na="n/a: no views",
    ),
    Metric(
        "lag.audit_p99",
        "6. projections",
        "live lag under 1.'s load, audit p99, ms",
        "ms",
        Goal("max", 50, " ms"),
        celery_na="n/a: no audit trail",
    ),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}


# -- the record of a run -------------------------------------------------------------------


@dataclass
class Failure:
    round: int
    scenario: str
    system: str
    error: str


@dataclass
class Record:
    rounds: int
    values: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    raw: list[dict[str, Any]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def put(self, key: str, system: str, round_: int, value: float | None) -> None:
        if value is None or math.isnan(value):
            return
        self.values.setdefault(key, {}).setdefault(system, {})[round_] = value

    def get(self, key: str, system: str) -> list[float]:
        return list(self.values.get(key, {}).get(system, {}).values())

    def keep(self, round_: int, scenario: str, system: str, **figures: Any) -> None:
        self.raw.append({"round": round_, "scenario": scenario, "system": system, **figures})


def p(values: Sequence[float], fraction: float) -> float | None:
    return percentile(sorted(values), fraction) if values else None


def _lateness(expiries: Sequence[Expiry]) -> list[float]:
    return [e.lateness_ms for e in expiries if e.lateness_ms is not None]


# -- the scenarios -------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    record: Record
    systems: dict[str, System]
    workdir: Path
    progress: Callable[[str], None]
    own_python_ms: float = 0.0
    hello_exe: Path | None = None
    mono_problem: str | None = None
    rebuild_url: str | None = None
    rebuild_events: int = 0

    def order(self, round_: int) -> list[System]:
        systems = list(self.systems.values())
        return systems if round_ % 2 == 1 else systems[::-1]

    @contextlib.contextmanager
    def cpu(self, system: System) -> Iterator[dict[str, float]]:
        """CPU seconds per consumer while the block runs (filled in at its end)."""
        meter = CpuMeter(system.processes(), system.database_url)
        spent: dict[str, float] = {}
        before = meter.mark()
        yield spent
        spent.update(CpuMeter.spent(before, meter.mark()))

    @contextlib.contextmanager
    def attempt(self, round_: int, scenario: str, system: str) -> Iterator[None]:
        """Record a failure of the block and go on; restart what died."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 -- reported in the table, the run goes on
            text = f"{type(error).__name__}: {error}"
            self.record.failures.append(Failure(round_, scenario, system, text))
            self.progress(f"  FAILED round {round_} {scenario} {system}: {text}")
            self.progress("".join(traceback.format_exception(error, limit=-3)).rstrip())
            restart = self.systems.get(system)
            if restart is not None:
                try:
                    restarted = restart.ensure_running()
                    if restarted:
                        self.progress(f"  restarted {system}: {', '.join(restarted)}")
                except Exception as again:  # noqa: BLE001 -- the next scenario reports it
                    self.progress(f"  could not restart {system}: {again!r}")


def scenario_noop(ctx: Context, round_: int) -> None:
    n = ctx.sizes.noop_tasks
    for system in ctx.order(round_):
        with ctx.attempt(round_, "noop", system.name):
            with ctx.cpu(system) as cpu:
                batch = system.noop_batch(n)
            system.live_lag(n, batch)
            ctx.record.put("noop.cpu_ms", system.name, round_, 1000 * sum(cpu.values()) / n)
            ctx.record.put("noop.rate", system.name, round_, batch.rate)
            ctx.record.put("noop.submit_rate", system.name, round_, n / batch.submit_s)
            lag = ""
            for name, values in batch.lag_ms.items():
                ctx.record.put(f"lag.{name}_p50", system.name, round_, p(values, 0.5))
                ctx.record.put(f"lag.{name}_p99", system.name, round_, p(values, 0.99))
                lag += f"; lag {name} p50 {_f(p(values, 0.5))} p99 {_f(p(values, 0.99))} ms"
            if batch.lag_resolution_ms is not None:
                lag += f" (monitor resolution {_f(batch.lag_resolution_ms)} ms)"
            ctx.record.keep(
                round_,
                "noop",
                system.name,
                **_batch_figures(batch),
                lag_p50_ms={k: p(v, 0.5) for k, v in batch.lag_ms.items()},
                lag_p99_ms={k: p(v, 0.99) for k, v in batch.lag_ms.items()},
                lag_max_ms={k: max(v, default=None) for k, v in batch.lag_ms.items()},
                lag_heads={k: len(v) for k, v in batch.lag_ms.items()},
                lag_resolution_ms=batch.lag_resolution_ms,
                cpu_s=_rounded(cpu),
            )
            _check_batch(ctx, round_, "noop", system.name, batch)
            ctx.progress(
                f"  round {round_} noop {system.name}: {batch.rate:,.0f} tasks/s"
                f" ({batch.completed:,}/{batch.tasks:,} in {batch.total_s:.2f} s;"
                f" submitted at {n / batch.submit_s:,.0f}/s){lag}; CPU {_cpu_text(cpu, n)}"
            )


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


def _cpu_text(cpu: dict[str, float], tasks: int) -> str:
    total = sum(cpu.values())
    parts = ", ".join(f"{k} {1000 * v / tasks:.2f}" for k, v in cpu.items())
    return f"{1000 * total / tasks:.2f} ms/task ({parts})"


def _batch_figures(batch: Batch) -> dict[str, Any]:
    return {
        "tasks": batch.tasks,
        "completed": batch.completed,
        "submit_s": round(batch.submit_s, 4),
        "total_s": round(batch.total_s, 4),
        "observed_s": round(batch.observed_s, 4),
        "tasks_per_s": round(batch.rate, 2),
        "notes": batch.notes,
    }


def _check_batch(ctx: Context, round_: int, scenario: str, system: str, batch: Batch) -> None:
    if batch.completed != batch.tasks:
        ctx.record.failures.append(
            Failure(
                round_,
                scenario,
                system,
                f"only {batch.completed} of {batch.tasks} tasks completed ({batch.notes})",
            )
        )


def scenario_rtt(ctx: Context, round_: int) -> None:
    for system in ctx.order(round_):
        with ctx.attempt(round_, "rtt", system.name):
            trips = system.round_trips(ctx.sizes.round_trips)
            rtts = [t.rtt_ms for t in trips]
            for q in (50, 90, 99):
                ctx.record.put(f"rtt.p{q}", system.name, round_, p(rtts, q / 100))
            bad = sum(1 for t in trips if not t.ok)
            if bad:
                ctx.record.failures.append(
                    Failure(round_, "rtt", system.name, f"{bad} round trips did not complete")
                )
            legs = _legs(trips)
            ctx.record.keep(
                round_, "rtt", system.name, rtt_ms=[round(v, 3) for v in rtts], legs_p50_ms=legs
            )
            ctx.progress(
                f"  round {round_} rtt {system.name}: p50 {_f(p(rtts, 0.5))} ms,"
                f" p90 {_f(p(rtts, 0.9))} ms, p99 {_f(p(rtts, 0.99))} ms"
                + (f"; legs p50: {_legs_text(legs)}" if legs else "")
            )


def _legs(trips: Sequence[RoundTrip]) -> dict[str, float]:
    """The p50 of each leg of the round trips that report them (in order)."""
    names: list[str] = []
    for trip in trips:
        names += [n for n in trip.legs_ms if n not in names]
    result = {}
    for name in names:
        value = p([t.legs_ms[name] for t in trips if name in t.legs_ms], 0.5)
        if value is not None:
            result[name] = round(value, 3)
    return result


def _legs_text(legs: dict[str, float]) -> str:
    return ", ".join(f"{name} {_f(value)} ms" for name, value in legs.items())


def scenario_python(ctx: Context, round_: int) -> None:
    for system in ctx.order(round_):
        with ctx.attempt(round_, "python", system.name):
            n = ctx.sizes.python_tasks
            with ctx.cpu(system) as cpu:
                batch = system.python_batch(n, NOOP_CODE)
            ctx.record.put("python.cpu_ms", system.name, round_, 1000 * sum(cpu.values()) / n)
            overhead = [v - ctx.own_python_ms for v in batch.run_ms]
            ctx.record.put("python.rate", system.name, round_, batch.rate)
            ctx.record.put("python.run_p50", system.name, round_, p(batch.run_ms, 0.5))
            ctx.record.put("python.overhead_p50", system.name, round_, p(overhead, 0.5))
            ctx.record.put("python.worker_p50", system.name, round_, p(batch.worker_ms, 0.5))
            ctx.record.keep(
                round_,
                "python",
                system.name,
                **_batch_figures(batch),
                run_ms=[round(v, 3) for v in batch.run_ms],
                worker_ms=[round(v, 3) for v in batch.worker_ms],
                cpu_s=_rounded(cpu),
            )
            _check_batch(ctx, round_, "python", system.name, batch)
            ctx.progress(
                f"  round {round_} python {system.name}: {batch.rate:,.0f} tasks/s, run p50"
                f" {_f(p(batch.run_ms, 0.5))} ms, overhead p50 {_f(p(overhead, 0.5))} ms"
                + (
                    f", on the worker p50 {_f(p(batch.worker_ms, 0.5))} ms"
                    if batch.worker_ms
                    else ""
                )
                + f"; CPU {_cpu_text(cpu, n)}"
            )


def bare_mono(exe: Path, runs: int) -> list[float]:
    """Wall time of `mono exe` started from this process, `runs` times (after 2 warm-ups)."""
    times = []
    for i in range(runs + 2):
        started = time.perf_counter()
        done = subprocess.run(["mono", str(exe)], capture_output=True, timeout=60, check=False)
        elapsed = (time.perf_counter() - started) * 1000
        if done.returncode != 0:
            raise RuntimeError(f"mono {exe} exited {done.returncode}: {done.stderr[-500:]!r}")
        if i >= 2:
            times.append(elapsed)
    return times


def _compile_hello(workdir: Path) -> Path:
    source = workdir / "hello.cs"
    source.write_text(HELLO_CS)
    exe = workdir / "hello.exe"
    done = subprocess.run(
        ["mcs", f"-out:{exe}", str(source)], capture_output=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"mcs hello.cs failed: {done.stdout[-500:]!r}")
    return exe


def scenario_csharp(ctx: Context, round_: int) -> None:
    if ctx.mono_problem is not None or ctx.hello_exe is None:
        ctx.record.failures.append(
            Failure(round_, "csharp", "both", f"SKIPPED: {ctx.mono_problem}")
        )
        return
    with ctx.attempt(round_, "csharp", BASELINE):
        bare = bare_mono(ctx.hello_exe, ctx.sizes.mono_runs)
        for name in (TASKLEDGER, CELERY):
            ctx.record.put("csharp.bare_p50", name, round_, p(bare, 0.5))
        ctx.record.keep(round_, "csharp", BASELINE, bare_mono_ms=[round(v, 3) for v in bare])
        ctx.progress(f"  round {round_} bare mono hello.exe: p50 {_f(p(bare, 0.5))} ms")
    token = secrets.token_hex(4)
    for system in ctx.order(round_):
        with ctx.attempt(round_, "csharp", system.name):
            system.csharp_round_trips([HELLO_CS])  # the cache holds it from now on
            warm = system.csharp_round_trips([HELLO_CS] * ctx.sizes.csharp_warm)
            cold = system.csharp_round_trips(
                [distinct_cs(f"{token}{system.name}", n) for n in range(ctx.sizes.csharp_cold)]
            )
            figures: dict[str, Any] = {}
            for kind, trips in (("warm", warm), ("cold", cold)):
                bad = sum(1 for t in trips if not t.ok)
                if bad:
                    ctx.record.failures.append(
                        Failure(
                            round_, "csharp", system.name, f"{bad} {kind} runs did not complete"
                        )
                    )
                rtt = [t.rtt_ms for t in trips]
                on_worker = [t.worker_ms for t in trips if t.worker_ms is not None]
                run = [t.run_ms for t in trips if t.run_ms is not None]
                ctx.record.put(f"csharp.{kind}_rtt_p50", system.name, round_, p(rtt, 0.5))
                ctx.record.put(f"csharp.{kind}_worker_p50", system.name, round_, p(on_worker, 0.5))
                if kind == "warm":
                    ctx.record.put("csharp.warm_run_p50", system.name, round_, p(run, 0.5))
                figures[kind] = {
                    "rtt_ms": [round(v, 3) for v in rtt],
                    "worker_ms": [round(v, 3) for v in on_worker],
                    "run_ms": [round(v, 3) for v in run],
                }
            ctx.record.keep(round_, "csharp", system.name, **figures)
            ctx.progress(
                f"  round {round_} csharp {system.name}: cached round trip p50"
                f" {_f(p([t.rtt_ms for t in warm], 0.5))} ms, on the worker p50"
                f" {_f(p([t.worker_ms for t in warm if t.worker_ms is not None], 0.5))} ms;"
                f" compiled first: round trip p50 {_f(p([t.rtt_ms for t in cold], 0.5))} ms"
            )


def _expiry_figures(expiries: Sequence[Expiry]) -> dict[str, Any]:
    by: dict[str, int] = {}
    for e in expiries:
        by[e.detected_by] = by.get(e.detected_by, 0) + 1
    return {
        "lateness_ms": [round(v, 3) for v in _lateness(expiries)],
        "detected_by": by,
        "statuses": sorted({e.status for e in expiries}),
    }


def _check_expiries(
    ctx: Context, round_: int, what: str, system: str, expiries: Sequence[Expiry], wanted: int
) -> None:
    expired = len(_lateness(expiries))
    if expired != wanted:
        statuses = sorted({e.status for e in expiries})
        ctx.record.failures.append(
            Failure(round_, "ttl", system, f"{what}: {expired} of {wanted} expired ({statuses})")
        )


def scenario_ttl(ctx: Context, round_: int) -> None:
    n = ctx.sizes.ttl_on_worker
    for system in ctx.order(round_):
        with ctx.attempt(round_, "ttl", system.name):
            expiries = system.expire_on_worker(n, TTL_SECONDS)
            late = _lateness(expiries)
            for q, key in ((0.5, "p50"), (0.99, "p99"), (1.0, "max")):
                ctx.record.put(f"ttl.worker_{key}", system.name, round_, p(late, q))
            ctx.record.keep(round_, "ttl_on_worker", system.name, **_expiry_figures(expiries))
            _check_expiries(ctx, round_, "on a worker", system.name, expiries, n)
            ctx.progress(
                f"  round {round_} ttl on a worker {system.name}: lateness p50 {_f(p(late, 0.5))}"
                f" ms, p99 {_f(p(late, 0.99))} ms, max {_f(p(late, 1.0))} ms ({len(late)} tasks)"
            )
    taskledger = ctx.systems.get(TASKLEDGER)
    if taskledger is None:
        return
    from bench.systems.taskledger import Taskledger

    assert isinstance(taskledger, Taskledger)
    for workers, key in ((True, "burst"), (False, "reaper")):
        with ctx.attempt(round_, f"ttl_{key}", TASKLEDGER):
            expiries = taskledger.expire_burst(ctx.sizes.ttl_tasks, TTL_SECONDS, workers=workers)
            late = _lateness(expiries)
            for q, name in ((0.5, "p50"), (0.99, "p99"), (1.0, "max")):
                ctx.record.put(f"ttl.{key}_{name}", TASKLEDGER, round_, p(late, q))
            by_worker = sum(1 for e in expiries if e.detected_by == "worker")
            if workers:
                ctx.record.put("ttl.burst_by_worker", TASKLEDGER, round_, by_worker)
            ctx.record.keep(round_, f"ttl_{key}", TASKLEDGER, **_expiry_figures(expiries))
            _check_expiries(ctx, round_, key, TASKLEDGER, expiries, ctx.sizes.ttl_tasks)
            ctx.progress(
                f"  round {round_} ttl {ctx.sizes.ttl_tasks} at once,"
                f" {'worker running' if workers else 'no worker'}: lateness p50"
                f" {_f(p(late, 0.5))} ms, p99 {_f(p(late, 0.99))} ms, max {_f(p(late, 1.0))} ms"
                f" ({by_worker} by the worker)"
            )


def prepare_rebuild(ctx: Context, url: str) -> None:
    from bench.projections import vacuum_analyze, write_history
    from ledger.persistence import postgres_env
    from ledger.service import Ledger

    ledger = Ledger(postgres_env(url, schema="public"))
    try:
        history = write_history(ledger, ctx.sizes.rebuild_events, lambda _: None)
    finally:
        ledger.close()
    vacuum_analyze(url)
    ctx.rebuild_url = url
    ctx.rebuild_events = history.events
    ctx.progress(
        f"  rebuild history: {history.events:,} events of {history.tasks:,} tasks written"
        f" in {history.seconds:.1f} s"
    )


def scenario_projections(ctx: Context, round_: int) -> None:
    from bench.projections import time_rebuild
    from projections import all_projections

    if ctx.rebuild_url is None:
        ctx.record.failures.append(Failure(round_, "projections", TASKLEDGER, "no history"))
        return
    local = (urlsplit(ctx.rebuild_url).hostname or "") in ("", "localhost", "127.0.0.1", "::1")
    for name in all_projections():
        with ctx.attempt(round_, f"rebuild {name}", TASKLEDGER):
            timed = time_rebuild(ctx.rebuild_url, name, 5_000, ctx.rebuild_events, local)
            ctx.record.put(f"rebuild.{name}", TASKLEDGER, round_, timed.rate)
            ctx.record.keep(
                round_,
                f"rebuild {name}",
                TASKLEDGER,
                events=timed.events,
                seconds=round(timed.seconds, 4),
                events_per_s=round(timed.rate, 1),
            )
            ctx.progress(
                f"  round {round_} rebuild {name}: {timed.rate:,.0f} events/s"
                f" ({timed.events:,} in {timed.seconds:.2f} s)"
            )


RUNNERS: dict[str, Callable[[Context, int], None]] = {
    "noop": scenario_noop,
    "rtt": scenario_rtt,
    "python": scenario_python,
    "csharp": scenario_csharp,
    "ttl": scenario_ttl,
    "projections": scenario_projections,
}


# -- the table -----------------------------------------------------------------------------


def _f(value: float | None, unit: str = "ms") -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit in ("tasks/s", "events/s", "count"):
        return f"{value:,.0f}"
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _cell(values: Sequence[float], unit: str, rounds: int) -> str:
    if not values:
        return "FAILED" if rounds else "-"
    median = statistics.median(values)
    text = _f(median, unit)
    if len(values) > 1:
        text += f" [{_f(min(values), unit)}–{_f(max(values), unit)}]"  # noqa: RUF001
    if len(values) < rounds:
        text += f" ({rounds - len(values)} of {rounds} rounds failed)"
    return text


@dataclass
class Row:
    scenario: str
    metric: str
    taskledger: str
    celery: str
    ratio: str
    goal: str
    met: str
    taskledger_median: float | None
    celery_median: float | None
    goal_met: bool | None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def judge(
    metric: Metric, tl: float | None, celery: float | None, record: Record
) -> tuple[str, bool | None]:
    goal = metric.goal
    if goal is None:
        return "", None
    if tl is None:
        return "no figure", None
    if goal.kind in ("ratio_min", "ratio_max"):
        if not celery:
            return "no Celery figure", None
        ratio = tl / celery
        if goal.kind == "ratio_min":
            ok = ratio >= goal.bound
            return ("yes" if ok else f"NO: x{ratio:.2f}, needs {goal.bound / ratio:.2f}x more"), ok
        ok = ratio <= goal.bound
        return ("yes" if ok else f"NO: x{ratio:.2f}, {ratio / goal.bound:.2f}x too slow"), ok
    if goal.kind == "baseline_max":
        base = _median(record.get(goal.baseline, TASKLEDGER))
        if not base:
            return "no baseline", None
        ratio = tl / base
        ok = ratio <= goal.bound
        return (f"yes (x{ratio:.2f})" if ok else f"NO: x{ratio:.2f} of bare mono"), ok
    if goal.kind == "max":
        ok = tl <= goal.bound
        return ("yes" if ok else f"NO: {tl / goal.bound:.2f}x the bound"), ok
    ok = tl >= goal.bound
    return ("yes" if ok else f"NO: {goal.bound / tl:.2f}x short"), ok


def rows(record: Record, scenarios: Sequence[str]) -> list[Row]:
    result = []
    prefixes = {
        "noop": ("noop.", "lag."),
        "rtt": ("rtt.",),
        "python": ("python.",),
        "csharp": ("csharp.",),
        "ttl": ("ttl.",),
        "projections": ("rebuild.",),
    }
    wanted = tuple(x for s in scenarios for x in prefixes[s])
    for metric in METRICS:
        if not metric.key.startswith(wanted):
            continue
        tl_values = record.get(metric.key, TASKLEDGER)
        celery_values = record.get(metric.key, CELERY)
        tl, celery = _median(tl_values), _median(celery_values)
        tl_cell = _cell(tl_values, metric.unit, record.rounds)
        celery_cell = metric.celery_na or _cell(celery_values, metric.unit, record.rounds)
        ratio = "-"
        if not metric.shared and tl is not None and celery:
            ratio = f"{tl / celery:.2f}"
        met, ok = judge(metric, tl, celery, record)
        result.append(
            Row(
                metric.scenario,
                metric.label,
                tl_cell,
                celery_cell,
                ratio,
                metric.goal.text() if metric.goal else "",
                met,
                tl,
                celery,
                ok,
            )
        )
    return result


def render(
    table: Sequence[Row],
    header: list[str],
    notes: Sequence[str],
) -> str:
    lines = []
    for line in header:  # one paragraph each (markdown would join consecutive lines)
        if line:
            lines += [line, ""]
    lines.append(
        markdown_table(
            ["scenario", "metric", "taskledger", "Celery", "taskledger/Celery", "goal", "met?"],
            [[r.scenario, r.metric, r.taskledger, r.celery, r.ratio, r.goal, r.met] for r in table],
        )
    )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------


def own_run_ms(code: str) -> float:
    """The program's own run time: its code exec'd in this interpreter (median of 200
    timings of 20 runs each, output discarded)."""
    compiled = compile(code, "<task>", "exec")
    sink = io.StringIO()

    def once() -> None:
        with contextlib.redirect_stdout(sink):
            exec(compiled, {"data": None})  # noqa: S102 -- the benchmark's own fixed program
        sink.seek(0)
        sink.truncate()

    timings = timeit.repeat(once, number=20, repeat=200)
    return statistics.median(timings) / 20 * 1000


def _reachable(url: str, default_port: int) -> str | None:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 3
        ):
            return None
    except OSError as error:
        return f"{parts.hostname}:{parts.port or default_port}: {error}"


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    overrides = {
        f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name) is not None
    }
    return replace(sizes, **overrides)


@dataclass
class Outcome:
    record: Record
    facts: dict[str, Any]
    systems: dict[str, dict[str, Any]]
    sizes: Sizes
    seconds: float
    own_python_ms: float
    mono_problem: str | None


def run(args: argparse.Namespace, progress: Callable[[str], None] = eprint) -> Outcome:
    started = time.perf_counter()
    sizes = _sizes(args)
    record = Record(args.rounds)
    problem = _reachable(args.broker_url, 5672)
    if problem is not None:
        raise SystemExit(f"{NAME}: RabbitMQ is not reachable ({problem}); start it first")
    if importlib.util.find_spec("celery") is None:
        raise SystemExit(
            f"{NAME}: Celery is not installed; pip install -e '.[bench]' (see docs/performance.md)"
        )
    from bench.systems.celery import CelerySystem
    from bench.systems.taskledger import Taskledger

    with contextlib.ExitStack() as stack:
        tl_url = stack.enter_context(temporary_database(args.database_url, "taskledger_bench_tl_"))
        celery_url = stack.enter_context(
            temporary_database(args.database_url, "taskledger_bench_celery_")
        )
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="taskledger-compare-"))
        )
        facts = asdict(machine_facts(tl_url))
        progress(f"{NAME}: databases {_dbname(tl_url)}, {_dbname(celery_url)}; workdir {workdir}")
        ctx = Context(args, sizes, record, {}, workdir, progress)
        ctx.own_python_ms = own_run_ms(NOOP_CODE)
        if "csharp" in args.scenarios:
            missing = [tool for tool in ("mono", "mcs") if shutil.which(tool) is None]
            if missing:
                ctx.mono_problem = (
                    f"Mono is not installed here ({' and '.join(missing)} missing:"
                    " apt-get install mono-mcs mono-runtime); the C# scenario is skipped"
                )
                progress("!" * 80 + f"\n  {ctx.mono_problem}\n" + "!" * 80)
            else:
                ctx.hello_exe = _compile_hello(workdir)
        if "projections" in args.scenarios:
            rebuild_url = stack.enter_context(
                temporary_database(args.database_url, "taskledger_bench_rebuild_")
            )
            prepare_rebuild(ctx, rebuild_url)
        taskledger = Taskledger(
            tl_url,
            args.broker_url,
            args.concurrency,
            args.connections,
            workdir,
            progress,
            views_process=args.views_process,
        )
        stack.callback(taskledger.close)
        celery_system = CelerySystem(
            celery_url, args.celery_broker_url, args.celery_concurrency, workdir, progress
        )
        stack.callback(celery_system.close)
        taskledger.start()
        celery_system.start()
        ctx.systems = {TASKLEDGER: taskledger, CELERY: celery_system}
        for round_ in range(1, args.rounds + 1):
            first = ctx.order(round_)[0].name
            progress(f"round {round_}/{args.rounds} ({first} first)")
            for scenario in args.scenarios:
                RUNNERS[scenario](ctx, round_)
        systems = {name: system.facts() for name, system in ctx.systems.items()}
    return Outcome(
        record,
        facts,
        systems,
        sizes,
        time.perf_counter() - started,
        ctx.own_python_ms,
        ctx.mono_problem,
    )


def _dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def notes(outcome: Outcome, table: Sequence[Row]) -> list[str]:
    sizes = outcome.sizes
    record = outcome.record
    lines = []
    for failure in record.failures:
        lines.append(
            f"- FAILED: round {failure.round}, {failure.scenario}, {failure.system}: "
            f"{failure.error}"
        )
    missed = [r for r in table if r.goal_met is False]
    if missed:
        lines.append(
            "- Goals not met: " + "; ".join(f"{r.scenario} {r.metric} ({r.met})" for r in missed)
        )
    legs: dict[str, list[float]] = {}
    for entry in record.raw:
        if entry["scenario"] == "rtt" and entry["system"] == TASKLEDGER:
            for name, value in entry.get("legs_p50_ms", {}).items():
                legs.setdefault(name, []).append(value)
    if legs:
        lines.append(
            "- taskledger round trip by leg (event times; p50 per round, median of the rounds): "
            + _legs_text({name: statistics.median(values) for name, values in legs.items()})
            + "."
        )
    cpu: dict[str, dict[str, list[float]]] = {}
    for entry in record.raw:
        if entry["scenario"] == "noop" and "cpu_s" in entry:
            for consumer, seconds in entry["cpu_s"].items():
                share = 1000 * seconds / max(1, entry["tasks"])
                cpu.setdefault(entry["system"], {}).setdefault(consumer, []).append(share)
    if cpu:
        lines.append(
            "- CPU per no-op task (ms; median of the rounds), the system's processes with"
            " their children, its PostgreSQL backends, RabbitMQ (all of it), the client: "
            + "; ".join(
                f"{system} "
                + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in consumers.items())
                for system, consumers in cpu.items()
            )
            + "."
        )
    lines.append(
        f"- Sizes: no-op {sizes.noop_tasks:,} tasks; {sizes.round_trips} round trips;"
        f" python {sizes.python_tasks:,} tasks; C# {sizes.csharp_warm} cached +"
        f" {sizes.csharp_cold} compiled, bare mono {sizes.mono_runs} runs; TTL"
        f" {sizes.ttl_on_worker} on a worker (per system), {sizes.ttl_tasks} at once (taskledger,"
        f" twice); rebuild {sizes.rebuild_events:,} events."
    )
    lines.append(
        f"- The program's own run time (its code exec'd in the benchmark's interpreter):"
        f" {outcome.own_python_ms * 1000:.1f} µs; overhead = run - that."
    )
    if outcome.mono_problem:
        lines.append(f"- {outcome.mono_problem.upper()}")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(NAME, __doc__)
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round: a smoke run")
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default all)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="taskledger worker --concurrency (default 2)"
    )
    parser.add_argument(
        "--views-process",
        action="store_true",
        help="run taskledger's projections in a process of their own (`taskledger api"
        " --no-projections` + `taskledger projections run`) instead of inside the api",
    )
    parser.add_argument(
        "--celery-concurrency",
        type=int,
        default=2,
        help="celery worker --concurrency, prefork (default 2)",
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="HTTP connections of the taskledger client"
    )
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL, help="taskledger's RabbitMQ")
    parser.add_argument(
        "--celery-broker-url", default=DEFAULT_CELERY_BROKER_URL, help="Celery's RabbitMQ"
    )
    defaults = Sizes()
    for f in fields(Sizes):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {getattr(defaults, f.name):,} ({getattr(QUICK, f.name):,} with --quick)",
        )
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def _scenarios(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    return [s for s in SCENARIOS if s in names]


def main(argv: Sequence[str] | None = None) -> int:
    from bench.projections import code_version

    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    code = code_version()
    try:
        outcome = run(args)
    except KeyboardInterrupt:
        eprint(f"{NAME}: interrupted; every process stopped, the databases dropped")
        return 130
    load_after = os.getloadavg()
    table = rows(outcome.record, args.scenarios)
    facts = outcome.facts
    celery = outcome.systems.get(CELERY, {})
    quick = " (QUICK: a smoke run of the harness, not a measurement)" if args.quick else ""
    header = [
        f"## taskledger vs Celery{quick}",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC · nproc={facts['nproc']} · PostgreSQL {facts['postgres']}"
        f" (synchronous_commit={facts['synchronous_commit']}) · Python {facts['python']}"
        f" · {facts['platform']} · eventsourcing {facts['eventsourcing']}"
        f" · Celery {celery.get('celery', '?')} (kombu {celery.get('kombu', '?')},"
        f" SQLAlchemy {celery.get('sqlalchemy', '?')})",
        f"taskledger: 1 api process"
        f"{' + 1 projections process' if args.views_process else ''}"
        f" + 1 worker process, worker --concurrency {args.concurrency},"
        f" {args.connections} HTTP connections · Celery: 1 worker, prefork --concurrency"
        f" {args.celery_concurrency}, acks_late, PostgreSQL result backend, .get() polling every"
        f" {celery.get('get_interval_s', '?')} s",
        f"{args.rounds} round(s), systems alternating; median [min–max] over rounds;"  # noqa: RUF001
        f" run took {outcome.seconds / 60:.1f} min; load average before/after"
        f" {load_before[0]:.2f}/{load_after[0]:.2f}; code {str(code['commit'])[:12]}"
        + (" (uncommitted changes in ledger/ or projections/)" if code["uncommitted"] else ""),
    ]
    print(render(table, header, notes(outcome, table)))
    if not args.no_json:
        path = write_results(
            NAME,
            {
                "benchmark": NAME,
                "started_at": started.isoformat(),
                "command": ["python", "-m", "bench.compare", *arguments],
                "settings": {
                    "rounds": args.rounds,
                    "quick": args.quick,
                    "scenarios": args.scenarios,
                    "sizes": asdict(outcome.sizes),
                    "taskledger_concurrency": args.concurrency,
                    "celery_concurrency": args.celery_concurrency,
                    "connections": args.connections,
                    "ttl_seconds": TTL_SECONDS,
                },
                "machine": facts,
                "systems": outcome.systems,
                "code": code,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "seconds": round(outcome.seconds, 1),
                "own_python_ms": outcome.own_python_ms,
                "mono": outcome.mono_problem or "present",
                "rows": [asdict(r) for r in table],
                "values": outcome.record.values,
                "failures": [asdict(f) for f in outcome.record.failures],
                "raw": outcome.record.raw,
            },
        )
        eprint(f"{NAME}: raw figures in {path}")
    return 1 if outcome.record.failures else 0


if __name__ == "__main__":
    sys.exit(main())
