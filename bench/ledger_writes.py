"""The ledger's write rate, against the event store's own default insert path.

``python -m bench ledger_writes [--writers 1,8] [--seconds 5] [--quick]``. Four
workloads, each with every writer count (threads sharing one application object), in
interleaved rounds: ``baseline``, eventsourcing's ``Application`` with its defaults (own
table, the same PostgreSQL settings) saving one bare ``Aggregate`` (1 event) per save;
``submit``, ``Ledger.submit`` (1 save, 2 events); ``lifecycle``, submit, start and
complete one task (3 saves, 4 events), each writer on its own tasks; ``lifecycle-nochain``,
the same without the hash chain (the library's insert): what the chain costs. Per row: saves/s,
events/s against the baseline's at the same writer count, latency per save, CPU per save
of this process and of the database's backends; every save is checked against the rows
the table gained. A fresh database, dropped afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import Environment, EnvType
from psycopg import Cursor, sql
from psycopg.rows import DictRow

from bench.cpu import CpuMeter
from bench.report import (
    Run,
    eprint,
    markdown_table,
    ms,
    num,
    over_rounds,
    parser,
    percentile,
)
from bench.services import temporary_database
from ledger import AttemptResult, Ledger, SystemClock
from ledger.connections import postgres_env
from ledger.persistence import LedgerRecorder

NAME = "ledger_writes"
RESULT = AttemptResult(stdout="1\n", exit_code=0, duration_ms=1.0)


class BenchItem(Aggregate):
    """A bare aggregate: creating it triggers exactly one (field-less) Created event."""


class BaselineApp(Application[UUID]):
    """The library's application with its defaults (mapper, transcoder, recorder)."""

    name = "BenchBaseline"  # table benchbaseline_events, beside taskledger_events

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        # Like the Ledger: only the given settings count, not stray POSTGRES_* in os.environ;
        # and the library's own recorder, not the ledger's (leases, the hash chain).
        settings = {k: v for k, v in (env or {}).items() if k != "APPLICATION_RECORDER_TOPIC"}
        return Environment(name, settings)


class Workload:
    """One unit of work per call of `unit`, repeated by every writer thread."""

    name: ClassVar[str]
    saves: ClassVar[int]  # per unit
    events: ClassVar[int]  # per unit

    def __init__(self, env: dict[str, str]) -> None:
        self.app: Application[UUID] = BaselineApp(env)

    @property
    def table(self) -> str:
        return f"{self.app.name.lower()}_events"

    def unit(self, writer: int, n: int, latencies: list[float]) -> None:
        started = time.perf_counter()
        self.app.save(BenchItem())
        latencies.append(time.perf_counter() - started)


class Baseline(Workload):
    name, saves, events = "baseline", 1, 1


class Submit(Workload):
    name, saves, events = "submit", 1, 2

    def __init__(self, env: dict[str, str]) -> None:
        self.ledger = Ledger(env, clock=SystemClock())
        self.app = self.ledger.store

    def submit(self, writer: int, n: int) -> UUID:
        return self.ledger.submit(
            description="bench",
            language="python",
            code="print(1)",
            data={"writer": writer, "n": n},
            tenant="bench",
            submitted_by=f"writer-{writer}",
        ).task.id

    def unit(self, writer: int, n: int, latencies: list[float]) -> None:
        t0 = time.perf_counter()
        self.submit(writer, n)
        latencies.append(time.perf_counter() - t0)


class Lifecycle(Submit):
    name, saves, events = "lifecycle", 3, 4

    def unit(self, writer: int, n: int, latencies: list[float]) -> None:
        t0 = time.perf_counter()
        task_id = self.submit(writer, n)
        t1 = time.perf_counter()
        self.ledger.start_attempt(task_id, 1, f"worker-{writer}")
        t2 = time.perf_counter()
        self.ledger.complete_attempt(task_id, 1, RESULT)
        latencies += [t1 - t0, t2 - t1, time.perf_counter() - t2]


class UnchainedRecorder(LedgerRecorder):
    """The ledger's recorder without the hash chain (ledger.chain): the library's insert,
    as before the chain existed. `lifecycle-nochain` against `lifecycle` is its cost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        library = PostgresApplicationRecorder(
            self.datastore, events_table_name=self.events_table_name
        )
        self.insert_events_statement = library.insert_events_statement

    def _insert_stored_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        PostgresApplicationRecorder._insert_stored_events(self, curs, stored_events, **kwargs)

    def _fetch_ids_after_insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        return PostgresApplicationRecorder._fetch_ids_after_insert_events(
            self, curs, stored_events, **kwargs
        )


class LifecycleUnchained(Lifecycle):
    name = "lifecycle-nochain"

    def __init__(self, env: dict[str, str]) -> None:
        topic = f"{__name__}:{UnchainedRecorder.__name__}"
        super().__init__({**env, "APPLICATION_RECORDER_TOPIC": topic})


WORKLOADS: dict[str, type[Workload]] = {
    w.name: w for w in (Baseline, Submit, Lifecycle, LifecycleUnchained)
}


def run_phase(workload: Workload, writers: int, seconds: float) -> tuple[int, float, list[float]]:
    """All writers do units until `seconds` have passed; (units, elapsed, latencies)."""
    latencies: list[list[float]] = [[] for _ in range(writers)]
    units = [0] * writers
    errors: list[BaseException] = []
    stop = threading.Event()
    start: list[float] = []
    barrier = threading.Barrier(writers, action=lambda: start.append(time.perf_counter()))

    def writer(index: int) -> None:
        try:
            barrier.wait()
            while not stop.is_set() and time.perf_counter() < start[0] + seconds:
                workload.unit(index, units[index], latencies[index])
                units[index] += 1
        except BaseException as error:  # noqa: BLE001 -- handed to the main thread
            errors.append(error)
            stop.set()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C, SIGTERM: stop the writers before the database goes
        stop.set()
        barrier.abort()
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]
    return sum(units), time.perf_counter() - start[0], [x for w in latencies for x in w]


def count_rows(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        return int(row.fetchone()[0])  # type: ignore[index]


def main(argv: Sequence[str]) -> int:
    p = parser(NAME, __doc__)
    p.add_argument("--writers", default="1,8", help="writer thread counts (default 1,8)")
    p.add_argument("--seconds", type=float, default=5.0, help="per row, all rounds (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each row (1)")
    args = p.parse_args(argv)
    writer_counts = [int(x) for x in args.writers.split(",")]
    if args.quick:
        writer_counts, args.seconds, args.rounds, args.warmup = [1, 4], 1.0, 1, 0.2
    run = Run(NAME, argv)
    rows: dict[tuple[str, int], list[tuple[int, float, list[float], dict[str, float]]]] = {}
    with temporary_database(args.database_url) as url:
        header = run.header(url)
        eprint(f"{NAME}: {header}")
        pool = max(writer_counts)  # enough connections that no writer waits for one
        env = postgres_env(url, schema="", pool_size=pool, max_overflow=pool)
        workloads = [kind(env) for kind in WORKLOADS.values()]
        meter = CpuMeter({}, url)
        try:
            for round_ in range(args.rounds):
                for writers in writer_counts:
                    for workload in workloads:
                        if round_ == 0 and args.warmup > 0:  # the pool, statements, caches
                            run_phase(workload, writers, args.warmup)
                        before, rows_before = meter.mark(), count_rows(url, workload.table)
                        units, elapsed, lat = run_phase(
                            workload, writers, args.seconds / args.rounds
                        )
                        cpu = CpuMeter.spent(before, meter.mark())
                        gained = count_rows(url, workload.table) - rows_before
                        if gained != units * workload.events:
                            raise AssertionError(
                                f"{workload.name}/{writers}: {units * workload.events} events"
                                f" saved, the table gained {gained} rows"
                            )
                        rows.setdefault((workload.name, writers), []).append(
                            (units, elapsed, lat, cpu)
                        )
                        eprint(
                            f"  round {round_ + 1} {workload.name} x{writers}:"
                            f" {units * workload.saves / elapsed:,.0f} saves/s"
                        )
        finally:
            for workload in workloads:
                workload.app.close()
    table, raw = [], []
    for (name, writers), phases in rows.items():
        kind = WORKLOADS[name]
        saves = sum(u for u, *_ in phases) * kind.saves
        latencies = [x for _, _, lat, _ in phases for x in lat]
        rates = [u * kind.saves / e for u, e, *_ in phases]
        events_per_s = saves // kind.saves * kind.events / sum(e for _, e, *_ in phases)
        baseline = rows[(Baseline.name, writers)]
        base_rate = sum(u for u, *_ in baseline) / sum(e for _, e, *_ in baseline)
        figures = {
            "p50 ms/save": ms(percentile(latencies, 0.5) or 0.0),
            "p99 ms/save": ms(percentile(latencies, 0.99) or 0.0),
            "client CPU ms/save": ms(sum(c["client"] for *_, c in phases) / saves),
            "PG CPU ms/save": ms(sum(c["PostgreSQL"] for *_, c in phases) / saves),
        }
        raw.append({"workload": name, "writers": writers, "saves/s": rates} | figures)
        versus = f"{events_per_s / base_rate:.2f}x"
        cells = [over_rounds(rates, 0), num(events_per_s, 0), versus]
        table.append([name, str(writers), *cells, *(num(v) for v in figures.values())])
    headers = ["workload", "writers", "saves/s", "events/s", "vs baseline", *figures]
    print(
        f"# {NAME}: {header}\n\n{args.seconds:g} s per row in {args.rounds} interleaved"
        " rounds; 1 save = 1 transaction; baseline = eventsourcing's Application saving one"
        " bare aggregate (1 event) per save; vs baseline = events/s against the baseline's"
        " at the same writer count.\n\n" + markdown_table(headers, table) + f"\n\n{run.footer()}"
    )
    run.keep({"settings": vars(args), "rows": raw}, args.no_json)
    return 0
