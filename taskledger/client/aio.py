"""`AsyncClient`: the API over httpx, for asyncio (and trio, through anyio)."""

from __future__ import annotations

import builtins
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

import anyio
import httpx
from httpx_retries import RetryTransport
from pydantic import BaseModel

from api.schemas import (
    EventFeed,
    FeedEvent,
    History,
    HistoryItem,
    TaskList,
    TaskOut,
    TaskSummaryOut,
)
from taskledger.client import calls
from taskledger.client.calls import TERMINAL, Call, RetryPolicy
from taskledger.client.config import ClientConfig, resolve_config
from taskledger.client.errors import ConnectionFailed, error_for
from taskledger.client.session import client_headers, stream_backoff

M = TypeVar("M", bound=BaseModel)


class AsyncClient:
    """A taskledger API client for async code: the calls of `Client`, awaited. `url` and
    `api_key`, else the environment or a profile (taskledger/client/config.py); use it as
    an async context manager, or `await aclose()`.

    `retries`: how GETs and submits are retried (RetryPolicy(attempts=0): never).
    `transport`: an httpx transport to send through (tests).
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        profile: str | None = None,
        timeout: float = 30.0,
        retries: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config: ClientConfig = resolve_config(url, api_key, profile)
        self.retries = retries or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.config.url,
            headers=client_headers(self.config),
            timeout=timeout,
            transport=RetryTransport(
                transport or httpx.AsyncHTTPTransport(), self.retries.for_reads()
            ),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _send(self, call: Call, model: type[M]) -> M:
        request = call.build(self._http, self.retries)
        try:
            response = await self._http.send(request)
        except httpx.HTTPError as error:
            retried = call.idempotent or call.method == "GET"
            raise ConnectionFailed(call.method, str(request.url), error, retried=retried) from None
        return calls.read(model, response)

    # -- tasks -----------------------------------------------------------------------------

    async def submit(
        self,
        code: str | None = None,
        *,
        file: str | Path | None = None,
        language: str | None = None,
        data: Any = None,
        ttl_seconds: float | None = None,
        max_attempts: int | None = None,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> TaskOut:
        """Submit a task: `code`, or the program in `file` (its language guessed from .py or
        .cs, its name the description unless given). Safe to retry: it always sends an
        Idempotency-Key (`idempotency_key`, or a new one)."""
        call = calls.submit(
            code,
            file=file,
            language=language,
            data=data,
            ttl_seconds=ttl_seconds,
            max_attempts=max_attempts,
            description=description,
            idempotency_key=idempotency_key,
        )
        return await self._send(call, TaskOut)

    async def get(self, task_id: UUID | str, *, wait: float = 0.0) -> TaskOut:
        """The task; with `wait` (at most 60 s), as soon as it is terminal or after `wait`."""
        return await self._send(calls.get(task_id, wait=wait), TaskOut)

    async def wait(self, task_id: UUID | str, timeout: float = 300.0) -> TaskOut:
        """The task once terminal, or as it is when `timeout` seconds are up (check its
        `status`): long polls of up to 60 s each."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            task = await self.get(task_id, wait=max(remaining, 0.0))
            if task.status in TERMINAL or deadline - time.monotonic() <= 0:
                return task

    async def history(self, task_id: UUID | str) -> builtins.list[HistoryItem]:
        """Every event of the task, in order, each with its position in the log."""
        return (await self._send(calls.history(task_id), History)).items

    async def retry(self, task_id: UUID | str, *, ttl_seconds: float | None = None) -> TaskOut:
        """A Failed, Expired or Cancelled task runs again (a new run, a new deadline)."""
        return await self._send(calls.retry(task_id, ttl_seconds=ttl_seconds), TaskOut)

    async def cancel(self, task_id: UUID | str, *, reason: str | None = None) -> TaskOut:
        return await self._send(calls.cancel(task_id, reason=reason), TaskOut)

    async def update(
        self, task_id: UUID | str, patch: Mapping[str, Any], *, if_match: int | None = None
    ) -> TaskOut:
        """A JSON merge patch of description, data, code, ttl_seconds, max_attempts.
        `if_match`: the version the patch was written against (PreconditionFailed if the
        task has moved on)."""
        return await self._send(calls.update(task_id, patch, if_match=if_match), TaskOut)

    async def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        language: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        q: str | None = None,
        page_size: int = 100,
    ) -> AsyncGenerator[TaskSummaryOut, None]:
        """Every task the filters select, newest first, page after page as it is read."""
        cursor: str | None = None
        while True:
            call = calls.list_page(
                status=status,
                language=language,
                created_after=created_after,
                created_before=created_before,
                q=q,
                limit=page_size,
                cursor=cursor,
            )
            page = await self._send(call, TaskList)
            for task in page.items:
                yield task
            cursor = page.next_cursor
            if cursor is None:
                return

    # -- the event feed ----------------------------------------------------------------------

    async def events(
        self,
        *,
        after: int = 0,
        follow: bool = False,
        timeout: float | None = None,
        page_size: int = 100,
    ) -> AsyncGenerator[FeedEvent, None]:
        """The ledger's events past position `after`, oldest first (the key's tenant's; an
        admin's, every tenant's); resume with the last `position` seen. `follow`: then wait
        for new ones over the server's event stream, as long as the iteration goes on or,
        with `timeout`, for that many seconds."""
        while True:
            page = await self._send(calls.events_page(after, page_size), EventFeed)
            for item in page.items:
                yield item
                after = item.position
            if len(page.items) < page_size:
                break
        if follow:
            async for event in self._follow(after, calls.deadline_after(timeout)):
                yield event

    async def _follow(self, after: int, deadline: float | None) -> AsyncGenerator[FeedEvent, None]:
        failures = 0
        while (read_timeout := calls.stream_read_timeout(deadline)) > 0:
            request = calls.events_stream(after, read_timeout).build(self._http, self.retries)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as error:
                if calls.passed(deadline):
                    return
                raise ConnectionFailed("GET", str(request.url), error, retried=True) from None
            try:
                if response.is_error:
                    await response.aread()
                    raise error_for(response)
                parser = calls.EventStreamParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        failures = 0
                        after = event.position
                        yield event
                    if calls.passed(deadline):
                        return
            except httpx.TransportError as error:
                if calls.passed(deadline):
                    return
                # The stream broke (the server restarted, a proxy cut it): resume after
                # the last event received, a bounded number of times in a row.
                failures += 1
                if failures > self.retries.attempts:
                    raise ConnectionFailed("GET", str(request.url), error, retried=True) from None
                await anyio.sleep(stream_backoff(self.retries, failures))
            finally:
                await response.aclose()
