"""The ledger's write rate, next to the event store's own default insert path.

Three workloads, each with 1 and with 8 writer threads (``--writers``) sharing one
application object, for a fixed time each (``--seconds``, after ``--warmup``), split into
``--rounds`` interleaved rounds so that noise on the machine hits every row alike:

- ``baseline``: eventsourcing's default insert path with nothing of ours in it: an
  ``Application`` subclass (own table, same PostgreSQL settings from ``postgres_env``)
  saving a new bare ``Aggregate`` per save, so one ``Created`` event per save;
- ``submit``: ``Ledger.submit``, one save of two events (TaskSubmitted, AttemptScheduled);
- ``lifecycle``: ``submit``, ``start_attempt``, ``complete_attempt`` of one task: three
  saves, four events; the two later commands each load the task first. Every writer
  works on its own tasks, so there is no version contention.

For each: saves/s, events/s, p50/p99 latency per save (for the ledger, per command, which
includes its load), the ratio of its events/s to the baseline's at the same writer count,
and the CPU spent per save by this process and by the PostgreSQL processes on this host
(when the server is local). Every run has a fresh database, dropped afterwards.

Every save is checked against the rows the table gained. On a 2-core machine the Python
client and PostgreSQL share the cores, so the CPU columns say who is busy.

Run: ``.venv/bin/python -m bench.ledger_writes [--writers 1,8] [--seconds 5]``.
"""

from __future__ import annotations

import abc
import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.utils import Environment, EnvType
from psycopg import sql

from bench._support import (
    MachineFacts,
    benchmark_parser,
    eprint,
    machine_facts,
    markdown_table,
    percentile,
    temporary_database,
    write_results,
)
from ledger.clock import SystemClock
from ledger.persistence import postgres_env
from ledger.service import Ledger
from ledger.values import AttemptResult

NAME = "ledger_writes"
SUMMARY = "saves/s and events/s of Ledger commands vs eventsourcing's default insert path"


# -- workloads ------------------------------------------------------------------------------


class BenchItem(Aggregate):
    """A bare aggregate: creating it triggers exactly one (field-less) Created event."""


class BaselineApp(Application[UUID]):
    """The library's application with its defaults (mapper, transcoder, recorder)."""

    name = "BenchBaseline"  # table benchbaseline_events, beside taskledger_events
    env: ClassVar[dict[str, str]] = {}

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        # Like the Ledger: only the given settings count, not stray POSTGRES_* in os.environ.
        return Environment(name, dict(env or {}))


class Workload(abc.ABC):
    """One kind of unit of work, repeated by every writer thread."""

    name: ClassVar[str]
    saves_per_unit: ClassVar[int]
    events_per_unit: ClassVar[int]
    steps: ClassVar[tuple[str, ...]]  # one name per save in a unit

    def __init__(self, app: Application[UUID]) -> None:
        self.app = app

    @classmethod
    @abc.abstractmethod
    def open(cls, env: dict[str, str]) -> Workload: ...

    @abc.abstractmethod
    def unit(self, writer: int, n: int, latencies: Sequence[list[float]]) -> None:
        """Do one unit of work; append each save's wall time (s) to latencies[step]."""

    @property
    def events_table(self) -> str:
        return f"{self.app.name.lower()}_events"

    def close(self) -> None:
        self.app.close()


class Baseline(Workload):
    name = "baseline"
    saves_per_unit = 1
    events_per_unit = 1
    steps = ("save",)

    @classmethod
    def open(cls, env: dict[str, str]) -> Workload:
        return cls(BaselineApp(env))

    def unit(self, writer: int, n: int, latencies: Sequence[list[float]]) -> None:
        started = time.perf_counter()
        self.app.save(BenchItem())
        latencies[0].append(time.perf_counter() - started)


def _submit(ledger: Ledger, writer: int, n: int) -> UUID:
    return ledger.submit(
        description="bench",
        language="python",
        code="print(1)",
        data={"writer": writer, "n": n},
        tenant="bench",
        submitted_by=f"writer-{writer}",
    ).task.id


class Submit(Workload):
    name = "submit"
    saves_per_unit = 1
    events_per_unit = 2
    steps: ClassVar[tuple[str, ...]] = ("submit",)

    def __init__(self, app: Ledger) -> None:
        super().__init__(app.store)
        self.ledger = app

    @classmethod
    def open(cls, env: dict[str, str]) -> Workload:
        return cls(Ledger(env, clock=SystemClock()))

    def unit(self, writer: int, n: int, latencies: Sequence[list[float]]) -> None:
        started = time.perf_counter()
        _submit(self.ledger, writer, n)
        latencies[0].append(time.perf_counter() - started)


RESULT = AttemptResult(stdout="1\n", exit_code=0, duration_ms=1.0)


class Lifecycle(Submit):
    name = "lifecycle"
    saves_per_unit = 3
    events_per_unit = 4
    steps = ("submit", "start_attempt", "complete_attempt")

    def unit(self, writer: int, n: int, latencies: Sequence[list[float]]) -> None:
        t0 = time.perf_counter()
        task_id = _submit(self.ledger, writer, n)
        t1 = time.perf_counter()
        self.ledger.start_attempt(task_id, 1, f"worker-{writer}")
        t2 = time.perf_counter()
        self.ledger.complete_attempt(task_id, 1, RESULT)
        t3 = time.perf_counter()
        latencies[0].append(t1 - t0)
        latencies[1].append(t2 - t1)
        latencies[2].append(t3 - t2)


WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (Baseline, Submit, Lifecycle)}


# -- measuring ------------------------------------------------------------------------------


def postgres_cpu_seconds() -> float | None:
    """CPU time used so far by this host's `postgres` processes, dead backends included
    (the postmaster's reaped-children times). None where /proc is not readable."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    found = False
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone, or not ours to read
        comm_end = stat.rfind(b")")
        comm = stat[stat.find(b"(") + 1 : comm_end]
        if not comm.startswith(b"postgres"):
            continue
        fields = stat[comm_end + 2 :].split()
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
        total += sum(int(x) for x in fields[11:15])
        found = True
    return total / tick if found else None


def _server_is_local(url: str) -> bool:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("/") or "host=/" in url


@dataclass
class Phase:
    units: int
    elapsed: float
    client_cpu: float
    server_cpu: float | None
    latencies: list[list[float]]  # per step, all writers
    rows_written: int = 0


def run_phase(workload: Workload, writers: int, seconds: float, local: bool) -> Phase:
    """All writers do units until `seconds` have passed (each finishes the unit it is in)."""
    per_writer: list[list[list[float]]] = [[[] for _ in workload.steps] for _ in range(writers)]
    units = [0] * writers
    ended = [0.0] * writers
    errors: list[BaseException] = []
    stop = threading.Event()
    start: list[float] = []

    def go() -> None:
        start.append(time.perf_counter())

    barrier = threading.Barrier(writers, action=go)

    def writer(index: int) -> None:
        try:
            barrier.wait()
            deadline = start[0] + seconds
            latencies = per_writer[index]
            n = 0
            while not stop.is_set() and time.perf_counter() < deadline:
                workload.unit(index, n, latencies)
                n += 1
            units[index] = n
        except BaseException as error:  # noqa: BLE001 -- handed to the main thread
            errors.append(error)
            stop.set()
        finally:
            ended[index] = time.perf_counter()

    threads = [
        threading.Thread(target=writer, args=(i,), name=f"writer-{i}") for i in range(writers)
    ]
    server_before = postgres_cpu_seconds() if local else None
    cpu_before = time.process_time()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C, SIGTERM: stop the writers before the database goes
        stop.set()
        barrier.abort()
        for thread in threads:
            if thread.is_alive():
                thread.join()
        raise
    cpu_after = time.process_time()
    server_after = postgres_cpu_seconds() if local else None
    if errors:
        raise errors[0]
    server_cpu = (
        server_after - server_before
        if server_before is not None and server_after is not None
        else None
    )
    return Phase(
        units=sum(units),
        elapsed=max(ended) - start[0],
        client_cpu=cpu_after - cpu_before,
        server_cpu=server_cpu,
        latencies=[[x for w in per_writer for x in w[s]] for s in range(len(workload.steps))],
    )


def count_rows(database_url: str, table: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass
class StepLatency:
    step: str
    count: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


@dataclass
class Result:
    workload: str
    writers: int
    seconds: float  # measured wall time, all rounds
    units: int
    saves: int
    events: int
    saves_per_s: float
    events_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    client_cpu_ms_per_save: float
    server_cpu_ms_per_save: float | None
    round_saves_per_s: list[float]  # one per round, to see the noise
    steps: list[StepLatency] = field(default_factory=list)
    events_vs_baseline: float | None = None

    @property
    def spread(self) -> float:
        """Half the range of the per-round rates, relative to the overall rate."""
        rates = self.round_saves_per_s
        return (max(rates) - min(rates)) / 2 / self.saves_per_s if self.saves_per_s else 0.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _latency(name: str, values: list[float]) -> StepLatency:
    values = sorted(values)
    return StepLatency(
        step=name,
        count=len(values),
        p50_ms=_ms(percentile(values, 0.50)),
        p99_ms=_ms(percentile(values, 0.99)),
        mean_ms=_ms(statistics.fmean(values)) if values else float("nan"),
        max_ms=_ms(values[-1]) if values else float("nan"),
    )


def summarise(kind: type[Workload], writers: int, phases: Sequence[Phase]) -> Result:
    units = sum(p.units for p in phases)
    elapsed = sum(p.elapsed for p in phases)
    saves = units * kind.saves_per_unit
    events = units * kind.events_per_unit
    client_cpu = sum(p.client_cpu for p in phases)
    server_cpus = [p.server_cpu for p in phases]
    server_cpu = None if any(c is None for c in server_cpus) else sum(c or 0.0 for c in server_cpus)
    overall = _latency("all", [x for p in phases for step in p.latencies for x in step])
    return Result(
        workload=kind.name,
        writers=writers,
        seconds=round(elapsed, 4),
        units=units,
        saves=saves,
        events=events,
        saves_per_s=round(saves / elapsed, 1),
        events_per_s=round(events / elapsed, 1),
        p50_ms=overall.p50_ms,
        p99_ms=overall.p99_ms,
        mean_ms=overall.mean_ms,
        max_ms=overall.max_ms,
        client_cpu_ms_per_save=_ms(client_cpu / saves) if saves else float("nan"),
        server_cpu_ms_per_save=_ms(server_cpu / saves)
        if server_cpu is not None and saves
        else None,
        round_saves_per_s=[round(p.units * kind.saves_per_unit / p.elapsed, 1) for p in phases],
        steps=[
            _latency(name, [x for p in phases for x in p.latencies[i]])
            for i, name in enumerate(kind.steps)
        ],
    )


# -- reporting ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(facts: MachineFacts, results: Sequence[Result], seconds: float, rounds: int) -> str:
    main = markdown_table(
        [
            "workload",
            "writers",
            "saves/s",
            "round spread",
            "events/s",
            "p50 ms/save",
            "p99 ms/save",
            "events/s vs baseline",
            "client CPU ms/save",
            "PG CPU ms/save",
        ],
        [
            [
                r.workload,
                str(r.writers),
                _num(r.saves_per_s),
                f"±{100 * r.spread:.0f}%",
                _num(r.events_per_s),
                _num(r.p50_ms, 2),
                _num(r.p99_ms, 2),
                "-" if r.events_vs_baseline is None else f"{r.events_vs_baseline:.2f}x",
                _num(r.client_cpu_ms_per_save, 2),
                _num(r.server_cpu_ms_per_save, 2),
            ]
            for r in results
        ],
    )
    steps = [r for r in results if len(r.steps) > 1]
    parts = [
        f"# {NAME}: {facts.header()}",
        "",
        f"{seconds:g} s per row in {rounds} interleaved rounds; 1 save = 1 transaction;"
        " baseline = 1 event/save, submit = 2, lifecycle = 4 events per 3 saves;"
        " CPU = this process / the host's postgres processes.",
        "",
        main,
    ]
    if steps:
        parts += [
            "",
            "Lifecycle commands (start/complete load the task before saving):",
            "",
            markdown_table(
                ["writers", "command", "p50 ms", "p99 ms", "mean ms"],
                [
                    [
                        str(r.writers),
                        s.step,
                        _num(s.p50_ms, 2),
                        _num(s.p99_ms, 2),
                        _num(s.mean_ms, 2),
                    ]
                    for r in steps
                    for s in r.steps
                ],
            ),
        ]
    return "\n".join(parts)


# -- command line ---------------------------------------------------------------------------


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _workload_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("ledger_writes", __doc__)
    parser.add_argument(
        "--writers", type=_positive_ints, default=[1, 8], help="writer thread counts (default 1,8)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="measured seconds per row, summed over the rounds (default 5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds each row's seconds are split into (default 3)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="unmeasured seconds before each row's first round (default 1)",
    )
    parser.add_argument(
        "--workloads",
        type=_workload_names,
        default=list(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default all)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="do not write bench/results/ledger_writes-*.json"
    )
    return parser.parse_args(argv)


def run(
    database_url: str,
    writer_counts: Sequence[int],
    seconds: float,
    warmup: float,
    workloads: Sequence[str],
    rounds: int = 3,
    progress: Callable[[str], None] = eprint,
) -> tuple[MachineFacts, list[Result]]:
    """Measure every workload at every writer count in a throwaway database.

    The measured time of each (workload, writers) row is split into `rounds` phases,
    interleaved with the other rows', so that a disturbance on the machine (another
    process, a checkpoint) hits every row alike rather than one row's whole run.
    """
    # Enough connections that no writer waits for one, whatever the writer count.
    pool_size = max(writer_counts)
    max_overflow = max(writer_counts)
    local = _server_is_local(database_url)
    phases: dict[tuple[str, int], list[Phase]] = {}
    with temporary_database(database_url) as url:
        facts = machine_facts(url)
        progress(f"{NAME}: database {urlsplit(url).path.lstrip('/')}; {facts.header()}")
        env = postgres_env(url, schema="", pool_size=pool_size, max_overflow=max_overflow)
        opened: dict[str, Workload] = {}
        try:
            for name in workloads:
                opened[name] = WORKLOADS[name].open(env)
            for round_ in range(rounds):
                for writers in writer_counts:
                    for name in workloads:
                        workload = opened[name]
                        if round_ == 0 and warmup > 0:
                            # Fills the pool, prepares statements, warms caches.
                            run_phase(workload, writers, warmup, local=False)
                        before = count_rows(url, workload.events_table)
                        phase = run_phase(workload, writers, seconds / rounds, local)
                        phase.rows_written = count_rows(url, workload.events_table) - before
                        expected = phase.units * workload.events_per_unit
                        if phase.rows_written != expected:
                            raise AssertionError(
                                f"{name}/{writers}: counted {expected} events but the table"
                                f" gained {phase.rows_written} rows"
                            )
                        phases.setdefault((name, writers), []).append(phase)
                        rate = phase.units * workload.saves_per_unit / phase.elapsed
                        progress(
                            f"  round {round_ + 1}/{rounds} {name:<9} writers={writers}:"
                            f" {rate:,.0f} saves/s"
                        )
        finally:
            for workload in opened.values():
                workload.close()
    results: list[Result] = []
    for writers in writer_counts:
        baseline: Result | None = None
        for name in workloads:
            result = summarise(WORKLOADS[name], writers, phases[(name, writers)])
            if name == Baseline.name:
                baseline = result
            if baseline is not None and baseline.events_per_s > 0:
                result.events_vs_baseline = round(result.events_per_s / baseline.events_per_s, 3)
            results.append(result)
    return facts, results


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    facts, results = run(
        args.database_url, args.writers, args.seconds, args.warmup, args.workloads, args.rounds
    )
    load_after = os.getloadavg()
    print(render(facts, results, args.seconds, args.rounds))
    if not args.no_json:
        path: Path = write_results(
            NAME,
            {
                "benchmark": NAME,
                "started_at": started.isoformat(),
                "command": ["python", "-m", "bench.ledger_writes", *arguments],
                "settings": {
                    "writers": args.writers,
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "rounds": args.rounds,
                    "workloads": args.workloads,
                    "pool_size": max(args.writers),
                    "max_overflow": max(args.writers),
                },
                "machine": asdict(facts),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "results": [asdict(r) for r in results],
            },
        )
        eprint(f"{NAME}: raw figures in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
