"""The HTTP API's request rate: ``POST /api/tasks`` and ``GET /api/tasks/{id}`` against a
real ``taskledger api`` process, beside ``GET /healthz`` (no key, no database) as the
ceiling of this client and server.

``python -m bench api_requests [--concurrency 32] [--seconds 10] [--rounds 3] [--quick]
[--broker-url memory://]``. A fresh database and queues of its own; no workers, so tasks
stay Pending. Each scenario runs in interleaved rounds, closed loop: ``--concurrency``
keep-alive connections of the raw client (bench/http.py), one request in flight each.
Any other status or a transport failure is an error; at the end every 201 must be a
TaskSubmitted in the log. CPU in % of one core per consumer (bench/cpu.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import orjson
import psycopg
from psycopg import sql

from bench.cpu import CpuMeter
from bench.http import ProtocolError, RawConnection, request
from bench.processes import HOST, ManagedProcess, free_port, taskledger_env, tool, wait_ready
from bench.report import (
    Run,
    eprint,
    markdown_table,
    median,
    ms,
    num,
    over_rounds,
    parser,
    percentile,
)
from bench.services import delete_queues, reachable, temporary_database
from ledger.log import EVENTS_TABLE

NAME = "api_requests"
TASK = orjson.dumps({"language": "echo", "data": {"n": 1}})
# name -> (the status a success gets, its label)
SCENARIOS = {
    "healthz": (200, "GET /healthz (baseline)"),
    "post": (201, "POST /api/tasks"),
    "get": (200, "GET /api/tasks/{id}"),
}
FAILURES = (OSError, EOFError, ProtocolError, ValueError, TimeoutError)
CPU = ("client", "server", "PostgreSQL", "RabbitMQ", "other")


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.failures: Counter[str] = Counter()


async def drive(
    port: int, wires: Sequence[bytes], connections: int, seconds: float, tally: Tally
) -> float:
    """Every connection sends the requests in turn for `seconds`; the time it took."""
    started = time.perf_counter()
    deadline = started + seconds

    async def lane(first: int) -> None:
        conn = RawConnection(port)
        i = first
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(conn.send(wires[i % len(wires)]), 30)
                except FAILURES as error:
                    tally.failures[type(error).__name__] += 1
                    await asyncio.sleep(0.01)  # a dead server is not hammered
                    continue
                finally:
                    i += connections
                tally.latencies.append(time.perf_counter() - sent)
                tally.statuses[status] += 1
        finally:
            conn.drop()

    await asyncio.gather(*(lane(i) for i in range(connections)))
    return time.perf_counter() - started


async def create_tasks(port: int, key: str, count: int) -> list[str]:
    """`count` tasks through the API, one connection; their ids."""
    conn = RawConnection(port)
    try:
        answers = [
            await conn.call("POST", "/api/tasks", key, {"language": "echo"}) for _ in range(count)
        ]
    finally:
        conn.drop()
    return [str(task["id"]) for status, task in answers if status == 201]


def submitted(url: str, schema: str) -> int:
    query = "SELECT count(*) FROM {} WHERE topic LIKE '%TaskSubmitted'"
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.SQL(query).format(sql.Identifier(schema, EVENTS_TABLE)))
        return int(row.fetchone()[0])  # type: ignore[index]


def main(argv: Sequence[str]) -> int:
    p = parser(NAME, __doc__, broker=True)
    p.add_argument("--concurrency", type=int, default=32, help="connections (32)")
    p.add_argument("--seconds", type=float, default=10.0, help="per scenario and round (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each (2)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="a subset of the default")
    p.add_argument("--ids", type=int, default=1_000, help="tasks the get scenario reads (1000)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds, args.ids = 1.0, 0.3, 1, 100
    scenarios = args.scenarios.split(",")
    amqp = not args.broker_url.startswith("memory:")
    problem = reachable(args.broker_url, 5672) if amqp else None
    if problem is not None:
        raise SystemExit(f"{NAME}: RabbitMQ: {problem}; start it or pass --broker-url memory://")
    run = Run(NAME, argv)
    key, schema, port = secrets.token_hex(16), f"bench_{secrets.token_hex(4)}", free_port()
    phases: dict[str, list[tuple[float, Tally, dict[str, float]]]] = {}
    created = 0
    with (
        temporary_database(args.database_url) as url,
        tempfile.TemporaryDirectory(prefix="taskledger-bench-api-") as tmp,
    ):
        header = run.header(url)
        eprint(f"{NAME}: {header}")
        env = taskledger_env(url, args.broker_url, key, Path(tmp), DATABASE_SCHEMA=schema)
        command = [tool("taskledger"), "api", "--host", HOST, "--port", str(port)]
        server = ManagedProcess("api", command, env, Path(tmp)).start()
        try:
            eprint(f"  taskledger api ready in {wait_ready(server, f'http://{HOST}:{port}'):.1f} s")
            meter = CpuMeter({"server": server.pid}, url)
            with asyncio.Runner() as loop:
                ids = loop.run(create_tasks(port, key, args.ids))
                created += len(ids)
                wires = {
                    "healthz": [request("GET", "/healthz")],
                    "post": [request("POST", "/api/tasks", key=key, body=TASK)],
                    "get": [request("GET", f"/api/tasks/{i}", key=key) for i in ids],
                }
                for round_ in range(args.rounds):
                    for name in scenarios:
                        if round_ == 0 and args.warmup > 0:
                            warm = Tally()
                            loop.run(drive(port, wires[name], args.concurrency, args.warmup, warm))
                            created += warm.statuses[201]
                        tally = Tally()
                        before = meter.mark()
                        took = loop.run(
                            drive(port, wires[name], args.concurrency, args.seconds, tally)
                        )
                        cpu = CpuMeter.spent(before, meter.mark())
                        created += tally.statuses[201]
                        phases.setdefault(name, []).append((took, tally, cpu))
                        eprint(
                            f"  round {round_ + 1} {name}: {len(tally.latencies) / took:,.0f} req/s"
                        )
            stored = submitted(url, schema)
        finally:
            stopped = server.stop()
            if amqp:
                with contextlib.suppress(Exception), asyncio.Runner() as loop:
                    loop.run(
                        asyncio.wait_for(delete_queues(args.broker_url, f"taskledger.{schema}"), 20)
                    )
    table, raw = [], []
    ceiling = median([len(t.latencies) / s for s, t, _ in phases.get("healthz", [])])
    for name, rounds in phases.items():
        expected, label = SCENARIOS[name]
        rates = [len(t.latencies) / s for s, t, _ in rounds]
        latencies = [x for _, t, _ in rounds for x in t.latencies]
        q = {k: percentile(latencies, f) for k, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        errors = sum(n for _, t, _ in rounds for s, n in t.statuses.items() if s != expected)
        errors += sum(n for _, t, _ in rounds for n in t.failures.values())
        cpu = {k: statistics.median(100 * c.get(k, 0.0) / s for s, _, c in rounds) for k in CPU}
        requests = sum(len(t.latencies) for _, t, _ in rounds)
        server_ms = ms(sum(c["server"] for *_, c in rounds) / requests) if requests else None
        rate = median(rates)
        raw.append(
            {"scenario": name, "rates": rates, "quantiles": q, "errors": errors, "cpu_pct": cpu}
        )
        table.append(
            [label, over_rounds(rates, 0), f"{rate / ceiling:.2f}" if ceiling and rate else "-"]
            + [num(ms(q[k] or 0.0)) for k in ("p50", "p90", "p99")]
            + [str(errors), *(f"{cpu[k]:.0f}%" for k in CPU), num(server_ms)]
        )
    notes = []
    if stored != created:
        notes.append(
            f"CHECK FAILED: the API answered 201 {created} times;"
            f" the log has {stored} TaskSubmitted."
        )
    if stopped.how != "SIGTERM" or stopped.leftovers_killed:
        notes.append(f"The server's stop: {stopped}.")
    headers = ["scenario", "req/s", "vs healthz", "p50 ms", "p90 ms", "p99 ms", "errors"]
    headers += [f"{k} CPU" for k in CPU] + ["server CPU ms/req"]
    print(
        f"# {NAME}: {header}\n\n`taskledger api`, broker {'RabbitMQ' if amqp else 'memory://'};"
        f" {args.concurrency} connections, one request in flight each, {args.seconds:g} s per"
        f" row and round after {args.warmup:g} s warm-up, {args.rounds} interleaved rounds;"
        " req/s median [range] over rounds, latency over all; CPU median over rounds, % of one"
        " core.\n\n" + markdown_table(headers, table) + "\n\n" + "\n".join([*notes, run.footer()])
    )
    run.keep(
        {"settings": vars(args), "rows": raw, "created": created, "stored": stored}, args.no_json
    )
    return 1 if notes and notes[0].startswith("CHECK") else 0
