"""The machine's PostgreSQL and RabbitMQ, with state of a benchmark's own: a throwaway
database each (`temporary_database`), dropped at the end, also on failure, Ctrl-C or
SIGTERM; queues named after a random schema (`delete_queues`). The fault suite runs
servers of its own (bench/faults/servers.py)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_URL_ENV = "TASKLEDGER_BENCH_DATABASE_URL"
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


def default_database_url() -> str:
    return os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


def with_database(url: str, dbname: str) -> str:
    """`url` pointing at database `dbname` instead (path and any ?dbname= replaced)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "dbname"]
    return urlunsplit(parts._replace(path="/" + quote(dbname), query=urlencode(query)))


def dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def reachable(url: str, default_port: int) -> str | None:
    """Why the server of `url` cannot be reached, or None."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), 3):
            return None
    except OSError as error:
        return f"{host}:{port}: {error}"


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def require_broker(benchmark: str, url: str) -> None:
    """Exit with a message when the RabbitMQ of `url` cannot be reached."""
    problem = reachable(url, 5672)
    if problem is not None:
        raise SystemExit(f"{benchmark}: RabbitMQ is not reachable ({problem}); start it first")


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` blocks (dropping the database) run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def temporary_database(server_url: str, prefix: str = "taskledger_bench_") -> Iterator[str]:
    """Create a fresh database on the server of `server_url`; yield its URL; drop it after
    (connections still open to it are terminated first)."""
    name = f"{prefix}{secrets.token_hex(4)}"
    with _sigterm_raises():
        with _connect(server_url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_database(server_url, name)
        finally:
            with _connect(server_url) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


async def delete_queues(broker_url: str, namespace: str) -> None:
    """Delete a taskledger deployment's queues and exchange (`taskledger.<schema>.*`)."""
    from workers.rabbitmq import RabbitMQBroker

    broker = RabbitMQBroker(broker_url, namespace)
    try:
        await broker.delete_all()
    finally:
        await broker.close()
