"""The API's calls as data, shared by `Client` and `AsyncClient`: which request each sends,
whether it may be retried, how its answer is read. No I/O here.

Retries (httpx-retries, on the transport): a request is retried on a connection error, a
timeout, 429 and 503 (after Retry-After when the server sends one, else an exponential
backoff with full jitter), a bounded number of times, but only when sending it twice
cannot do twice what it asks: GETs, and `submit`, which always carries an Idempotency-Key
(a second POST with the same key and body answers the task the first one stored).
`retry`, `cancel` and `update` are never retried: after a lost answer the server may have
applied them, and a second one would act again or fail on the state the first one left
(a second cancel is a 409, a second retry starts another run); the caller decides.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
from httpx_retries import Retry
from pydantic import BaseModel

from api.schemas import FeedEvent
from taskledger.client.errors import UsageError, error_for

M = TypeVar("M", bound=BaseModel)

TERMINAL = frozenset({"Completed", "Failed", "Expired", "Cancelled"})
MAX_WAIT_SECONDS = 60.0  # the most one `?wait=` may ask (docs/api.md)
LANGUAGES_BY_SUFFIX = {".py": "python", ".cs": "csharp"}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a retryable request is tried again."""

    attempts: int = 4  # retries after the first try
    backoff_seconds: float = 0.25  # the first backoff's bound; doubled each time, fully jittered
    max_backoff_seconds: float = 10.0  # also caps a Retry-After

    def for_reads(self) -> Retry:
        """Retries of GETs (and HEADs): the transport's default."""
        return Retry(
            total=self.attempts,
            allowed_methods=["GET", "HEAD"],
            status_forcelist=[429, 503],
            # httpx-retries waits up to factor x 2^n before retry n (from 1): half of it
            # makes `backoff_seconds` the first wait's bound.
            backoff_factor=self.backoff_seconds / 2,
            max_backoff_wait=self.max_backoff_seconds,
        )

    def for_submit(self) -> Retry:
        """Retries of a POST that carries an Idempotency-Key."""
        return self.for_reads().copy_with(allowed_methods=["POST"])


NO_RETRIES = RetryPolicy(attempts=0)


@dataclass(frozen=True)
class Call:
    """One request: what to send, whether it is safe to send again."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    body: Any = None  # JSON; None: no body
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = False
    read_timeout: float | None = None  # for a long poll: longer than it waits

    def retry(self, policy: RetryPolicy) -> Retry:
        if self.method in ("GET", "HEAD"):
            return policy.for_reads()
        if self.idempotent:
            return policy.for_submit()
        return NO_RETRIES.for_reads()

    def build(self, http: httpx.Client | httpx.AsyncClient, policy: RetryPolicy) -> httpx.Request:
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if self.read_timeout is not None:
            base = http.timeout
            timeout = httpx.Timeout(
                connect=base.connect, read=self.read_timeout, write=base.write, pool=base.pool
            )
        return http.build_request(
            self.method,
            self.path,
            params=self.params,
            json=self.body,
            headers=self.headers,
            timeout=timeout,
            extensions={"retry": self.retry(policy)},
        )


def read(model: type[M], response: httpx.Response) -> M:
    """The answer as `model`, or the typed error of a problem answer."""
    if response.is_error:
        raise error_for(response)
    return model.model_validate_json(response.content)


# -- the calls ---------------------------------------------------------------------------------


def submit(
    code: str | None,
    *,
    file: str | Path | None,
    language: str | None,
    data: Any,
    ttl_seconds: float | None,
    max_attempts: int | None,
    description: str | None,
    idempotency_key: str | None,
) -> Call:
    if file is not None:
        if code is not None:
            raise UsageError("give the code or a file, not both")
        path = Path(file)
        try:
            code = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read {path}: {error}") from None
        language = language or guess_language(path)
        if description is None:
            description = path.name
    if language is None:
        raise UsageError("say which language the code is in (language=python, csharp or echo)")
    body: dict[str, Any] = {"language": language}
    given = {
        "code": code,
        "data": data,
        "description": description,
        "ttl_seconds": ttl_seconds,
        "max_attempts": max_attempts,
    }
    body |= {name: value for name, value in given.items() if value is not None}
    # Generated when not given: a retry of this very request then finds the task the first
    # try stored instead of storing another.
    key = idempotency_key or str(uuid.uuid4())
    return Call("POST", "/api/tasks", body=body, headers={"Idempotency-Key": key}, idempotent=True)


def guess_language(path: Path) -> str:
    language = LANGUAGES_BY_SUFFIX.get(path.suffix.lower())
    if language is None:
        known = ", ".join(f"{suffix} ({name})" for suffix, name in LANGUAGES_BY_SUFFIX.items())
        raise UsageError(
            f"cannot guess the language of {path.name} from its extension ({known}); "
            "say which (language=…, --language)"
        )
    return language


def get(task_id: UUID | str, *, wait: float = 0.0) -> Call:
    if wait <= 0:
        return Call("GET", f"/api/tasks/{task_id}")
    seconds = min(wait, MAX_WAIT_SECONDS)
    return Call(
        "GET",
        f"/api/tasks/{task_id}",
        params=(("wait", f"{seconds:g}"),),
        read_timeout=seconds + 30,
    )


def list_page(
    *,
    status: str | Iterable[str] | None,
    language: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
    q: str | None,
    limit: int,
    cursor: str | None,
) -> Call:
    params: list[tuple[str, str]] = []
    statuses = [status] if isinstance(status, str) else list(status or [])
    params += [("status", name) for name in statuses]
    if language is not None:
        params.append(("language", language))
    for name, moment in (("created_after", created_after), ("created_before", created_before)):
        if moment is not None:
            if moment.tzinfo is None:
                raise UsageError(f"{name} must be an aware datetime (with a time zone)")
            params.append((name, moment.isoformat()))
    if q is not None:
        params.append(("q", q))
    params.append(("limit", str(limit)))
    if cursor is not None:
        params.append(("cursor", cursor))
    return Call("GET", "/api/tasks", params=tuple(params))


def history(task_id: UUID | str) -> Call:
    return Call("GET", f"/api/tasks/{task_id}/history")


def retry(task_id: UUID | str, *, ttl_seconds: float | None) -> Call:
    body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
    return Call("POST", f"/api/tasks/{task_id}/retry", body=body)


def cancel(task_id: UUID | str, *, reason: str | None) -> Call:
    body = {} if reason is None else {"reason": reason}
    return Call("POST", f"/api/tasks/{task_id}/cancel", body=body)


def update(task_id: UUID | str, patch: Mapping[str, Any], *, if_match: int | None) -> Call:
    headers = {} if if_match is None else {"If-Match": f'"{if_match}"'}
    return Call(
        "PATCH",
        f"/api/tasks/{task_id}",
        body=dict(patch),
        headers=headers | {"Content-Type": "application/merge-patch+json"},
    )


def events_page(after: int, limit: int) -> Call:
    return Call("GET", "/api/events", params=(("after", str(after)), ("limit", str(limit))))


STREAM_READ_TIMEOUT = 45.0  # the server sends a keep-alive every 15 s


def events_stream(after: int, read_timeout: float = STREAM_READ_TIMEOUT) -> Call:
    return Call(
        "GET",
        "/api/events",
        params=(("after", str(after)),),
        headers={"Accept": "text/event-stream"},
        read_timeout=read_timeout,
    )


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def stream_read_timeout(deadline: float | None) -> float:
    """How long one read of the event stream may wait: the keep-alive's bound, or less up
    to the deadline (0: the deadline has passed)."""
    if deadline is None:
        return STREAM_READ_TIMEOUT
    return max(0.0, min(STREAM_READ_TIMEOUT, deadline - time.monotonic()))


class EventStreamParser:
    """Server-Sent Events, line by line, into feed events (`data:` is the feed's item)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> FeedEvent | None:
        if line == "":
            data, self._data = self._data, []
            return FeedEvent.model_validate_json("\n".join(data)) if data else None
        if line.startswith(":"):
            return None  # a comment: the keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        # id, event and retry say again what the item says (position, type) or do not
        # apply: a reconnection resumes from the last position received.
        return None
