from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from tests import services


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this test session on the test PostgreSQL server."""
    problem = services.postgres_problem()
    if problem:
        services.unavailable("PostgreSQL", problem)
    name = f"taskledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(services.DATABASE_URL)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(services.DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A schema of its own for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if services.missing:
        terminalreporter.section("SERVICES MISSING: TESTS NOT RUN", sep="!", red=True, bold=True)
        for service, reason in services.missing.items():
            terminalreporter.write_line(f"{service}: {reason}", red=True, bold=True)
        terminalreporter.write_line(
            "Tests that need these services were skipped. Run ./scripts/test to provide them.",
            red=True,
            bold=True,
        )
