"""A Python client of the taskledger API: `Client` (blocking) and `AsyncClient`, over httpx.

    from taskledger.client import Client

    with Client() as tl:  # TASKLEDGER_URL and TASKLEDGER_API_KEY, or a profile
        task = tl.submit("print(sum(data))", language="python", data=[1, 2, 3])
        print(tl.wait(task.id).result.stdout)

They answer with the server's own models (api/schemas.py) and raise `ApiError`s carrying
its problem documents. docs/client.md has every call. Importing this package imports
nothing of the server (no settings, database driver or web framework).
"""

from __future__ import annotations

from api.schemas import (
    FeedEvent,
    HistoryItem,
    Problem,
    Result,
    TaskError,
    TaskOut,
    TaskSummaryOut,
)
from taskledger.client.aio import AsyncClient
from taskledger.client.calls import TERMINAL, RetryPolicy
from taskledger.client.config import ClientConfig, config_file, resolve_config
from taskledger.client.errors import (
    ApiError,
    BadRequest,
    ClientError,
    ConfigurationError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UsageError,
    ValidationError,
)
from taskledger.client.sync import Client

__all__ = [
    "TERMINAL",
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientConfig",
    "ClientError",
    "ConfigurationError",
    "Conflict",
    "ConnectionFailed",
    "FeedEvent",
    "Forbidden",
    "HistoryItem",
    "NotFound",
    "PreconditionFailed",
    "Problem",
    "Result",
    "RetryPolicy",
    "ServerError",
    "TaskError",
    "TaskOut",
    "TaskSummaryOut",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "UsageError",
    "ValidationError",
    "config_file",
    "resolve_config",
]
