"""What every benchmark needs: a throwaway database, machine facts, percentiles, output."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

REPOSITORY = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """`git ARGS` in the repository, its output unstripped (porcelain lines start with a
    two-letter status that may be a space); "" when git or the repository is missing."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_URL_ENV = "TASKLEDGER_BENCH_DATABASE_URL"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_database_url() -> str:
    return os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


def with_database(url: str, dbname: str) -> str:
    """`url` pointing at database `dbname` instead (path and any ?dbname= replaced)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "dbname"]
    return urlunsplit(parts._replace(path="/" + quote(dbname), query=urlencode(query)))


def benchmark_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its name, the first paragraph of
    its docstring, and `--database-url`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{name}",
        description=doc.split("\n\n")[0] if doc else None,
    )
    parser.add_argument(
        "--database-url",
        default=default_database_url(),
        help="server to create the throwaway database on (default: $TASKLEDGER_BENCH_DATABASE_URL"
        " or %(default)s)",
    )
    return parser


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


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
    """Create a fresh database on the server of `server_url`; yield its URL; drop it after.

    The database is dropped also when the body raises, is interrupted or gets SIGTERM;
    connections still open to it are terminated first.
    """
    dbname = f"{prefix}{secrets.token_hex(4)}"
    with _sigterm_raises():
        with _connect(server_url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        try:
            yield with_database(server_url, dbname)
        finally:
            with _connect(server_url) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (dbname,),
                )
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


@dataclass(frozen=True)
class MachineFacts:
    nproc: int
    postgres: str
    eventsourcing: str
    psycopg: str
    python: str
    platform: str
    synchronous_commit: str

    def header(self) -> str:
        return (
            f"nproc={self.nproc} · PostgreSQL {self.postgres}"
            f" (synchronous_commit={self.synchronous_commit})"
            f" · eventsourcing {self.eventsourcing} · psycopg {self.psycopg}"
            f" · Python {self.python} · {self.platform}"
        )


def machine_facts(database_url: str) -> MachineFacts:
    with _connect(database_url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        sync = conn.execute("SHOW synchronous_commit").fetchone()
    return MachineFacts(
        nproc=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 0,
        postgres=str(row[0]) if row else "unknown",
        eventsourcing=_package_version("eventsourcing"),
        psycopg=_package_version("psycopg"),
        python=platform.python_version(),
        platform=platform.platform(terse=True),
        synchronous_commit=str(sync[0]) if sync else "unknown",
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of already sorted values (nearest rank); nan when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write `payload` as bench/results/<name>-<UTC timestamp>.json; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
