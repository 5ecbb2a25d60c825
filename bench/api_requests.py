"""The HTTP API's request rate: ``POST /api/tasks`` and ``GET /api/tasks/{id}``, against a
real ``taskledger api`` process, next to ``GET /healthz`` as the server's ceiling.

Each run creates a fresh database (dropped at the end, also on failure, Ctrl-C or
SIGTERM) and starts the API as an operator would::

    TASKLEDGER_DATABASE_URL=<fresh db> TASKLEDGER_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/
    TASKLEDGER_API_KEYS=bench:admin:<random 32 chars> TASKLEDGER_LOG_DIR=<temp dir>
    .venv/bin/taskledger api --host 127.0.0.1 --port <free port>

with ``TASKLEDGER_DATABASE_SCHEMA=bench_<random>`` as well when the broker is RabbitMQ:
the queues are named after the schema, so the dispatcher (which ``taskledger api`` runs,
with the reaper and the projections) publishes into queues of this run only, deleted
afterwards, never into a shared ``taskledger.attempts``. With no workers, tasks stay
Pending. The server's stdout (a JSON log line per request) goes to a file in the temp
dir. Measuring starts once ``/readyz`` answers 200; at the end the server gets SIGTERM
(SIGKILL after ``--stop-timeout``), and its process group is checked to be empty. Should
this benchmark itself be killed outright (SIGKILL), the server still gets SIGTERM
(``PR_SET_PDEATHSIG``), but the database and the queues are left behind.

Scenarios (``--scenarios``), each in ``--rounds`` interleaved rounds of ``--seconds``
(per round) measured after ``--warmup`` seconds on the same connections, closed loop with
``--concurrency`` keep-alive connections each with one request in flight:

- ``healthz``: ``GET /healthz`` (no key, no database): the ceiling for this client;
- ``post``: ``POST /api/tasks`` with ``{"language":"echo","data":{"n":1}}`` (201);
- ``get``: ``GET /api/tasks/{id}`` over ``--ids`` tasks created beforehand (200).

Any other status, and any transport failure, counts as an error. Clients (``--clients``):

- ``raw``: a minimal HTTP/1.1 client on asyncio streams in this process (one connection
  per worker, hand-written request bytes, Content-Length or chunked responses): about
  the least CPU a Python client can spend per request, so the server is what is measured;
- ``httpx``: one ``httpx.AsyncClient`` with limits sized to the concurrency;
- ``httpx-per-worker`` (not run by default): one ``httpx.AsyncClient`` with one
  connection per worker, which avoids httpcore's per-request scan of the whole pool.

The client shares the host's cores with the server and PostgreSQL, so every row reports
the CPU (in % of one core) of this process (the client), the server process, the host's
PostgreSQL processes, RabbitMQ (``beam.smp``), and everything else. A sampler thread
reads ``pg_stat_activity`` and ``pg_locks`` every ``--sample-interval`` seconds: the mean
number of this database's busy backends by state, and who holds the events table's
EXCLUSIVE lock (which eventsourcing takes for every insert) and what it is doing.

After the rounds, with ``py-spy`` and ``--profile-seconds`` > 0, the server is profiled
during a POST load (raw client): once with ``--gil`` (where its Python CPU goes) and once
with ``--idle`` (where its request threads spend their wall time). Both profiles are
summarised here and kept as speedscope files beside the JSON.

The tasks' default TTL is 300 s: in runs longer than that, the reaper expires the first
tasks while later rows are measured; the run reports it if it happened.

Run: ``.venv/bin/python -m bench --only api_requests [--concurrency 32] [--seconds 10]
[--rounds 3] [--clients raw,httpx] [--broker-url memory://]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import psutil
import psycopg
from psycopg import sql

from bench._processes import ManagedProcess
from bench._support import (
    RESULTS_DIR,
    MachineFacts,
    benchmark_parser,
    eprint,
    git,
    machine_facts,
    markdown_table,
    percentile,
    temporary_database,
    write_results,
)
from bench.ledger_writes import postgres_cpu_seconds
from bench.projections import host_busy_seconds
from ledger.application import EVENTS_TABLE

NAME = "api_requests"
SUMMARY = "requests/s of POST /api/tasks and GET /api/tasks/{id} against `taskledger api`"

HOST = "127.0.0.1"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
TASK_BODY = b'{"language":"echo","data":{"n":1}}'
REQUEST_TIMEOUT = 30.0  # a request still unanswered this long after the phase ends: failed
FAILURE_PAUSE = 0.01  # after a transport failure, so a dead server is not hammered


# -- requests and scenarios ----------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    wire: bytes  # the whole request as the raw client sends it

    @classmethod
    def build(
        cls,
        method: str,
        path: str,
        *,
        key: str | None = None,
        body: bytes | None = None,
        host: str = HOST,
    ) -> HttpRequest:
        headers: list[tuple[str, str]] = []
        if key is not None:
            headers.append(("Authorization", f"ApiKey {key}"))
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        wire = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")
        return cls(method, path, tuple(headers), body, wire)


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    expected: int  # the status a successful request gets

    def requests(self, key: str, ids: Sequence[str]) -> list[HttpRequest]:
        if self.name == "healthz":
            return [HttpRequest.build("GET", "/healthz")]
        if self.name == "post":
            return [HttpRequest.build("POST", "/api/tasks", key=key, body=TASK_BODY)]
        if not ids:
            raise ValueError("the get scenario needs task ids")
        return [HttpRequest.build("GET", f"/api/tasks/{task_id}", key=key) for task_id in ids]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("healthz", "GET /healthz (baseline)", 200),
        Scenario("post", "POST /api/tasks", 201),
        Scenario("get", "GET /api/tasks/{id}", 200),
    )
}


# -- clients -------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The server's response is not HTTP/1.1 this client understands."""


class Connection(Protocol):
    async def send(self, request: HttpRequest) -> tuple[int, bytes]: ...


class Client(Protocol):
    def connection(self) -> Connection: ...

    async def aclose(self) -> None: ...


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """Status, Content-Length, chunked?, close after? of a response head."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    status = int(rest[:3])
    length: int | None = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += (await reader.readexactly(size + 2))[:-2]


class RawConnection:
    """One keep-alive HTTP/1.1 connection, one request at a time; reconnects when needed."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, request: HttpRequest) -> tuple[int, bytes]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        try:
            writer.write(request.wire)
            status, length, chunked, close = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            if length is not None:
                body = await reader.readexactly(length) if length else b""
            elif chunked:
                body = await _read_chunked(reader)
            else:
                raise ProtocolError("a response with neither Content-Length nor chunks")
        except BaseException:
            self.drop()  # a half-read response leaves the connection unusable
            raise
        if close:
            self.drop()
        return status, body

    def drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class RawClient:
    def __init__(self, host: str, port: int, concurrency: int) -> None:
        self.host = host
        self.port = port
        self._connections: list[RawConnection] = []

    def connection(self) -> Connection:
        connection = RawConnection(self.host, self.port)
        self._connections.append(connection)
        return connection

    async def aclose(self) -> None:
        for connection in self._connections:
            connection.drop()
        await asyncio.sleep(0)  # let the transports close


class HttpxConnection:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(self, request: HttpRequest) -> tuple[int, bytes]:
        response = await self.client.request(
            request.method, request.path, content=request.body, headers=request.headers
        )
        return response.status_code, response.content


def _httpx_client(base_url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=REQUEST_TIMEOUT,
    )


class HttpxClient:
    """One AsyncClient (one pool) shared by all workers, limits sized to the concurrency."""

    def __init__(self, host: str, port: int, concurrency: int) -> None:
        self.client = _httpx_client(f"http://{host}:{port}", concurrency)

    def connection(self) -> Connection:
        return HttpxConnection(self.client)

    async def aclose(self) -> None:
        await self.client.aclose()


class HttpxPerWorkerClient:
    """One AsyncClient with a single connection per worker."""

    def __init__(self, host: str, port: int, concurrency: int) -> None:
        self.base_url = f"http://{host}:{port}"
        self.clients: list[httpx.AsyncClient] = []

    def connection(self) -> Connection:
        client = _httpx_client(self.base_url, 1)
        self.clients.append(client)
        return HttpxConnection(client)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


CLIENTS: dict[str, Callable[[str, int, int], Client]] = {
    "raw": RawClient,
    "httpx": HttpxClient,
    "httpx-per-worker": HttpxPerWorkerClient,
}
DEFAULT_CLIENTS = ("raw", "httpx")


# -- the server process --------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def venv_tool(name: str) -> str | None:
    """`name` next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    return shutil.which(name)


class ApiServer(ManagedProcess):
    """`taskledger api` in its own process group (see bench._processes), its output in
    files of `workdir`; ready once /readyz answers 200."""

    def __init__(
        self, command: list[str], env: dict[str, str], workdir: Path, stop_timeout: float
    ) -> None:
        super().__init__("server", command, env, workdir, stop_timeout=stop_timeout)

    def wait_ready(self, base_url: str, timeout: float) -> float:
        """Poll /readyz until it answers 200; the seconds it took. Raises when the process
        exits or `timeout` passes."""
        started = time.monotonic()
        last = "no answer yet"
        with httpx.Client(base_url=base_url, timeout=2.0) as client:
            while True:
                code = self.returncode()
                if code is not None:
                    raise RuntimeError(
                        f"taskledger api exited with {code} before it was ready\n"
                        + self.output_tail()
                    )
                try:
                    response = client.get("/readyz")
                    if response.status_code == 200:
                        return time.monotonic() - started
                    last = f"{response.status_code} {response.text[:300]}"
                except httpx.HTTPError as error:
                    last = f"{type(error).__name__}: {error}"
                if time.monotonic() - started > timeout:
                    raise TimeoutError(
                        f"taskledger api not ready after {timeout:g} s (last /readyz: {last})\n"
                        + self.output_tail()
                    )
                time.sleep(0.2)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _broker_reachable(url: str) -> str | None:
    """Why the broker at `url` cannot be reached, or None (memory:// always can)."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return None
    try:
        with socket.create_connection((parts.hostname or HOST, parts.port or 5672), timeout=3):
            return None
    except OSError as error:
        return f"cannot reach {parts.hostname}:{parts.port or 5672}: {error}"


async def _rabbitmq(url: str, namespace: str, *, delete: bool) -> int | None:
    """The namespace's queue depth; with `delete`, then its queues and exchange go."""
    from workers.rabbitmq import RabbitMQBroker

    broker = RabbitMQBroker(url, namespace)
    try:
        depth = await broker.queue_depth()
        if delete:
            await broker.delete_all()
        return depth
    finally:
        await broker.close()


# -- what the host does meanwhile ----------------------------------------------------------


def _cpu_times(process: psutil.Process) -> tuple[float, float] | None:
    """(user, system) CPU seconds of `process` (all its threads) so far."""
    try:
        times = process.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(times.user), float(times.system)


def _cpu(process: psutil.Process) -> float | None:
    times = _cpu_times(process)
    return None if times is None else times[0] + times[1]


@dataclass(frozen=True)
class CpuMark:
    client: float
    server: float | None
    server_system: float | None
    postgres: float | None
    broker: float | None
    host: float | None


class CpuProbe:
    """CPU seconds so far of this process, the server, PostgreSQL, RabbitMQ, the host."""

    def __init__(self, server_pid: int, local_postgres: bool, local_broker: bool) -> None:
        self.server = psutil.Process(server_pid)
        self.local_postgres = local_postgres
        self.brokers: list[psutil.Process] = []
        if local_broker:
            for process in psutil.process_iter(["name"]):
                if process.info["name"] == "beam.smp":
                    self.brokers.append(process)

    def mark(self) -> CpuMark:
        brokers = [_cpu(p) for p in self.brokers]
        server = _cpu_times(self.server)
        return CpuMark(
            client=time.process_time(),
            server=None if server is None else server[0] + server[1],
            server_system=None if server is None else server[1],
            postgres=postgres_cpu_seconds() if self.local_postgres else None,
            broker=sum(b for b in brokers if b is not None) if brokers else None,
            host=host_busy_seconds(),
        )


def cpu_shares(before: CpuMark, after: CpuMark, elapsed: float) -> dict[str, float | None]:
    """% of one core over `elapsed`, per consumer; `other` = the host minus the rest."""

    def pct(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not elapsed else 100 * (b - a) / elapsed

    shares = {
        "client": pct(before.client, after.client),
        "server": pct(before.server, after.server),
        "server_system": pct(before.server_system, after.server_system),
        "postgres": pct(before.postgres, after.postgres),
        "broker": pct(before.broker, after.broker),
    }
    host = pct(before.host, after.host)
    known = [v for k, v in shares.items() if v is not None and k != "server_system"]
    shares["other"] = None if host is None else max(0.0, host - sum(known))
    shares["host"] = host
    return {k: None if v is None else round(v, 1) for k, v in shares.items()}


LOCK_FREE = "free"
HOLDER_WAITS_FOR_API = "held, waiting for the API process"
HOLDER_COMMITTING = "held, committing (WAL)"
HOLDER_RUNNING = "held, running SQL"

_SAMPLE_QUERY = """
SELECT a.state, a.wait_event_type, a.wait_event, left(a.query, 60),
       EXISTS (SELECT 1 FROM pg_locks l
               WHERE l.pid = a.pid AND l.locktype = 'relation' AND l.relation = %s
                 AND l.mode = 'ExclusiveLock' AND l.granted)
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND a.backend_type = 'client backend' AND a.state IS DISTINCT FROM 'idle'
"""


def _statement(query: str) -> str:
    words = query.split()
    return words[0].upper() if words else ""


def backend_state(state: str, wait_type: str | None, wait: str | None, query: str) -> str:
    if state.startswith("idle in transaction"):
        return "idle in transaction"
    if state != "active":
        return state
    if wait_type is None:
        return "running"
    if wait_type == "Lock":
        return f"waiting for a lock ({wait})"
    if wait_type == "Client":
        return "active, waiting for the client"
    if wait and wait.startswith("WAL"):
        return "WAL write/sync"
    return f"{wait_type}:{wait}"


def holder_state(state: str, wait_type: str | None, wait: str | None, query: str) -> str:
    """What the backend holding the events table's lock is doing."""
    if state != "active" or wait_type == "Client":
        return HOLDER_WAITS_FOR_API
    if (wait and wait.startswith("WAL")) or _statement(query) == "COMMIT":
        return HOLDER_COMMITTING
    if wait_type is None:
        return HOLDER_RUNNING
    return f"held, waiting ({wait_type}:{wait})"


@dataclass
class PgWindow:
    samples: int
    backends: dict[str, float]  # state -> mean number of backends of this database
    events_lock: dict[str, float]  # lock holder's state -> share of samples (%)


class PgSampler:
    """A thread sampling this database's backends and the events table's lock holder."""

    def __init__(self, url: str, relation: str, interval: float) -> None:
        self.url = url
        self.relation = relation
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples = 0
        self._backends: Counter[str] = Counter()
        self._holder: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="pg-sampler", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("SELECT to_regclass(%s)::oid", (self.relation,)).fetchone()
                oid = row[0] if row else None
                while not self._stop.wait(self.interval):
                    rows = conn.execute(_SAMPLE_QUERY, (oid,)).fetchall()
                    states = Counter(backend_state(*r[:4]) for r in rows)
                    holders = [holder_state(*r[:4]) for r in rows if r[4]]
                    with self._lock:
                        self._samples += 1
                        self._backends.update(states)
                        self._holder[holders[0] if holders else LOCK_FREE] += 1
        except Exception as error:  # noqa: BLE001 -- reported with the results
            self.error = error

    def take(self) -> PgWindow:
        """What was sampled since the last take (and start afresh)."""
        with self._lock:
            samples, backends, holder = self._samples, self._backends, self._holder
            self._samples, self._backends, self._holder = 0, Counter(), Counter()
        n = max(samples, 1)
        return PgWindow(
            samples,
            {k: round(v / n, 2) for k, v in backends.most_common()},
            {k: round(100 * v / n, 1) for k, v in holder.most_common()},
        )


# -- running a phase -----------------------------------------------------------------------


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    bodies: list[bytes] | None = None  # kept when asked (to learn the ids created)


_FAILURES = (OSError, EOFError, ProtocolError, httpx.HTTPError, ValueError)


async def _worker(
    connection: Connection,
    requests: Sequence[HttpRequest],
    first: int,
    step: int,
    deadline: float,
    tally: Tally,
) -> float:
    """Requests until `deadline`; the time the last one finished."""
    i = first
    n = len(requests)
    finished = time.perf_counter()
    while finished < deadline:
        request = requests[i % n]
        i += step
        started = time.perf_counter()
        try:
            status, body = await connection.send(request)
        except _FAILURES as error:
            tally.failures[type(error).__name__] += 1
            await asyncio.sleep(FAILURE_PAUSE)
            finished = time.perf_counter()
            continue
        finished = time.perf_counter()
        tally.latencies.append(finished - started)
        tally.statuses[status] += 1
        if tally.bodies is not None:
            tally.bodies.append(body)
    return finished


async def drive(
    connections: Sequence[Connection],
    requests: Sequence[HttpRequest],
    seconds: float,
    tally: Tally,
) -> tuple[float, float]:
    """Every connection sends requests for `seconds`; (start, end of the last request)."""
    started = time.perf_counter()
    deadline = started + seconds
    tasks = [
        asyncio.create_task(_worker(c, requests, i, len(connections), deadline, tally))
        for i, c in enumerate(connections)
    ]
    try:
        done, pending = await asyncio.wait(tasks, timeout=seconds + REQUEST_TIMEOUT)
    finally:
        for task in tasks:
            task.cancel()
    if pending:
        tally.failures["timeout"] += len(pending)
    ends = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if errors and isinstance(errors[0], BaseException):
        raise errors[0]
    return started, max(ends, default=time.perf_counter())


@dataclass
class Phase:
    scenario: str
    client: str
    round: int
    requests: int
    elapsed: float
    statuses: dict[str, int]
    failures: dict[str, int]
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu_pct: dict[str, float | None]
    postgres: PgWindow | None
    latencies: list[float] = field(repr=False, default_factory=list)  # not in the JSON

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _errors(scenario: Scenario, tally: Tally) -> int:
    wrong = sum(n for status, n in tally.statuses.items() if status != scenario.expected)
    return wrong + sum(tally.failures.values())


@dataclass
class Harness:
    """What every phase needs: where the server is, the key, the probes."""

    port: int
    key: str
    concurrency: int
    ids: list[str]
    cpu: CpuProbe
    sampler: PgSampler | None
    created: int = 0  # tasks the API said it created (201), all phases and warm-ups

    def count_created(self, scenario: Scenario, tally: Tally) -> None:
        if scenario.name == "post":
            self.created += tally.statuses.get(201, 0)

    async def phase(
        self,
        scenario: Scenario,
        client_name: str,
        round_: int,
        seconds: float,
        warmup: float,
    ) -> Phase:
        client = CLIENTS[client_name](HOST, self.port, self.concurrency)
        requests = scenario.requests(self.key, self.ids)
        try:
            connections = [client.connection() for _ in range(self.concurrency)]
            if warmup > 0:
                warm = Tally()
                await drive(connections, requests, warmup, warm)
                self.count_created(scenario, warm)
            tally = Tally()
            if self.sampler is not None:
                self.sampler.take()
            before = self.cpu.mark()
            started, ended = await drive(connections, requests, seconds, tally)
            after = self.cpu.mark()
            window = self.sampler.take() if self.sampler is not None else None
            self.count_created(scenario, tally)
        finally:
            await client.aclose()
        elapsed = ended - started
        latencies = sorted(tally.latencies)
        return Phase(
            scenario=scenario.name,
            client=client_name,
            round=round_,
            requests=len(latencies),
            elapsed=round(elapsed, 4),
            statuses={str(k): v for k, v in sorted(tally.statuses.items())},
            failures=dict(tally.failures),
            errors=_errors(scenario, tally),
            p50_ms=_ms(percentile(latencies, 0.50)),
            p90_ms=_ms(percentile(latencies, 0.90)),
            p99_ms=_ms(percentile(latencies, 0.99)),
            max_ms=_ms(latencies[-1]) if latencies else float("nan"),
            cpu_pct=cpu_shares(before, after, elapsed),
            postgres=window,
            latencies=latencies,
        )

    async def create_tasks(self, count: int) -> list[str]:
        """`count` tasks through the API (raw client, full concurrency); their ids."""
        request = SCENARIOS["post"].requests(self.key, [])[0]
        client = RawClient(HOST, self.port, self.concurrency)
        ids: list[str] = []
        try:
            connections = [client.connection() for _ in range(min(self.concurrency, count))]

            async def make(connection: Connection, n: int) -> None:
                for _ in range(n):
                    status, body = await connection.send(request)
                    if status != 201:
                        raise RuntimeError(f"POST /api/tasks answered {status}: {body[:300]!r}")
                    ids.append(str(json.loads(body)["id"]))

            shares = [count // len(connections)] * len(connections)
            for i in range(count % len(connections)):
                shares[i] += 1
            await asyncio.gather(*(make(c, n) for c, n in zip(connections, shares, strict=True)))
        finally:
            await client.aclose()
        self.created += len(ids)
        return ids


# -- the server's profile (py-spy) ---------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    name: str
    file: str


Rule = tuple[str, Callable[[Frame], bool]]


def _in(*parts: str) -> Callable[[Frame], bool]:
    return lambda f: any(p in f.file for p in parts)


def _named(*names: str) -> Callable[[Frame], bool]:
    return lambda f: f.name in names


# Python CPU (samples of the thread holding the GIL): the first rule that any frame of
# the stack matches names the component (specific rules first, generic ones last).
CPU_RULES: list[Rule] = [
    ("request log (JSON lines to stdout and a file)", _in("/logging/", "taskledger/logs.py")),
    ("prometheus metrics", _in("prometheus_client/")),
    ("connection pool (getconn, pre-ping)", _in("psycopg_pool/")),
    (
        "ledger save: eventsourcing insert (LOCK TABLE, NOTIFY, INSERT, COMMIT)",
        lambda f: "eventsourcing/postgres.py" in f.file and "insert_events" in f.name,
    ),
    (
        "ledger read: eventsourcing select",
        lambda f: "eventsourcing/postgres.py" in f.file and "select" in f.name,
    ),
    ("ledger domain and event mapping", _in("/work/main/ledger/", "eventsourcing/")),
    ("API key check", _in("api/auth.py")),
    # Before the request body's rule: a response's model is pydantic too.
    (
        "response JSON (its pydantic model, orjson)",
        _named("model_response", "json_response", "task_response", "task_content"),
    ),
    ("request body (pydantic)", lambda f: "pydantic" in f.file or f.name == "read_json"),
    (
        "thread hand-off (anyio, queues, locks)",
        _in("anyio/", "/threading.py", "/queue.py", "concurrent/futures/"),
    ),
    ("Starlette routing and middleware (incl. RequestLog)", _in("starlette/", "/api/")),
    ("uvicorn + httptools (HTTP/1.1)", _in("uvicorn/", "httptools")),
    ("event loop (asyncio, uvloop)", _in("/asyncio/", "uvloop")),
    ("psycopg, other", _in("psycopg/")),
]

# Roles that own a whole stack, whatever runs inside: by a frame, or by thread name. The
# dispatcher's publishing runs as aio_pika callbacks on the event loop, without a frame
# of the dispatcher's own.
DISPATCHER = "dispatcher (log → RabbitMQ: aio_pika, confirms)"
OWNER_FRAMES: list[Rule] = [
    ("reaper", _in("workers/reaper.py")),
    (DISPATCHER, _in("workers/dispatcher.py", "workers/rabbitmq.py", "aio_pika/", "aiormq/")),
    (DISPATCHER, _in("pamqp/")),
    ("task watcher (LISTEN)", _in("api/watch.py")),
]
OWNER_THREADS: list[tuple[str, str]] = [
    ("projection-", "projection runners (task_status, audit)"),
    ("asyncio_", "dispatcher and reaper (asyncio.to_thread)"),
    ("uvloop_", "dispatcher and reaper (asyncio.to_thread)"),
    ("pool-", "connection pools' own threads"),
    ("queries-", "connection pools' own threads"),
]

# Wall time of the request threads (anyio's worker threads); the same way ("idle" last:
# every request thread's stack starts in WorkerThread.run).
WALL_RULES: list[Rule] = [
    ("getting a pooled connection (pre-ping)", _in("psycopg_pool/")),
    ("save: LOCK TABLE … INSERT (waits for the events table lock)", _named("Pipeline.sync")),
    (
        "save: COMMIT (the lock still held)",
        _named("Transaction.__exit__", "Pipeline.__exit__"),
    ),
    ("save: other", lambda f: "insert_events" in f.name),
    ("read the task's events (GET)", lambda f: "select" in f.name and "eventsourcing" in f.file),
    ("API key check", _in("api/auth.py")),
    ("ledger: other", _in("/work/main/ledger/", "eventsourcing/")),
    ("idle (waiting for work)", _named("Queue.get", "WorkerThread.run")),
]
REQUEST_THREAD = "AnyIO worker thread"


def _thread_name(profile_name: str) -> str:
    # py-spy names profiles 'Thread 1234 "name"'.
    first, _, rest = profile_name.partition('"')
    return rest.rstrip('"') if rest else first


def _thread_role(name: str) -> str:
    if name == "MainThread":
        return "event loop thread (uvicorn, Starlette, routes, dispatcher, reaper)"
    if name == REQUEST_THREAD:
        return "request threads (anyio: key check, ledger)"
    for prefix, role in OWNER_THREADS:
        if name.startswith(prefix):
            return role
    return name


def classify(stack: Sequence[Frame], thread: str, rules: Sequence[Rule], owners: bool) -> str:
    """The component a sample's stack (outermost first) belongs to."""
    if owners:
        for label, matches in OWNER_FRAMES:
            if any(matches(f) for f in stack):
                return label
        for prefix, role in OWNER_THREADS:
            if thread.startswith(prefix):
                return role
    for label, matches in rules:
        if any(matches(frame) for frame in stack):
            return label
    return "other"


@dataclass
class ProfileSummary:
    mode: str  # "cpu" (py-spy --gil) or "wall" (--idle, request threads only)
    seconds: float
    sampled_seconds: float
    busy_pct: float | None  # cpu: share of the time some thread held the GIL
    by_thread: dict[str, float]
    by_component: dict[str, float]
    top_self: dict[str, float]
    speedscope: str
    requests_per_s: float  # the POST rate meanwhile (py-spy pauses the process to sample)
    error: str | None = None


def summarise_speedscope(path: Path, mode: str, seconds: float) -> ProfileSummary:
    data = json.loads(path.read_text())
    frames = [Frame(f["name"], f.get("file") or "") for f in data["shared"]["frames"]]
    threads: Counter[str] = Counter()
    components: Counter[str] = Counter()
    selves: Counter[str] = Counter()
    total = 0.0
    for profile in data["profiles"]:
        thread = _thread_name(profile["name"])
        if mode == "wall" and thread != REQUEST_THREAD:
            continue
        for sample, weight in zip(profile["samples"], profile["weights"], strict=True):
            stack = [frames[i] for i in sample]
            total += weight
            threads[_thread_role(thread)] += weight
            if mode == "cpu":
                components[classify(stack, thread, CPU_RULES, owners=True)] += weight
            else:
                components[classify(stack, thread, WALL_RULES, owners=False)] += weight
            if stack:
                leaf = stack[-1]
                selves[f"{leaf.name} ({_short(leaf.file)})"] += weight

    def shares(counter: Counter[str], limit: int | None = None) -> dict[str, float]:
        if not total:
            return {}
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(limit)}

    return ProfileSummary(
        mode=mode,
        seconds=seconds,
        sampled_seconds=round(total, 2),
        busy_pct=round(100 * total / seconds, 1) if mode == "cpu" and seconds else None,
        by_thread=shares(threads),
        by_component=shares(components),
        top_self=shares(selves, 15),
        speedscope=str(path),
        requests_per_s=0.0,
    )


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


async def profile_server(
    py_spy: str,
    harness: Harness,
    seconds: float,
    stamp: str,
    progress: Callable[[str], None],
) -> list[ProfileSummary]:
    """py-spy on the server during a POST load (raw client), --gil then --idle."""
    summaries = []
    duration = max(1, round(seconds))
    scenario = SCENARIOS["post"]
    requests = scenario.requests(harness.key, [])
    for mode, flag in (("cpu", "--gil"), ("wall", "--idle")):
        path = RESULTS_DIR / f"{NAME}-{stamp}-post-{mode}.speedscope.json"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        client = RawClient(HOST, harness.port, harness.concurrency)
        tally = Tally()
        try:
            connections = [client.connection() for _ in range(harness.concurrency)]
            load = asyncio.create_task(drive(connections, requests, duration + 3.0, tally))
            await asyncio.sleep(1.0)
            spy = await asyncio.create_subprocess_exec(
                py_spy,
                *("record", "--pid", str(harness.cpu.server.pid), "--duration", str(duration)),
                *("--rate", "100", "--format", "speedscope", "--output", str(path), flag),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, err = await asyncio.wait_for(spy.communicate(), duration + 30)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    spy.kill()
                await spy.wait()
                raise
            started, ended = await load
        finally:
            await client.aclose()
        harness.count_created(scenario, tally)
        rate = len(tally.latencies) / (ended - started) if ended > started else 0.0
        if spy.returncode != 0 or not path.exists():
            message = err.decode(errors="replace").strip()[-500:] or f"exit {spy.returncode}"
            progress(f"  profile ({mode}) failed: {message}")
            summaries.append(
                ProfileSummary(mode, duration, 0.0, None, {}, {}, {}, str(path), rate, message)
            )
            continue
        summary = summarise_speedscope(path, mode, duration)
        summary.requests_per_s = round(rate, 1)
        summaries.append(summary)
        progress(f"  profile ({mode}): {path.name}, POST {rate:,.0f} req/s meanwhile")
    return summaries


# -- summaries -----------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    client: str
    rounds: int
    requests: int
    seconds: float
    median_rate: float
    min_rate: float
    max_rate: float
    round_rates: list[float]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    statuses: dict[str, int]
    failures: dict[str, int]
    cpu_pct: dict[str, float | None]  # median over the rounds, % of one core
    server_cpu_ms_per_request: float | None
    postgres_backends: dict[str, float]  # mean number by state, over the rounds
    events_lock: dict[str, float]  # holder state -> % of samples
    vs_healthz: float | None = None


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 1) if known else None


def _merge_windows(windows: Sequence[PgWindow]) -> tuple[dict[str, float], dict[str, float]]:
    total = sum(w.samples for w in windows)
    if not total:
        return {}, {}
    backends: dict[str, float] = {}
    lock: dict[str, float] = {}
    for w in windows:
        for k, v in w.backends.items():
            backends[k] = backends.get(k, 0.0) + v * w.samples
        for k, v in w.events_lock.items():
            lock[k] = lock.get(k, 0.0) + v * w.samples

    def ordered(values: dict[str, float], digits: int) -> dict[str, float]:
        items = sorted(values.items(), key=lambda kv: -kv[1])
        return {k: round(v / total, digits) for k, v in items}

    return ordered(backends, 2), ordered(lock, 1)


def summarise(phases: Sequence[Phase]) -> Row:
    first = phases[0]
    latencies = sorted(x for p in phases for x in p.latencies)
    rates = [round(p.rate, 1) for p in phases]
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for p in phases:
        statuses.update(p.statuses)
        failures.update(p.failures)
    requests = sum(p.requests for p in phases)
    elapsed = sum(p.elapsed for p in phases)
    server = [p.cpu_pct.get("server") for p in phases]
    server_seconds = (
        sum(s / 100 * p.elapsed for s, p in zip(server, phases, strict=True) if s is not None)
        if all(s is not None for s in server)
        else None
    )
    backends, lock = _merge_windows([p.postgres for p in phases if p.postgres is not None])
    return Row(
        scenario=first.scenario,
        client=first.client,
        rounds=len(phases),
        requests=requests,
        seconds=round(elapsed, 3),
        median_rate=round(statistics.median(rates), 1),
        min_rate=min(rates),
        max_rate=max(rates),
        round_rates=rates,
        p50_ms=_ms(percentile(latencies, 0.50)),
        p90_ms=_ms(percentile(latencies, 0.90)),
        p99_ms=_ms(percentile(latencies, 0.99)),
        max_ms=_ms(latencies[-1]) if latencies else float("nan"),
        errors=sum(p.errors for p in phases),
        statuses=dict(statuses),
        failures=dict(failures),
        cpu_pct={
            k: _median_or_none([p.cpu_pct.get(k) for p in phases])
            for k in ("client", "server", "server_system", "postgres", "broker", "other", "host")
        },
        server_cpu_ms_per_request=round(1000 * server_seconds / requests, 3)
        if server_seconds is not None and requests
        else None,
        postgres_backends=backends,
        events_lock=lock,
    )


# -- reporting -----------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or value != value else f"{value:,.{digits}f}"


def _error_cell(row: Row) -> str:
    if not row.errors:
        return "0"
    expected = str(SCENARIOS[row.scenario].expected)
    parts = [f"{n} x {s}" for s, n in row.statuses.items() if s != expected]
    parts += [f"{n} x {name}" for name, n in row.failures.items() if n]
    return f"{row.errors} ({', '.join(parts)})"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _lock_cell(row: Row, key: str) -> str:
    value = row.events_lock.get(key)
    return "-" if value is None else f"{value:.0f}%"


def render(
    facts: MachineFacts,
    rows: Sequence[Row],
    profiles: Sequence[ProfileSummary],
    settings: dict[str, Any],
    notes: Sequence[str],
) -> str:
    labels = {s.name: s.label for s in SCENARIOS.values()}
    parts = [
        f"# {NAME}: {facts.header()}",
        "",
        f"Server: `taskledger api` (uvicorn {settings['uvicorn']}, {settings['server_loop']}),"
        f" broker {settings['broker']}, 1 process. Load: {settings['concurrency']} keep-alive"
        f" connections, one request in flight each (closed loop), {settings['seconds']:g} s"
        f" per row and round after {settings['warmup']:g} s warm-up, {settings['rounds']}"
        f" interleaved rounds; client loop {settings['client_loop']}. Latency percentiles"
        " over all rounds. CPU: median over the rounds, % of one core"
        f" ({facts.nproc} cores = {100 * facts.nproc}%).",
        "",
        markdown_table(
            [
                "scenario",
                "client",
                "req/s median",
                "range",
                "vs healthz",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "errors",
                "client CPU",
                "server CPU",
                "PG CPU",
                "RabbitMQ CPU",
                "other CPU",
                "server CPU ms/req",
            ],
            [
                [
                    labels[r.scenario],
                    r.client,
                    _num(r.median_rate),
                    f"{r.min_rate:,.0f}-{r.max_rate:,.0f}",
                    "-" if r.vs_healthz is None else f"{r.vs_healthz:.2f}",
                    _num(r.p50_ms, 1),
                    _num(r.p90_ms, 1),
                    _num(r.p99_ms, 1),
                    _error_cell(r),
                    _pct(r.cpu_pct.get("client")),
                    _pct(r.cpu_pct.get("server"))
                    + (
                        ""
                        if r.cpu_pct.get("server_system") is None
                        else f" ({r.cpu_pct['server_system']:.0f}% sys)"
                    ),
                    *(_pct(r.cpu_pct.get(k)) for k in ("postgres", "broker", "other")),
                    _num(r.server_cpu_ms_per_request, 2),
                ]
                for r in rows
            ],
        ),
    ]
    sampled = [r for r in rows if r.postgres_backends or r.events_lock]
    if sampled:
        parts += [
            "",
            "PostgreSQL meanwhile (this database's client backends, sampled every"
            f" {settings['sample_interval'] * 1000:g} ms): mean number busy, waiting for a"
            " lock, idle in a transaction; and the events table's EXCLUSIVE lock (taken by"
            " every event insert): share of samples it was held, and what its holder did.",
            "",
            markdown_table(
                [
                    "scenario",
                    "client",
                    "busy backends",
                    "lock waiters",
                    "idle in tx",
                    "lock held",
                    "holder waits for API process",
                    "holder commits",
                    "holder runs SQL",
                ],
                [
                    [
                        labels[r.scenario],
                        r.client,
                        _num(sum(r.postgres_backends.values()), 1),
                        _num(
                            sum(v for k, v in r.postgres_backends.items() if "lock" in k),
                            1,
                        ),
                        _num(r.postgres_backends.get("idle in transaction", 0.0), 1),
                        f"{100 - r.events_lock.get(LOCK_FREE, 100.0):.0f}%",
                        _lock_cell(r, HOLDER_WAITS_FOR_API),
                        _lock_cell(r, HOLDER_COMMITTING),
                        _lock_cell(r, HOLDER_RUNNING),
                    ]
                    for r in sampled
                ],
            ),
        ]
    for profile in profiles:
        if profile.error:
            parts += ["", f"Profile ({profile.mode}) failed: {profile.error}"]
            continue
        if profile.mode == "cpu":
            title = (
                f"Server profile during POST, Python CPU (py-spy --gil, {profile.seconds:g} s"
                f" at 100 Hz; the GIL was held {_num(profile.busy_pct)}% of the time;"
                f" POST {profile.requests_per_s:,.0f} req/s meanwhile):"
            )
        else:
            title = (
                f"Server profile during POST, wall time of the request threads (py-spy"
                f" --idle, {profile.seconds:g} s; POST {profile.requests_per_s:,.0f} req/s"
                " meanwhile):"
            )
        parts += [
            "",
            title,
            "",
            markdown_table(
                ["component", "share"],
                [[k, f"{v:.1f}%"] for k, v in profile.by_component.items() if v >= 0.5],
            ),
        ]
        if profile.mode == "cpu":
            parts += [
                "",
                "By thread: "
                + "; ".join(f"{k} {v:.0f}%" for k, v in profile.by_thread.items() if v >= 0.5)
                + ".",
            ]
    if profiles:
        files = ", ".join(Path(p.speedscope).name for p in profiles if not p.error)
        if files:
            parts += ["", f"Flame graphs (https://www.speedscope.app): bench/results/{{{files}}}"]
    if notes:
        parts += ["", *notes]
    return "\n".join(parts)


# -- command line --------------------------------------------------------------------------


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {unknown}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser("api_requests", __doc__)
    parser.add_argument(
        "--broker-url",
        default=DEFAULT_BROKER_URL,
        help="TASKLEDGER_BROKER_URL for the server: amqp://… (queues of this run only,"
        " deleted afterwards) or memory:// (default %(default)s)",
    )
    parser.add_argument("--concurrency", type=_positive_int, default=32, help="default 32")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per row and round (10)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each (2)")
    parser.add_argument("--rounds", type=_positive_int, default=3, help="default 3")
    parser.add_argument(
        "--scenarios",
        type=_names(list(SCENARIOS)),
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default all)",
    )
    parser.add_argument(
        "--clients",
        type=_names(list(CLIENTS)),
        default=list(DEFAULT_CLIENTS),
        help=f"comma-separated subset of {','.join(CLIENTS)} (default {','.join(DEFAULT_CLIENTS)})",
    )
    parser.add_argument(
        "--ids", type=_positive_int, default=1_000, help="tasks created for the get scenario"
    )
    parser.add_argument(
        "--client-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        help="the client's event loop (default uvloop when installed)",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=0.02,
        help="seconds between pg_stat_activity samples; 0 = none (default 0.02)",
    )
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=5.0,
        help="py-spy the server for this long during a POST load, twice; 0 = no (default 5)",
    )
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="for /readyz (60)")
    parser.add_argument("--stop-timeout", type=float, default=20.0, help="SIGTERM→SIGKILL (20)")
    parser.add_argument(
        "--no-json", action="store_true", help="do not write bench/results/api_requests-*.json"
    )
    return parser.parse_args(argv)


def _local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


CODE_UNDER_TEST = ("api", "ledger", "projections", "taskledger", "workers")


def code_version() -> dict[str, Any]:
    """The commit measured, and uncommitted changes to the code under test, if any."""
    changed = git("status", "--porcelain", "--", *CODE_UNDER_TEST)
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        # Porcelain lines are "XY path": no strip() before slicing (X may be a space).
        "uncommitted": [line[3:] for line in changed.splitlines() if line.strip()],
    }


def _event_counts(url: str, schema: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            sql.SQL("SELECT topic, count(*) FROM {} GROUP BY topic").format(
                sql.Identifier(schema, EVENTS_TABLE)
            )
        ).fetchall()
    return {str(topic).rsplit(".", 1)[-1].rsplit(":", 1)[-1]: int(n) for topic, n in rows}


def _server_facts() -> tuple[str, str]:
    """uvicorn's version and what its 'auto' loop and HTTP settings pick here."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    try:
        from importlib.metadata import version

        uvicorn = version("uvicorn")
    except Exception:  # noqa: BLE001 -- only for the header
        uvicorn = "?"
    return uvicorn, f"{loop} + {http}"


@dataclass
class Outcome:
    facts: MachineFacts
    phases: list[Phase]
    rows: list[Row]
    profiles: list[ProfileSummary]
    checks: dict[str, Any]
    notes: list[str]
    server: dict[str, Any]
    seconds: float
    other_cpu_pct: float | None


def _loop_runner(kind: str) -> asyncio.Runner:
    if kind == "uvloop":
        factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module(
            "uvloop"
        ).new_event_loop
        return asyncio.Runner(loop_factory=factory)
    return asyncio.Runner()


def run(args: argparse.Namespace, progress: Callable[[str], None] = eprint) -> Outcome:
    taskledger = venv_tool("taskledger")
    if taskledger is None:
        raise SystemExit("taskledger is not installed in this environment (pip install -e .)")
    problem = _broker_reachable(args.broker_url)
    if problem is not None:
        raise SystemExit(
            f"{NAME}: the broker {args.broker_url}: {problem}; start RabbitMQ or pass"
            " --broker-url memory://"
        )
    amqp = not args.broker_url.startswith("memory:")
    py_spy = venv_tool("py-spy") if args.profile_seconds > 0 else None
    started_at = time.perf_counter()
    host_before, own_before = host_busy_seconds(), time.process_time()
    pg_before = postgres_cpu_seconds()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    key = secrets.token_hex(16)  # 32 characters
    schema = f"bench_{secrets.token_hex(4)}" if amqp else "public"
    namespace = f"taskledger.{schema}"
    port = free_port()
    phases: list[Phase] = []
    profiles: list[ProfileSummary] = []
    checks: dict[str, Any] = {}
    notes: list[str] = []
    server_info: dict[str, Any] = {}
    server_cpu_total: float | None = None
    with (
        temporary_database(args.database_url) as url,
        tempfile.TemporaryDirectory(prefix="taskledger-bench-api-") as tmp,
    ):
        facts = machine_facts(url)
        progress(f"{NAME}: database {urlsplit(url).path.lstrip('/')}; {facts.header()}")
        workdir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLEDGER_")}
        env |= {
            "TASKLEDGER_DATABASE_URL": url,
            "TASKLEDGER_BROKER_URL": args.broker_url,
            "TASKLEDGER_API_KEYS": f"bench:admin:{key}",
            "TASKLEDGER_LOG_DIR": str(workdir / "logs"),
            "TASKLEDGER_DATA_DIR": str(workdir / "data"),
        }
        if amqp:
            env["TASKLEDGER_DATABASE_SCHEMA"] = schema
        command = [taskledger, "api", "--host", HOST, "--port", str(port)]
        server = ApiServer(command, env, workdir, args.stop_timeout)
        try:
            with server:
                ready = server.wait_ready(f"http://{HOST}:{port}", args.startup_timeout)
                progress(
                    f"  {' '.join(command[1:])} (pid {server.pid}) ready in {ready:.1f} s;"
                    f" broker {args.broker_url.split('@')[-1]}"
                    + (f", queues {namespace}.*" if amqp else "")
                )
                server_info = {
                    "command": [Path(command[0]).name, *command[1:]],
                    "env": sorted(k for k in env if k.startswith("TASKLEDGER_")),
                    "schema": schema,
                    "ready_seconds": round(ready, 2),
                }
                sampler = (
                    PgSampler(url, f'"{schema}"."{EVENTS_TABLE}"', args.sample_interval)
                    if args.sample_interval > 0
                    else None
                )
                local_broker = amqp and _local(args.broker_url)
                probe = CpuProbe(server.pid, _local(args.database_url), local_broker)
                harness = Harness(port, key, args.concurrency, [], probe, sampler)
                server_cpu_start = _cpu(probe.server)
                if sampler is not None:
                    sampler.start()
                try:
                    with _loop_runner(args.client_loop) as runner:
                        if "get" in args.scenarios:
                            harness.ids = runner.run(harness.create_tasks(args.ids))
                            progress(f"  created {len(harness.ids):,} tasks for the get scenario")
                        for round_ in range(args.rounds):
                            for name in args.scenarios:
                                for client in args.clients:
                                    phase = runner.run(
                                        harness.phase(
                                            SCENARIOS[name],
                                            client,
                                            round_ + 1,
                                            args.seconds,
                                            args.warmup,
                                        )
                                    )
                                    phases.append(phase)
                                    _phase_progress(progress, phase, args.rounds)
                        if py_spy is not None and args.profile_seconds > 0:
                            profiles = runner.run(
                                profile_server(
                                    py_spy, harness, args.profile_seconds, stamp, progress
                                )
                            )
                        elif args.profile_seconds > 0:
                            notes.append("No profile: py-spy is not installed.")
                finally:
                    if sampler is not None:
                        sampler.stop()
                        if sampler.error is not None:
                            notes.append(f"The PostgreSQL sampler failed: {sampler.error!r}")
                server_cpu_end = _cpu(probe.server)
                if server_cpu_start is not None and server_cpu_end is not None:
                    server_cpu_total = server_cpu_end - server_cpu_start
                checks = _checks(url, schema, harness.created, args.broker_url, namespace, amqp)
                stop = server.stop()
            server_info["stop"] = asdict(stop)
            server_info["cpu_seconds"] = (
                None if server_cpu_total is None else round(server_cpu_total, 2)
            )
            server_info["log_bytes"] = {
                "stdout": _size(server.stdout_path),
                "files": sum(_size(p) for p in (workdir / "logs").glob("*")),
            }
            leftovers = stop.leftovers_killed
            progress(
                f"  server stopped by {stop.how} in {stop.seconds:.1f} s (exit {stop.returncode})"
                + (f"; killed {leftovers} leftover processes" if leftovers else "")
            )
        except Exception:  # not on Ctrl-C or SIGTERM: the server's last words may explain
            if server.process is not None:
                eprint(server.output_tail())
            raise
        finally:
            if amqp:
                with contextlib.suppress(Exception):
                    cleanup = _rabbitmq(args.broker_url, namespace, delete=True)
                    asyncio.run(asyncio.wait_for(cleanup, 20))
    rows = _rows(phases, args.scenarios, args.clients)
    notes += _notes(checks, server_info)
    elapsed = time.perf_counter() - started_at
    other = None
    host_after, pg_after = host_busy_seconds(), postgres_cpu_seconds()
    if None not in (host_before, host_after, pg_before, pg_after) and server_cpu_total is not None:
        assert host_before is not None
        assert host_after is not None
        assert pg_before is not None
        assert pg_after is not None
        busy = (host_after - host_before) - (time.process_time() - own_before)
        busy -= (pg_after - pg_before) + server_cpu_total
        other = round(100 * max(0.0, busy) / elapsed, 1)
    return Outcome(facts, phases, rows, profiles, checks, notes, server_info, elapsed, other)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _checks(
    url: str, schema: str, created: int, broker_url: str, namespace: str, amqp: bool
) -> dict[str, Any]:
    """Every 201 in the log (2 events each); the dispatcher's queue got every command."""
    counts = _event_counts(url, schema)
    checks: dict[str, Any] = {"created": created, "events_by_type": counts}
    checks["submitted"] = sum(v for k, v in counts.items() if "Submitted" in k)
    checks["expired"] = sum(v for k, v in counts.items() if "Expired" in k)
    if amqp:
        depth: int | None = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the dispatcher may still be catching up
            with contextlib.suppress(Exception):
                depth = asyncio.run(
                    asyncio.wait_for(_rabbitmq(broker_url, namespace, delete=False), 10)
                )
            if depth is not None and depth >= created:
                break
            time.sleep(0.5)
        checks["queued_commands"] = depth
    return checks


def _notes(checks: dict[str, Any], server: dict[str, Any]) -> list[str]:
    notes = []
    if checks.get("submitted") != checks.get("created"):
        notes.append(
            f"CHECK FAILED: the API answered 201 {checks.get('created')} times, the log has"
            f" {checks.get('submitted')} TaskSubmitted events."
        )
    queued = checks.get("queued_commands", "n/a")
    if queued != "n/a" and queued != checks.get("created"):
        notes.append(
            f"Dispatcher: {queued} commands in this run's queue for {checks.get('created')}"
            " created tasks."
        )
    if checks.get("expired"):
        notes.append(
            f"The reaper expired {checks['expired']} tasks during the run (300 s TTL): later"
            " rows shared the server with that work."
        )
    stop = server.get("stop") or {}
    if stop.get("how") != "SIGTERM" or stop.get("leftovers_killed"):
        notes.append(f"Server stop: {stop}.")
    return notes


def _rows(phases: Sequence[Phase], scenarios: Sequence[str], clients: Sequence[str]) -> list[Row]:
    """One row per scenario and client, scenario by scenario; each against the healthz
    row of the same client."""
    rows = []
    healthz: dict[str, Row] = {}
    for name in scenarios:
        for client in clients:
            chosen = [p for p in phases if p.scenario == name and p.client == client]
            if not chosen:
                continue
            row = summarise(chosen)
            if name == "healthz":
                healthz[client] = row
            baseline = healthz.get(client)
            if baseline is not None and baseline.median_rate:
                row.vs_healthz = round(row.median_rate / baseline.median_rate, 3)
            rows.append(row)
    return rows


def _phase_progress(progress: Callable[[str], None], phase: Phase, rounds: int) -> None:
    cpu = phase.cpu_pct
    progress(
        f"  round {phase.round}/{rounds} {phase.scenario:<7} {phase.client:<16}"
        f" {phase.rate:8,.0f} req/s, p50 {phase.p50_ms:7.1f} ms, p99 {phase.p99_ms:7.1f} ms,"
        f" errors {phase.errors}; CPU client {_num(cpu.get('client'))}%"
        f" server {_num(cpu.get('server'))}% ({_num(cpu.get('server_system'))}% sys)"
        f" PG {_num(cpu.get('postgres'))}%"
        f" other {_num(cpu.get('other'))}%"
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    code = code_version()
    outcome = run(args)
    load_after = os.getloadavg()
    uvicorn, server_loop = _server_facts()
    settings = {
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "scenarios": args.scenarios,
        "clients": args.clients,
        "ids": args.ids,
        "client_loop": args.client_loop,
        "broker": "RabbitMQ" if not args.broker_url.startswith("memory:") else "memory://",
        "sample_interval": args.sample_interval,
        "profile_seconds": args.profile_seconds,
        "uvicorn": uvicorn,
        "server_loop": server_loop,
    }
    noise = (
        f"Run took {outcome.seconds:.0f} s; load average before/after"
        f" {load_before[0]:.2f}/{load_after[0]:.2f}"
        + (
            ""
            if outcome.other_cpu_pct is None
            else f"; processes other than this one, the server and PostgreSQL used"
            f" {outcome.other_cpu_pct:.0f}% of one core on average (noise, RabbitMQ included)"
        )
        + f". Code: {str(code['commit'])[:12]}"
        + (
            f" with uncommitted changes in {', '.join(code['uncommitted'])}."
            if code["uncommitted"]
            else "."
        )
    )
    print(render(outcome.facts, outcome.rows, outcome.profiles, settings, [noise, *outcome.notes]))
    if not args.no_json:
        phases = []
        for phase in outcome.phases:
            entry = asdict(phase)
            entry.pop("latencies")
            entry["requests_per_s"] = round(phase.rate, 1)
            phases.append(entry)
        path = write_results(
            NAME,
            {
                "benchmark": NAME,
                "started_at": started.isoformat(),
                "command": ["python", "-m", "bench.api_requests", *arguments],
                "settings": settings,
                "machine": asdict(outcome.facts),
                "code": code,
                "server": outcome.server,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "rows": [asdict(r) for r in outcome.rows],
                "phases": phases,
                "profiles": [asdict(p) for p in outcome.profiles],
                "checks": outcome.checks,
                "notes": outcome.notes,
                "seconds": round(outcome.seconds, 1),
                "other_cpu_pct": outcome.other_cpu_pct,
            },
        )
        eprint(f"{NAME}: raw figures in {path}")
    return 1 if any(n.startswith("CHECK FAILED") for n in outcome.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
