"""taskledger under a steady load for minutes on end: does anything grow?

``python -m bench soak [--minutes 10] [--rate N] [--fraction 0.7] [--quick]``: a real
``taskledger api`` and ``taskledger worker`` as the comparison runs them
(bench/systems/taskledger.py: RabbitMQ, a throwaway database, a schema of its own). Unless
``--rate`` is given, the throughput of the soak's own task (a python task running
``NOOP_CODE``) and requests is measured first, closed loop on as many connections, each
submitting the next task once its last one ended. Then tasks arrive open loop (Poisson)
at ``--fraction`` of that rate for ``--minutes``, each one's round trip (submit ->
terminal status, long-polled with ``?wait=``) timed from when it was due, so that a wait
for a free client connection counts.
Every 10 s: the RSS of each process and of its long-lived children, its TCP connections by
peer, and PostgreSQL's backends on the database. Printed: one row per minute and one
verdict line per series; exit 1 when something grows, a request failed or an accepted
task did not end. docs/performance.md ("Soak") says how the verdict is made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg

from bench.cpu import BENCH_APPLICATION
from bench.http import ProtocolError, RawConnection, request
from bench.report import Run, eprint, markdown_table, median, num, parser, percentile
from bench.services import require_broker, temporary_database
from bench.systems import NOOP_CODE
from bench.systems.taskledger import TERMINAL, ApiError, Taskledger, python_task

NAME = "soak"
SAMPLE_SECONDS = 10.0  # between two samples of the processes
LATENCY_WINDOW = 20.0  # seconds of arrivals per point of the p99 trend
TRANSIENT_SECONDS = 2.0  # a child younger than this is a program's run, not a zygote
IDLE_SECONDS = 4.0  # a connection idle longer is reopened: uvicorn closes them after 5 s
DRAIN_SECONDS = 60.0  # how long tasks still in flight are waited for after the load
MIB = 1024 * 1024
# The thresholds of the verdict (`judge`; docs/performance.md, "Soak"), per series:
RSS_MIB_PER_HOUR = 10.0  # per process, and per process's children together
RSS_MIB_PER_WINDOW = 1.0  # and at least this across the window: a pymalloc arena (3.10+)
CONNECTIONS_PER_WINDOW = 2.0  # rise across the judged window: more than one pool step
BACKLOG_SECONDS = 2.0  # rise of tasks in flight across the judged window, in arrivals
P99_PER_WINDOW = 0.5  # rise across the judged window, as a fraction of the median p99
PEERS = ("pg", "amqp", "http")  # PostgreSQL, RabbitMQ, the benchmark's HTTP client
NOT_COMPLETED = "ended, not Completed"
FAILURES = (ApiError, OSError, EOFError, ProtocolError, TimeoutError, ValueError)


@dataclass
class Trip:
    """One task of the load: when it was due, when the client saw its end, how."""

    due: float  # seconds since the load started
    ended: float | None = None
    ok: bool = False  # ended Completed
    error: str | None = None

    @property
    def latency_ms(self) -> float | None:
        return None if self.ended is None or not self.ok else 1000 * (self.ended - self.due)


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mib: dict[str, float]  # "api", "worker", "worker children" (long-lived ones)
    children: dict[str, list[int]]  # role -> [long-lived, transient] live descendants
    tcp: dict[str, dict[str, int]]  # role -> peer (PEERS, "other") -> count
    fds: dict[str, int]  # role -> open file descriptors of the process itself
    backends: dict[str, int]  # application_name -> PostgreSQL backends on the database
    missing: list[str] = field(default_factory=list)  # roles whose process is gone


class Probe:
    """Samples the taskledger processes and PostgreSQL's view of them."""

    def __init__(self, pids: dict[str, int], database_url: str, broker_url: str, port: int):
        self.processes = {role: psutil.Process(pid) for role, pid in pids.items()}
        self.peers = {
            urlsplit(database_url).port or 5432: "pg",
            urlsplit(broker_url).port or 5672: "amqp",
        }
        self.port = port
        self.conn = psycopg.connect(  # one connection for the whole run: no churn
            database_url, autocommit=True, connect_timeout=5, application_name=BENCH_APPLICATION
        )

    def close(self) -> None:
        self.conn.close()

    def _peer(self, conn: Any) -> str:
        if conn.laddr and conn.laddr.port == self.port:  # the client's; one not closed: other
            return "http" if conn.status == psutil.CONN_ESTABLISHED else "other"
        return self.peers.get(conn.raddr.port, "other") if conn.raddr else "other"

    def sample(self, t: float) -> Sample:
        s = Sample(t, {}, {}, {}, {}, {})
        now = time.time()
        for role, process in self.processes.items():
            try:
                tree = [process, *process.children(recursive=True)]
                s.rss_mib[role] = process.memory_info().rss / MIB
                s.fds[role] = process.num_fds()
            except psutil.Error:
                s.missing.append(role)
                continue
            lasting, transient, children_rss = 0, 0, 0
            sockets: dict[tuple[Any, Any], str] = {}  # forked children may share sockets
            for member in tree:
                with contextlib.suppress(psutil.Error):
                    if member is not process:
                        if now - member.create_time() < TRANSIENT_SECONDS:
                            transient += 1
                        else:
                            lasting += 1
                            children_rss += member.memory_info().rss
                    for conn in member.net_connections(kind="tcp"):
                        if conn.status != psutil.CONN_LISTEN:
                            sockets[(conn.laddr, conn.raddr)] = self._peer(conn)
            s.children[role] = [lasting, transient]
            if lasting:
                s.rss_mib[f"{role} children"] = children_rss / MIB
            s.tcp[role] = {
                p: list(sockets.values()).count(p) for p in sorted(set(sockets.values()))
            }
        rows = self.conn.execute(
            "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name IS DISTINCT FROM %s"
            " GROUP BY 1",
            (BENCH_APPLICATION,),
        ).fetchall()
        s.backends = {str(name): int(count) for name, count in rows}
        return s


# -- the load ----------------------------------------------------------------------------


async def connected(port: int, count: int) -> list[RawConnection]:
    conns = [RawConnection(port) for _ in range(count)]
    await asyncio.gather(*(c.send(request("GET", "/healthz")) for c in conns))
    return conns


async def closed_loop(tl: Taskledger, lanes: int, seconds: float) -> tuple[int, float]:
    """The soak's own tasks and requests, closed loop: `lanes` connections, each
    submitting the next task once its last one ended, for `seconds`. The tasks that
    completed, and the seconds until the last one did."""
    body = python_task(NOOP_CODE)
    conns = await connected(tl.port, lanes)
    start = time.perf_counter()
    done = 0

    async def lane(conn: RawConnection) -> None:
        nonlocal done
        while time.perf_counter() - start < seconds:
            trip = await tl.round_trip(conn, body)
            done += trip.ok  # not `done += await ...`: that reads `done` before the wait

    try:
        await asyncio.gather(*(lane(c) for c in conns))
    finally:
        for conn in conns:
            conn.drop()
    return done, time.perf_counter() - start


async def drive(
    tl: Taskledger,
    probe: Probe,
    rate: float,
    seconds: float,
    connections: int,
    rng: random.Random,
) -> tuple[list[Trip], list[Sample], str | None]:
    """Poisson arrivals at `rate` per second for `seconds`, each a round trip on one of
    `connections` keep-alive connections opened beforehand; a sample every
    SAMPLE_SECONDS. The trips, the samples, and why the load stopped early (or None)."""
    body = python_task(NOOP_CODE)
    conns = await connected(tl.port, connections)
    # Last used, first reused: the connections a burst needed and the lull left idle are
    # reopened when next needed rather than sent on after the server closed them.
    pool: asyncio.LifoQueue[tuple[RawConnection, float]] = asyncio.LifoQueue()
    for conn in conns:
        pool.put_nowait((conn, time.monotonic()))
    trips: list[Trip] = []
    samples: list[Sample] = []
    stopped: list[str] = []
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def one(trip: Trip) -> None:
        conn, used = await pool.get()
        if time.monotonic() - used > IDLE_SECONDS:
            conn.drop()  # the next send reconnects
        try:
            result = await tl.round_trip(conn, body)
            trip.ok = result.ok
            if not result.ok:
                trip.error = NOT_COMPLETED
        except FAILURES as error:
            trip.error = f"{type(error).__name__}: {str(error)[:200]}"
        finally:
            trip.ended = clock()
            pool.put_nowait((conn, time.monotonic()))

    async def sampler() -> None:
        for k in range(int(seconds // SAMPLE_SECONDS) + 1):
            await asyncio.sleep(max(0.0, k * SAMPLE_SECONDS - clock()))
            sample = await asyncio.to_thread(probe.sample, clock())
            samples.append(sample)
            if sample.missing:
                stopped.append(f"{', '.join(sample.missing)} exited at {sample.t:.0f} s")
                return

    sampling = asyncio.create_task(sampler())
    running: set[asyncio.Task[None]] = set()
    due = rng.expovariate(rate)
    while due < seconds and not stopped:
        await asyncio.sleep(max(0.0, due - clock()))
        trip = Trip(due)
        trips.append(trip)
        task = asyncio.create_task(one(trip))
        running.add(task)
        task.add_done_callback(running.discard)
        due += rng.expovariate(rate)
    if running:
        _, late = await asyncio.wait(set(running), timeout=DRAIN_SECONDS)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for trip in trips:
            if not trip.ok and trip.error is None:  # cancelled
                trip.error = f"no end {DRAIN_SECONDS:g} s after the load stopped"
    await sampling
    for conn in conns:
        conn.drop()
    return trips, samples, stopped[0] if stopped else None


# -- the trends ----------------------------------------------------------------------------


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares slope of value on time and its standard error; None with fewer
    than 3 points or a single time."""
    n = len(points)
    if n < 3:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in points)
    return slope, math.sqrt(residual / (n - 2) / sxx)


@dataclass
class Trend:
    series: str
    unit: str
    points: int
    threshold_h: float  # per hour
    slope_h: float | None = None
    se_h: float | None = None
    late_slope_h: float | None = None  # over the second half of the judged window
    level: float | None = None  # the median value over the judged window
    window_s: float = 0.0  # from the first judged point to the last
    verdict: str = "too few points"  # or "flat", "grows", "unclear"

    def line(self) -> str:
        if self.slope_h is None or self.se_h is None:
            return f"- {self.series}: {self.verdict} ({self.points} points after the warm-up)"
        late = "-" if self.late_slope_h is None else _signed(self.late_slope_h)
        rise = self.slope_h * self.window_s / 3600
        return (
            f"- {self.series}: **{self.verdict}**: {_signed(self.slope_h)} ±"
            f" {num(2 * self.se_h)} {self.unit}/h, i.e. {_signed(rise)} {self.unit} across the"
            f" judged {self.window_s:.0f} s (second half {late}/h); threshold"
            f" {num(self.threshold_h)} {self.unit}/h; median {num(self.level)} {self.unit}"
        )


def _signed(value: float) -> str:
    return ("-" if value < 0 else "+") + num(abs(value))


def judge(
    series: str, unit: str, points: Sequence[tuple[float, float]], threshold_h: float
) -> Trend:
    """`points` (seconds, value) of the judged window, a line fitted through them and
    through their second half. "flat" when the line's slope, or the second half's, is
    below `threshold_h` per hour by more than twice its standard error (a warm-up that
    levels off is not growth); else "grows" when it is above the threshold and above 0 by
    more than twice its standard error, and the second half still rises at half that pace;
    else "unclear": the noise is too large to tell in this window."""
    trend = Trend(series, unit, len(points), threshold_h)
    whole = fit(points)
    if whole is None:
        return trend
    slope, se = trend.slope_h, trend.se_h = whole[0] * 3600, whole[1] * 3600
    trend.level = median([y for _, y in points])
    trend.window_s = points[-1][0] - points[0][0]
    late = fit(points[len(points) // 2 :])
    late_slope, late_se = (None, None) if late is None else (late[0] * 3600, late[1] * 3600)
    trend.late_slope_h = late_slope
    if slope + 2 * se <= threshold_h or (
        late_slope is not None and late_se is not None and late_slope + 2 * late_se <= threshold_h
    ):
        trend.verdict = "flat"
    elif (
        slope > threshold_h
        and slope - 2 * se > 0
        and (late_slope is None or late_slope > threshold_h / 2)
    ):
        trend.verdict = "grows"
    else:
        trend.verdict = "unclear"
    return trend


def latency_points(trips: Sequence[Trip], since: float, until: float) -> list[tuple[float, float]]:
    """p99 of the round trips due in each LATENCY_WINDOW from `since`, at the window's
    middle."""
    points = []
    start = since
    while start + LATENCY_WINDOW <= until + 1e-9:
        window = [
            t.latency_ms
            for t in trips
            if t.latency_ms is not None and start <= t.due < start + LATENCY_WINDOW
        ]
        p99 = percentile(window, 0.99)
        if p99 is not None:
            points.append((start + LATENCY_WINDOW / 2, p99))
        start += LATENCY_WINDOW
    return points


def in_flight(trips: Sequence[Trip], t: float) -> int:
    """Tasks due by `t` whose end the client had not seen by then."""
    return sum(1 for trip in trips if trip.due <= t and (trip.ended is None or trip.ended > t))


def connections(sample: Sample, role: str) -> int:
    """The TCP connections of `role` the verdict judges: all but the client's open ones,
    which follow its bursts (at most --connections; the server closes them after 5 s
    idle). One the server did not close (CLOSE_WAIT, ...) counts."""
    return sum(n for peer, n in sample.tcp.get(role, {}).items() if peer != "http")


def trends(
    trips: Sequence[Trip], samples: Sequence[Sample], warmup: float, seconds: float, rate: float
) -> list[Trend]:
    judged = [s for s in samples if s.t >= warmup - 1e-6]
    hours = (judged[-1].t - judged[0].t) / 3600 if len(judged) > 1 else 0.0
    per_window = 1 / hours if hours else math.inf  # a rise across the window, per hour
    result = []
    for name in dict.fromkeys(k for s in judged for k in s.rss_mib):
        points = [(s.t, s.rss_mib[name]) for s in judged if name in s.rss_mib]
        threshold = max(RSS_MIB_PER_HOUR, RSS_MIB_PER_WINDOW * per_window)
        result.append(judge(f"{name} RSS", "MiB", points, threshold))
    for role in dict.fromkeys(r for s in judged for r in s.tcp):
        points = [(s.t, float(connections(s, role))) for s in judged if role in s.tcp]
        threshold = CONNECTIONS_PER_WINDOW * per_window
        result.append(judge(f"{role} TCP connections (pg+amqp+other)", "conn", points, threshold))
    backends = [(s.t, float(sum(s.backends.values()))) for s in judged]
    result.append(
        judge("PostgreSQL backends", "conn", backends, CONNECTIONS_PER_WINDOW * per_window)
    )
    backlog = [(s.t, float(in_flight(trips, s.t))) for s in judged]
    threshold = BACKLOG_SECONDS * rate * per_window
    result.append(judge("tasks in flight", "tasks", backlog, threshold))
    p99 = latency_points(trips, warmup, seconds)
    level = median([v for _, v in p99]) or 0.0
    result.append(judge("round trip p99", "ms", p99, P99_PER_WINDOW * level * per_window))
    return result


# -- the table -----------------------------------------------------------------------------


def _tcp(samples: Sequence[Sample], role: str) -> str:
    """pg/amqp/http connections of `role` in the sample with the most of them."""
    if not samples:
        return "-"
    top = max(samples, key=lambda s: sum(s.tcp.get(role, {}).values())).tcp.get(role, {})
    text = "/".join(str(top.get(p, 0)) for p in PEERS)
    return text + (f" +{top['other']}" if top.get("other") else "")


def minute_rows(
    trips: Sequence[Trip], samples: Sequence[Sample], seconds: float
) -> tuple[list[str], list[list[str]]]:
    """One row per minute (and a row 0: the sample before the load): tasks due, ended,
    failed, in flight at its end, latency, and the highest of its samples' figures."""
    names = list(dict.fromkeys(k for s in samples for k in s.rss_mib))
    roles = list(dict.fromkeys(r for s in samples for r in s.tcp))
    headers = ["min", "tasks due", "ended", "errors", "in flight", "p50 ms", "p99 ms"]
    headers += [f"{n} MiB" for n in names] + [f"{r} TCP pg/amqp/http" for r in roles]
    headers += ["PG backends"]
    rows = []
    for minute in range(math.ceil(seconds / 60) + 1):
        lo, hi = 60.0 * (minute - 1), min(60.0 * minute, seconds)
        mine = [s for s in samples if (lo < s.t <= hi if minute else s.t <= 0.5)]
        due = [t for t in trips if lo <= t.due < hi]
        ended = [t for t in trips if t.ended is not None and lo <= t.ended < hi]
        flying = in_flight(trips, hi)
        latencies = [t.latency_ms for t in due if t.latency_ms is not None]
        row = [str(minute), str(len(due)), str(len(ended))]
        row += [str(sum(1 for t in due if t.error)), str(flying) if minute else "-"]
        row += [num(percentile(latencies, q)) for q in (0.5, 0.99)]
        for name in names:
            values = [s.rss_mib[name] for s in mine if name in s.rss_mib]
            row.append(num(max(values), 1) if values else "-")
        for role in roles:
            row.append(_tcp(mine, role))
        row.append(str(max((sum(s.backends.values()) for s in mine), default=0)) if mine else "-")
        rows.append(row)
    return headers, rows


# -- the run -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser(NAME, __doc__, rounds=False, broker=True)
    p.add_argument("--minutes", type=float, default=10.0, help="of load (10; 1 with --quick)")
    p.add_argument("--rate", type=float, help="tasks/s; default: --fraction of the measured")
    p.add_argument("--fraction", type=float, default=0.7, help="of the measured rate (0.7)")
    p.add_argument(
        "--calibration-seconds", type=float, help="of the rate's measurement (20; 5 quick)"
    )
    p.add_argument("--warmup", type=float, help="seconds left out of the verdict (60; 20 quick)")
    p.add_argument("--concurrency", type=int, default=2, help="taskledger worker --concurrency")
    p.add_argument("--connections", type=int, default=16, help="the client's HTTP connections")
    p.add_argument("--seed", type=int, default=18, help="of the Poisson arrivals (18)")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes = 1.0 if "--minutes" not in argv else args.minutes
    args.calibration_seconds = args.calibration_seconds or (5.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else 20.0 if args.quick else 60.0
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_broker(NAME, args.broker_url)
    run = Run(NAME, argv)
    seconds = args.minutes * 60
    calibration: dict[str, Any] = {}
    notes: list[str] = []
    try:
        with (
            temporary_database(args.database_url) as url,
            tempfile.TemporaryDirectory(prefix="taskledger-bench-soak-") as tmp,
        ):
            header = run.header(url)
            eprint(f"{NAME}: {header}")
            tl = Taskledger(
                url, args.broker_url, args.concurrency, args.connections, Path(tmp), eprint
            )
            try:
                tl.start()
                probe = Probe(tl.processes(), url, args.broker_url, tl.port)
                try:
                    with asyncio.Runner() as loop:
                        rate = args.rate
                        if rate is None:
                            done, took = loop.run(
                                closed_loop(tl, args.connections, args.calibration_seconds)
                            )
                            calibration = {"tasks": done, "seconds": took, "rate": done / took}
                            rate = args.fraction * calibration["rate"]
                            if args.quick:
                                rate = min(rate, 5.0)
                            eprint(
                                f"  measured {done / took:.1f} tasks/s ({done} in {took:.1f} s,"
                                f" closed loop); the soak runs at {rate:.1f}/s"
                            )
                        eprint(f"  {args.minutes:g} min at {rate:.1f} tasks/s ...")
                        trips, samples, stopped = loop.run(
                            drive(
                                tl, probe, rate, seconds, args.connections, random.Random(args.seed)
                            )
                        )
                finally:
                    probe.close()
                if stopped:
                    notes.append(f"FAILED: the load stopped early: {stopped}.")
                try:
                    counts = tl.settled_counts()
                except (TimeoutError, ApiError, OSError) as error:
                    counts = {}
                    notes.append(f"FAILED: the tasks did not settle: {error}.")
                facts = tl.facts()
            finally:
                tl.close()
    except KeyboardInterrupt:
        eprint(f"{NAME}: interrupted; every process stopped, the database dropped")
        return 130
    return report(run, args, header, rate, calibration, trips, samples, counts, facts, notes)


def report(
    run: Run,
    args: argparse.Namespace,
    header: str,
    rate: float,
    calibration: dict[str, Any],
    trips: list[Trip],
    samples: list[Sample],
    counts: dict[str, int],
    facts: dict[str, Any],
    notes: list[str],
) -> int:
    seconds = min(args.minutes * 60, samples[-1].t + SAMPLE_SECONDS) if samples else 0.0
    found = trends(trips, samples, args.warmup, seconds, rate)
    headers, rows = minute_rows(trips, samples, seconds)
    errors = [t.error for t in trips if t.error]
    seen = sum(1 for t in trips if t.ok or t.error == NOT_COMPLETED)
    ended = sum(counts.get(s, 0) for s in TERMINAL)
    open_ = sum(counts.values()) - ended
    if counts:
        said = ", ".join(f"{counts[s]} {s}" for s in TERMINAL if counts.get(s))
        notes.append(
            f"{'CHECK FAILED: ' if open_ else ''}{ended} of the {sum(counts.values())} tasks in"
            f" the log are terminal ({said}; {open_} not), once the views caught up: the"
            f" soak's {len(trips)} (of which the client saw {seen} end), the calibration's"
            f" {calibration.get('tasks', 0)} and the readiness check's."
        )
    if errors:
        common = ", ".join(f"{n}× {e}" for e, n in Counter(errors).most_common(3))  # noqa: RUF001
        notes.append(f"FAILED: {len(errors)} of {len(trips)} round trips failed ({common}).")
    growing = [t.series for t in found if t.verdict == "grows"]
    unclear = [t.series for t in found if t.verdict in ("unclear", "too few points")]
    if growing:
        verdict = f"grows: {', '.join(growing)}"
    elif unclear:
        verdict = f"unclear: {', '.join(unclear)} (too noisy or too few points to tell: run longer)"
    else:
        verdict = "flat: nothing grows"
    measured = (
        f"measured {calibration['rate']:.1f} tasks/s closed loop on as many connections for"
        f" {calibration['seconds']:.0f} s"
        if calibration
        else "--rate given"
    )
    print(
        f"# {NAME}: {header}\n\n`taskledger api` + `taskledger worker --concurrency"
        f" {args.concurrency}` ({', '.join(facts.get('processes', {}).values())}), RabbitMQ;"
        f" python tasks running `{NOOP_CODE}`, Poisson arrivals at {rate:.1f}/s"
        f" ({measured}; x{args.fraction:g}) for {args.minutes:g} min on {args.connections}"
        f" keep-alive connections, each task long-polled to its end (`?wait=`); latency from"
        f" when the task was due. Per minute: tasks due in it, ended in it, failed, in flight"
        f" at its end, their round trip; the highest of its 10-s samples of RSS (children:"
        f" the long-lived ones, the zygotes), TCP connections by peer, PostgreSQL backends"
        f" on the database. Row 0: before the load.\n\n"
        + markdown_table(headers, rows)
        + f"\n\nTrends after a {args.warmup:g} s warm-up (least squares; ± is twice the standard"
        " error):\n"
        + "\n".join(t.line() for t in found)
        + f"\n\n**Verdict: {verdict}.**\n\n"
        + "\n".join([*notes, run.footer()])
    )
    run.keep(
        {
            "settings": vars(args),
            "rate": rate,
            "calibration": calibration,
            "system": facts,
            "trends": [asdict(t) for t in found],
            "verdict": verdict,
            "counts": counts,
            "notes": notes,
            "samples": [asdict(s) for s in samples],
            "trips": [[t.due, t.ended, t.ok, t.error] for t in trips],
        },
        args.no_json,
    )
    failed = any(n.startswith(("FAILED", "CHECK FAILED")) for n in notes)
    return 1 if growing or failed else 0
