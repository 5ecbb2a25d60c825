"""What `Client` and `AsyncClient` share beyond the calls: headers, backoffs."""

from __future__ import annotations

import random
from importlib import metadata

from taskledger.client.calls import RetryPolicy
from taskledger.client.config import ClientConfig


def client_headers(config: ClientConfig) -> dict[str, str]:
    # The API's own scheme (a generated client's default, Bearer, works too; ApiKey is
    # what docs/api.md names first and what its 401 asks for).
    return {"Authorization": f"ApiKey {config.api_key}", "User-Agent": user_agent()}


def user_agent() -> str:
    try:
        version = metadata.version("taskledger")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"taskledger-client/{version}"


def stream_backoff(policy: RetryPolicy, failures: int) -> float:
    """Seconds before reconnecting a broken event stream: exponential, fully jittered."""
    ceiling = min(policy.backoff_seconds * 2 ** (failures - 1), policy.max_backoff_seconds)
    return random.uniform(0, ceiling)
