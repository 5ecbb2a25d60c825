"""Where the tests find PostgreSQL, RabbitMQ and Chromium, and what happens when one is absent.

`scripts/test` provides the services and exports their URLs (and Chromium's path); by
default the tests look on 127.0.0.1 (and for /usr/bin/chromium or `chromium` on PATH). A
test that needs an absent service fails in CI (CI=true) and is skipped elsewhere, with a
banner at the end of the run naming what did not run.
"""

from __future__ import annotations

import os
import shutil
import socket
from urllib.parse import urlsplit

import psycopg
import pytest

DATABASE_URL = os.environ.get(
    "TASKLEDGER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BROKER_URL = os.environ.get("TASKLEDGER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
# The browser tests (tests/browser) drive this Chromium, Debian's, through Playwright:
# Playwright's own browser builds cannot be downloaded here.
CHROMIUM = (
    os.environ.get("TASKLEDGER_TEST_CHROMIUM")
    or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    or shutil.which("chromium")
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

missing: dict[str, str] = {}


def unavailable(service: str, reason: str) -> None:
    """Fail (CI) or skip (elsewhere) the calling test because `service` is absent."""
    missing[service] = reason
    message = f"{service} is not available: {reason}"
    if IN_CI:
        pytest.fail(f"{message} (CI must run every test; start {service})", pytrace=False)
    pytest.skip(message)


def postgres_problem(url: str = DATABASE_URL) -> str | None:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return f"{url}: {str(error).strip()}"
    return None


def broker_problem(url: str = BROKER_URL) -> str | None:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 3):
            return None
    except OSError as error:
        return f"{url}: {error}"


def broker_for(role: str) -> str:
    """The broker URL a role started as a process uses: a worker (a process of its own)
    needs RabbitMQ; every other role does with the in-process broker."""
    if role != "worker":
        return "memory://"
    problem = broker_problem()
    if problem:
        unavailable("RabbitMQ", problem)
    return BROKER_URL


def chromium_problem(path: str | None = CHROMIUM) -> str | None:
    """Why the browser tests cannot launch Chromium, or None when they can."""
    if path is None:
        return "no /usr/bin/chromium and no chromium on PATH (apt-get install chromium)"
    if not os.access(path, os.X_OK):
        return f"TASKLEDGER_TEST_CHROMIUM={path} is not an executable file"
    return None
