from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import psycopg
import pytest
import pytest_asyncio
from psycopg_pool import ConnectionPool

from api.app import create_app
from api.auth import Authenticator, ConfiguredKey
from api.context import ApiContext
from api.metrics import ApiMetrics
from api.watch import TaskWatcher
from ledger import Ledger, ManualClock, RetryPolicy, SystemClock
from ledger.connections import postgres_env
from ledger.keys import Role
from projections import all_projections
from projections.base import ensure_installed
from projections.runner import apply_batch
from tests import services
from tests.private_postgres import postgres  # noqa: F401 - a fixture, for every test here
from workers.executors.csharp import CSharpExecutor
from workers.executors.python import PythonExecutor
from workers.sandbox import Sandbox

# -- which modules run on both PostgreSQL backends ---------------------------------------------

# The tests of the store and the views run on the embedded server too ("embedded": another
# PostgreSQL version, over a Unix socket; see tests/conftest.py), as that is what
# `taskledger dev` runs on by default. Each costs 10-50 s more there (on 2 cores).
BOTH_BACKENDS = {
    "test_ledger_postgres",  # events, group commit, large saves, ambiguous commits
    "test_chain",  # the hash chain the insert computes, and verifying it under attack
    "test_projections",  # views: live, batched, exactly once, rebuilt, queried
    "test_leases",  # lease rows in the events' transaction, a real race
    "test_concurrency",  # first writer wins, threads and processes
    "test_projection_processes",  # advisory-lock leaders, a projector killed mid-batch
    "test_api",  # view queries and pagination, long polls on LISTEN/NOTIFY, 503s
    "test_workers",  # outbox relay, reaper, leases and heartbeats through the store
    "test_openapi",  # generated requests: odd values all the way into the views
}
# Not here: tests that use the database only as a place to keep tasks while they test
# something else (metrics, HTTPS, logs, the README's session, the sandbox, processes around
# a broker), and test_embedded, which is about the embedded server itself.


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if module in BOTH_BACKENDS and "database_url" in metafunc.fixturenames:
        metafunc.parametrize(
            "database_backend", ["tcp", "embedded"], indirect=True, scope="session"
        )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store_env(database_url: str, schema: str) -> dict[str, str]:
    """eventsourcing settings for a ledger in this test's own schema."""
    return postgres_env(database_url, schema=schema, pool_size=4, max_overflow=12)


@pytest.fixture
def ledger(store_env: dict[str, str], clock: ManualClock) -> Iterator[Ledger]:
    app = Ledger(store_env, clock=clock, retry_policy=RetryPolicy(base_seconds=1))
    yield app
    app.close()


@pytest.fixture
def live_ledger(store_env: dict[str, str], database_url: str, schema: str) -> Iterator[Ledger]:
    """A ledger on the real clock with short retry backoffs and leases, its views
    installed: for the roles (dispatcher, workers, reaper) running in the test."""
    ledger = Ledger(
        store_env,
        clock=SystemClock(),
        retry_policy=RetryPolicy(base_seconds=0.2, max_seconds=2),
        lease_seconds=1.0,  # a lost worker's attempt is taken a second after it went silent
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        for projection in all_projections().values():
            ensure_installed(conn, schema, projection)
    yield ledger
    ledger.close()


# -- executors over the module's own `sandbox` fixture ------------------------------------------


@pytest.fixture
def python(sandbox: Sandbox) -> PythonExecutor:
    return PythonExecutor(sandbox)


@pytest.fixture
def csharp(sandbox: Sandbox, tmp_path: Path) -> CSharpExecutor:
    executor = CSharpExecutor(sandbox, tmp_path / "csharp-cache")
    if not executor.available:
        services.unavailable(
            "Mono", "mcs or mono not found (apt-get install mono-mcs mono-runtime)"
        )
    return executor


# -- the HTTP API over a real ledger and real views ---------------------------------------------


@dataclass
class Api:
    client: httpx.AsyncClient
    context: ApiContext
    keys: dict[str, str]  # name -> key: "acme-admin", "acme-submit", "acme-read", "globex-submit"

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"ApiKey {self.keys[name]}"}

    async def catch_up(self) -> None:
        """Bring the views up to the log's head (the tests' stand-in for the runners)."""

        def run() -> None:
            with psycopg.connect(self.context.database_url) as conn:
                for projection in all_projections().values():
                    while apply_batch(conn, self.context.schema, projection, 1_000)[1]:
                        pass

        await anyio.to_thread.run_sync(run)


CONFIGURED_KEYS = {
    "acme-admin": ("acme", "admin"),
    "acme-submit": ("acme", "submit"),
    "acme-read": ("acme", "read"),
    "globex-submit": ("globex", "submit"),
}


@pytest.fixture
def api_context(ledger: Ledger, database_url: str, schema: str) -> Iterator[ApiContext]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for projection in all_projections().values():
            ensure_installed(conn, schema, projection)
    configured = [
        ConfiguredKey(tenant, Role(role), f"{name}-key-0123456789")
        for name, (tenant, role) in CONFIGURED_KEYS.items()
    ]
    pool = ConnectionPool(
        database_url, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True
    )
    context = ApiContext(
        ledger=ledger,
        queries=pool,
        database_url=database_url,
        schema=schema,
        authenticator=Authenticator(
            configured, ledger.keys.authenticate, active=ledger.keys.is_active
        ),
        watcher=TaskWatcher(database_url, schema, poll_interval=0.2),
        metrics=ApiMetrics(),
        limiter=anyio.CapacityLimiter(8),
    )
    yield context
    pool.close()


@pytest_asyncio.fixture
async def api(api_context: ApiContext) -> AsyncIterator[Api]:
    app = create_app(api_context)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://taskledger.test") as client:
        yield Api(
            client,
            api_context,
            {name: f"{name}-key-0123456789" for name in CONFIGURED_KEYS},
        )
    await api_context.watcher.close()
