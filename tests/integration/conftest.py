from __future__ import annotations

from collections.abc import Iterator

import pytest

from ledger import Ledger, ManualClock, RetryPolicy
from ledger.persistence import postgres_env


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
