"""What the API needs from the rest of taskledger, handed in by the composition root."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
from psycopg_pool import ConnectionPool

from api.auth import Authenticator
from api.metrics import ApiMetrics
from api.watch import TaskWatcher
from ledger import Ledger, Submission
from ledger.batching import Batcher
from ledger.service import SubmitRequest


@dataclass(frozen=True)
class ApiLimits:
    request_body_bytes: int = 1024 * 1024
    max_wait_seconds: float = 60.0
    page_size: int = 50
    max_page_size: int = 500
    ready_max_projection_lag: int = 10_000
    max_streams_per_key: int = 4  # open event streams (GET /api/events as SSE)


@dataclass
class ApiContext:
    ledger: Ledger
    queries: ConnectionPool  # for the views (autocommit connections)
    database_url: str
    schema: str
    authenticator: Authenticator
    watcher: TaskWatcher
    metrics: ApiMetrics
    limiter: anyio.CapacityLimiter
    limits: ApiLimits = field(default_factory=ApiLimits)
    # Extra readiness checks (the broker, …): name -> problem, or None when fine.
    readiness: dict[str, Callable[[], Awaitable[str | None]]] = field(default_factory=dict)
    # Roles this process runs beside the API (dispatcher, reaper, a worker pool in dev):
    # started with the app, stopped (through the event) when it shuts down.
    background: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = field(
        default_factory=list
    )
    # Called once the background roles have stopped (closing the broker, …).
    shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Submissions of concurrent requests share a thread hop and a transaction.
    submissions: Batcher[SubmitRequest, Submission] = field(init=False)
    # Event streams open in this process, by key id (api.events bounds them per key).
    open_streams: Counter[str] = field(default_factory=Counter)
    # Signs the dashboard's session cookies (TASKLEDGER_UI_SECRET; random when unset).
    ui_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def __post_init__(self) -> None:
        self.submissions = Batcher(self.ledger.submit_many)
