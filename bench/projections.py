"""Projections: rebuild speed and live lag, against eventsourcing's own ProjectionRunner.

``python -m bench projections [--parts rebuild,lag] [--events 100000] [--quick]``. In a
fresh database (dropped afterwards), beside the issue's targets (rebuild >= 20,000
events/s, live lag p99 <= 50 ms):

1. **Rebuild.** ``--events`` events are written (bench/history.py; each completed
   attempt's stdout ``--output-bytes`` long). In each of ``--rounds`` rounds,
   ``projections.admin.rebuild()`` of ``task_status`` and of ``audit`` is timed (a new
   generation from position 0, as ``taskledger projections rebuild NAME`` does).
   Baseline, same rounds: ``eventsourcing.projection.ProjectionRunner`` following the same
   table (with the Ledger's mapper) into a minimal view writing one row per event and its
   tracking record in one transaction (the library's tutorial's way). It applies one
   event per transaction, so it gets the first ``--baseline-events`` only; its time runs
   from constructing the runner to the commit of the last of them.

2. **Live lag.** A ``Ledger`` takes a paced load: ``--rate`` tasks/s, each ``submit``,
   ``start_attempt``, ``complete_attempt`` (3 saves, 4 events), from ``--writers``
   threads (open loop). The time and last position of every commit are taken right after
   it (saves that arrive together share a group commit); the followers note theirs after
   each commit: the two taskledger runners (``on_batch``), or the library's runner (after
   each event). A commit's lag is the time from it to the follower's first commit at or
   past its position; its trend over the load (ms per s) tells a follower that keeps up
   (~0) from one falling behind. ``--seconds`` of load per kind of follower, split over
   the rounds, one kind at a time (they would otherwise share the cores). Afterwards the
   live views are checked against the log (every event once in ``audit``, every task in
   ``task_status``).

Everything runs in this one process, as ``taskledger dev`` does: writers and followers
share one interpreter and, on a small machine, the cores with PostgreSQL.
"""

from __future__ import annotations

import bisect
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from eventsourcing.persistence import InfrastructureFactory, StoredEvent, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection as LibraryProjection
from eventsourcing.projection import ProjectionRunner as LibraryRunner
from eventsourcing.utils import Environment
from psycopg import sql

from bench.history import RESULT, SCHEMA, time_rebuild, write_history
from bench.report import Run, eprint, markdown_table, num, parser
from bench.services import temporary_database
from bench.stats import median, over_rounds, percentile
from ledger import Ledger, SystemClock
from ledger.log import EVENTS_TABLE
from ledger.persistence import postgres_env
from ledger.store import EventStore
from projections import all_projections
from projections.runner import ProjectionRunner

NAME = "projections"
BASELINE = "eventsourcing ProjectionRunner"
TARGET_REBUILD = 20_000  # events/s
TARGET_LAG_P99 = 50.0  # ms
FALLING_BEHIND = 20.0  # ms of lag gained per s of load: the follower is not keeping up
CATCH_UP = 120.0  # seconds a follower may take to reach the head
Commits = list[tuple[int, float]]  # (position, perf_counter) of each commit


class TimedLedger(Ledger):
    """A Ledger that notes, after each commit, its last position and the time."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env, clock=SystemClock())
        self.commits: Commits | None = None  # a list to record into
        # Every save goes through the group commit, whose insert returns once its
        # transaction committed, with the notification ids it was given.
        insert = self.store.group_commit._insert

        def timed(events: Sequence[StoredEvent]) -> object:
            ids = insert(events)
            if self.commits is not None and isinstance(ids, list | tuple) and ids:
                self.commits.append((max(ids), time.perf_counter()))
            return ids

        self.store.group_commit._insert = timed


class BaselineView(PostgresTrackingRecorder):
    """A view the library's way: a tracking recorder that also owns a table, writes a row
    and the tracking record in one transaction, and notes each commit."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        table = sql.Identifier(self.datastore.schema, "benchbaseline_rows")
        self.sql_create_statements.append(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (position bigint PRIMARY KEY, task_id uuid,"
                " version int, type text, at timestamptz)"
            ).format(table)
        )
        self.insert_row = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(table)
        self.commits: Commits = []

    def write(self, event: Any, tracking: Tracking) -> None:
        row = (event.originator_id, event.originator_version, type(event).__name__)
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self.insert_row, (tracking.notification_id, *row, event.timestamp))
            self._insert_tracking(curs, tracking)
        self.commits.append((tracking.notification_id, time.perf_counter()))


class BaselineProjection(LibraryProjection[BaselineView]):
    name = "BenchBaseline"  # tables benchbaseline_tracking, benchbaseline_rows

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.write(domain_event, tracking)


def baseline_runner(env: dict[str, str], url: str, position: int) -> LibraryRunner[Any, Any]:
    """The library's runner over an empty view whose tracking starts at `position`. Its
    connections skip the pool's pre-ping (the library's default; the ledger's is on)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("benchbaseline_rows", "benchbaseline_tracking"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    env = env | {"BENCHBASELINE_POSTGRES_PRE_PING": "n"}
    factory = InfrastructureFactory[BaselineView].construct(env=Environment("BenchBaseline", env))
    try:
        view = factory.tracking_recorder(BaselineView)  # creates the tables
        if position:
            view.insert_tracking(Tracking(EventStore.name, position))
    finally:
        factory.close()
    return LibraryRunner(
        application_class=EventStore,
        projection_class=BaselineProjection,
        view_class=BaselineView,
        env=env,
    )


def wait_baseline(runner: LibraryRunner[Any, BaselineView], position: int) -> None:
    deadline = time.monotonic() + CATCH_UP
    while not runner.view.commits or runner.view.commits[-1][0] < position:
        runner.run_forever(timeout=0.005)  # re-raises an error of its processing thread
        if time.monotonic() > deadline:
            raise AssertionError(f"the library's runner did not reach {position}")


def committed_at(commits: Commits, position: int) -> float | None:
    """When the first commit at or past `position` happened (commits in position order)."""
    index = bisect.bisect_left(commits, (position, float("-inf")))
    return commits[index][1] if index < len(commits) else None


def head(url: str, offset: int | None = None) -> int:
    """The log's last position, or the position of its event number `offset + 1`."""
    table = sql.Identifier(SCHEMA, EVENTS_TABLE)
    query = "SELECT coalesce(max(notification_id), 0) FROM {}"
    if offset is not None:
        query = "SELECT notification_id FROM {} ORDER BY notification_id OFFSET %s LIMIT 1"
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.SQL(query).format(table), () if offset is None else (offset,))
        return int(row.fetchone()[0])  # type: ignore[index]


def baseline_rebuild(env: dict[str, str], url: str, events: int) -> float:
    """The library's runner from position 0 to the `events`th event: events/s."""
    target = head(url, events - 1)
    started = time.perf_counter()
    with baseline_runner(env, url, 0) as runner:
        wait_baseline(runner, target)
        finished = committed_at(runner.view.commits, target)
    assert finished is not None
    return events / (finished - started)


def load(ledger: TimedLedger, rate: float, seconds: float, writers: int) -> Commits:
    """`rate` tasks/s for `seconds`: submit, start, complete; paced, open loop. Its
    commits, in position order."""
    total = max(1, round(rate * seconds))
    errors: list[BaseException] = []
    t0 = time.perf_counter() + 0.01

    def writer(index: int) -> None:
        try:
            for i in range(index, total, writers):
                time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                task = ledger.submit(
                    description=f"live {i}",
                    language="python",
                    code="print(6 * 7)",
                    tenant=f"tenant-{i % 7}",
                    submitted_by="bench",
                ).task
                ledger.start_attempt(task.id, 1, f"worker-{index}")
                ledger.complete_attempt(task.id, 1, RESULT)
        except BaseException as error:  # noqa: BLE001 -- handed to the main thread
            errors.append(error)

    ledger.commits = []
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    commits, ledger.commits = sorted(ledger.commits), None
    if errors:
        raise errors[0]
    return commits


def warm_up(ledger: TimedLedger) -> int:
    """One task's submit, so that a follower is seen to follow; its position."""
    ledger.commits = []
    ledger.submit(
        description="warm-up", language="python", code="pass", tenant="t", submitted_by="bench"
    )
    position, ledger.commits = ledger.commits[-1][0], None
    return position


def lags(writes: Commits, follower: Commits) -> tuple[list[float], float]:
    """Each commit's lag (ms) until the follower's first commit at or past it; the trend
    of the lag over the load (ms per s: ~0 when the follower keeps up)."""
    pairs = [(at, committed_at(follower, position)) for position, at in writes]
    values = [(at, (done - at) * 1000) for at, done in pairs if done is not None]
    if len(values) != len(writes):
        raise AssertionError(f"{len(writes) - len(values)} commits never reached the follower")
    times, result = [at for at, _ in values], [lag for _, lag in values]
    trend = statistics.linear_regression(times, result).slope if len(values) > 2 else 0.0
    return result, trend


def _noting(log: Commits) -> Callable[[Any, int], None]:
    """An `on_batch` that notes the runner's position and the time after each commit."""
    return lambda generation, applied: log.append((generation.position, time.perf_counter()))


def live_round(
    url: str, env: dict[str, str], ledger: TimedLedger, args: Any
) -> dict[str, tuple[list[float], float]]:
    """One round of load per kind of follower: the two taskledger views, then the library's
    runner; each follower's lags and trend."""
    seconds = args.seconds / args.rounds
    logs: dict[str, Commits] = {name: [] for name in all_projections()}
    runners = [
        ProjectionRunner(url, SCHEMA, p, batch_size=2_000, on_batch=_noting(logs[name]))
        for name, p in all_projections().items()  # batch size: `taskledger projections run`'s
    ]
    for runner in runners:
        runner.start()
    try:
        position = warm_up(ledger)
        for runner in runners:
            if not runner.wait_for(position, CATCH_UP):
                raise AssertionError(f"{runner.projection.name} did not catch up")
        for log in logs.values():
            log.clear()
        writes = load(ledger, args.rate, seconds, args.writers)
        for runner in runners:
            if not runner.wait_for(writes[-1][0], CATCH_UP):
                raise AssertionError(f"{runner.projection.name} did not catch up")
    finally:
        for runner in runners:
            runner.stop()
    result = {name: lags(writes, log) for name, log in logs.items()}
    with baseline_runner(env, url, head(url)) as library:
        wait_baseline(library, warm_up(ledger))
        writes = load(ledger, args.rate, seconds, args.writers)
        wait_baseline(library, writes[-1][0])
        result[BASELINE] = lags(writes, library.view.commits)
    return result


def check_views(url: str) -> None:
    """Every event once in audit and every task in task_status, once the runners caught up
    with what the baseline's rounds wrote."""
    runners = [ProjectionRunner(url, SCHEMA, p) for p in all_projections().values()]
    last = head(url)
    for runner in runners:
        runner.start()
    try:
        for runner in runners:
            if not runner.wait_for(last, CATCH_UP):
                raise AssertionError(f"{runner.projection.name} did not catch up at the end")
    finally:
        for runner in runners:
            runner.stop()
    counts = "SELECT (SELECT count(*) FROM {}), (SELECT count(DISTINCT originator_id) FROM {}),"
    counts += " (SELECT count(*) FROM audit), (SELECT count(*) FROM task_status)"
    events = sql.Identifier(SCHEMA, EVENTS_TABLE)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.SQL(counts).format(events, events)).fetchone()
    if row is None or row[0] != row[2] or row[1] != row[3]:
        raise AssertionError(f"events, tasks, audit rows, task_status rows: {row}")


def main(argv: Sequence[str]) -> int:
    p = parser(NAME, __doc__)
    p.add_argument("--parts", default="rebuild,lag", help="rebuild, lag or both (default)")
    p.add_argument("--events", type=int, default=100_000, help="events to rebuild (100,000)")
    p.add_argument("--baseline-events", type=int, default=10_000, help="of those, the library's")
    p.add_argument("--output-bytes", type=int, default=3, help="each completed attempt's stdout")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument("--rate", type=float, default=200.0, help="live load, tasks/s (200)")
    p.add_argument("--seconds", type=float, default=10.0, help="of load per follower kind (10)")
    p.add_argument("--writers", type=int, default=4, help="writer threads (4)")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.baseline_events, args.rounds, args.seconds = 5_000, 500, 1, 2.0
    parts = args.parts.split(",")
    run = Run(NAME, argv)
    rebuilds: dict[str, list[float]] = {}
    live: dict[str, list[tuple[list[float], float]]] = {}
    with temporary_database(args.database_url) as url:
        header = run.header(url)
        eprint(f"{NAME}: {header}")
        env = postgres_env(url, schema=SCHEMA, pool_size=args.writers, max_overflow=args.writers)
        ledger = TimedLedger(env)
        try:
            history = write_history(ledger, url, args.events, eprint, args.output_bytes)
            for round_ in range(args.rounds if "rebuild" in parts else 0):
                for name in all_projections():
                    rebuilds.setdefault(name, []).append(time_rebuild(url, name, history.events))
                rate = baseline_rebuild(env, url, min(args.baseline_events, history.events))
                rebuilds.setdefault(BASELINE, []).append(rate)
                eprint(f"  round {round_ + 1} rebuild: " + _last(rebuilds, "events/s"))
            for round_ in range(args.rounds if "lag" in parts else 0):
                for name, figures in live_round(url, env, ledger, args).items():
                    live.setdefault(name, []).append(figures)
                said = {k: [percentile(v[-1][0], 0.99) or 0.0] for k, v in live.items()}
                eprint(f"  round {round_ + 1} lag: " + _last(said, "ms p99"))
            if live:
                check_views(url)
        finally:
            ledger.close()
    lines = [f"# {NAME}: {header}", ""]
    if rebuilds:
        base = median(rebuilds[BASELINE]) or 1.0
        lines += [
            f"Rebuild: {history.events:,} events of {history.tasks:,} tasks, stdout of"
            f" {history.output_bytes:,} bytes per completed attempt (events table"
            f" {history.table_bytes / 2**20:,.1f} MiB), {args.rounds} rounds; baseline:"
            f" eventsourcing's ProjectionRunner, 1 event per transaction, first"
            f" {args.baseline_events:,} events.",
            "",
            markdown_table(
                ["view", "events/s", "vs baseline", f">= {TARGET_REBUILD:,}/s?"],
                [
                    [
                        name,
                        over_rounds(rates, 0),
                        f"{(median(rates) or 0) / base:.1f}x",
                        "-" if name == BASELINE else _yes(median(rates), TARGET_REBUILD, True),
                    ]
                    for name, rates in rebuilds.items()
                ],
            ),
            "",
        ]
    if live:
        rows = []
        base_p99 = percentile([x for lag, _ in live[BASELINE] for x in lag], 0.99) or 0.0
        for name, rounds in live.items():
            pooled = [x for lag, _ in rounds for x in lag]
            p99 = percentile(pooled, 0.99) or 0.0
            trend = statistics.median(t for _, t in rounds)
            rows.append(
                [
                    name,
                    f"{len(pooled):,}",
                    num(percentile(pooled, 0.5)),
                    num(p99),
                    num(max(pooled)),
                    f"{trend:+,.0f}" + (" (falling behind)" if trend > FALLING_BEHIND else ""),
                    "-" if name == BASELINE else f"{base_p99 / p99:,.1f}x",
                    "-" if name == BASELINE else _yes(p99, TARGET_LAG_P99, False),
                ]
            )
        lines += [
            f"Live lag: {args.rate:g} tasks/s (4 events in 3 saves each) from {args.writers}"
            f" writer threads, {args.seconds:g} s per follower kind over {args.rounds} rounds;"
            " lag = a commit to the follower's commit at or past it. A follower falling"
            " behind has a lag that grows with --seconds.",
            "",
            markdown_table(
                [
                    "follower",
                    "commits",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "trend ms/s",
                    "baseline p99 / p99",
                    f"p99 <= {TARGET_LAG_P99:g} ms?",
                ],
                rows,
            ),
            "",
        ]
    print("\n".join([*lines, run.footer()]))
    run.keep({"settings": vars(args), "rebuild": rebuilds, "lag_ms": live}, args.no_json)
    return 0


def _last(figures: dict[str, list[float]], unit: str) -> str:
    return ", ".join(f"{name} {values[-1]:,.1f} {unit}" for name, values in figures.items())


def _yes(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "-"
    return "yes" if (value >= target if at_least else value <= target) else "NO"
