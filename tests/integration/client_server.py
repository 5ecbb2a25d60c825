"""A real `taskledger dev` for the client's tests: PostgreSQL (a schema of its own),
RabbitMQ (queues named under that schema), configured keys, a worker that runs programs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tests import services
from tests.processes import free_port, role_env, start_role, stop, wait_until, wait_until_serving

# name -> (tenant, role); each key is "<name>-key-0123456789abcdef"
KEYS = {
    "acme-admin": ("acme", "admin"),
    "acme-submit": ("acme", "submit"),
    "acme-read": ("acme", "read"),
    "globex-submit": ("globex", "submit"),
}


@dataclass(frozen=True)
class Server:
    url: str
    keys: dict[str, str]
    log: Path

    def key(self, name: str = "acme-submit") -> str:
        return self.keys[name]


@contextlib.contextmanager
def dev_server(database_url: str, directory: Path) -> Iterator[Server]:
    """`taskledger dev` on its own schema and port, until the block ends."""
    broker = services.broker_for("worker")  # RabbitMQ, or skipped (failed in CI) without it
    schema = f"client_{uuid.uuid4().hex[:12]}"
    keys = {name: f"{name}-key-0123456789abcdef" for name in KEYS}
    configured = ",".join(f"{tenant}:{role}:{keys[name]}" for name, (tenant, role) in KEYS.items())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = role_env(
        directory,
        database_url=database_url,
        database_schema=schema,
        broker_url=broker,
        api_keys=configured,
    )
    log = directory / "dev.log"
    process: subprocess.Popen[bytes] = start_role(
        ["dev", "--port", str(port), "--concurrency", "4"], env, log
    )
    try:
        wait_until_serving(process, url, log, timeout=90)
        wait_until(lambda: "serving the API" in log.read_text(), 30, "the API to serve")
        yield Server(url, keys, log)
    finally:
        stop(process)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


class FaultyProxy:
    """A TCP proxy in front of the server that misbehaves on purpose, once per rule.

    A rule matches a connection by the start of its first request (b"POST /api/tasks ",
    b"GET /api/tasks/"), then either
    - "drop-response": forwards the request, waits until the server has answered (so it has
      acted on it), and closes the client's connection without a byte of the answer; or
    - "answer-503": answers 503 with a problem document itself, and closes.
    Other connections are forwarded as they are.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rules: list[tuple[bytes, str]] = []
        self.matched: list[tuple[bytes, str]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def once(self, request_start: bytes, action: str) -> None:
        with self._lock:
            self.rules.append((request_start, action))

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _rule_for(self, first: bytes) -> str | None:
        with self._lock:
            for index, (start, action) in enumerate(self.rules):
                if first.startswith(start):
                    del self.rules[index]
                    self.matched.append((start, action))
                    return action
        return None

    def _serve(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as closing:
            closing.callback(client.close)
            first = client.recv(65536)
            if not first:
                return
            action = self._rule_for(first)
            if action == "answer-503":
                body = (
                    b'{"type": "https://taskledger.dev/problems/ledger-unavailable", '
                    b'"title": "Service unavailable", "status": 503, "detail": "injected"}'
                )
                client.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json"
                    b"\r\nRetry-After: 0\r\nConnection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            closing.callback(upstream.close)
            upstream.sendall(first)
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            if action == "drop-response":
                upstream.recv(1)  # the server answered: it has stored what was asked
                client.shutdown(socket.SHUT_RDWR)  # and the client never hears of it
                return
            _pipe(upstream, client)


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            target.sendall(chunk)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)
