"""GET /api/events: the ledger's events as a feed, for systems that follow it.

JSON pages (`?after=<position>&limit=N`), or with `Accept: text/event-stream` a live
Server-Sent Events stream that resumes from `Last-Event-ID` (each event's id is its
position). A caller sees its tenant's events (an admin every tenant's), each with the
hash chain at its position. The events come from the audit view, which applies the log in
position order: a follower that resumes from its last position misses none.

A stream holds no database connection while it waits (it reads a page, sends it, and
waits for the log to move, woken by the process's one LISTEN connection), and a key may
hold at most `ApiLimits.max_streams_per_key` of them at once (429 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from api.errors import ApiProblem
from api.http import (
    authenticate,
    context,
    in_thread,
    int_param,
    model_response,
    reject_unknown_params,
)
from api.schemas import EventFeed, FeedEvent, dump_json
from ledger.keys import Role
from projections.queries import events_after

STREAM_PAGE = 500  # events read at once by a stream
KEEPALIVE_SECONDS = 15.0  # an SSE comment this often when nothing happens (proxies close idle)
POLL_SECONDS = 0.5  # a stream looks again this often after a wake that found nothing yet


async def events_feed(request: Request) -> Response:
    principal = await authenticate(request, Role.READ)
    reject_unknown_params(request, {"after", "limit"})
    ctx = context(request)
    after = int_param(request, "after", 0, 0, 2**63 - 1)
    if "text/event-stream" not in request.headers.get("accept", ""):
        limit = int_param(request, "limit", 100, 1, ctx.limits.max_page_size)
        rows = await in_thread(request, lambda: _read(request, principal.scope, after, limit))
        last = rows[-1]["position"] if rows else after
        return model_response(EventFeed, {"items": rows, "next_after": last})
    resume = request.headers.get("last-event-id")
    if resume is not None:
        if not resume.isdigit():
            raise ApiProblem(
                400,
                "bad-request",
                "Last-Event-ID must be the position of the last event received",
                errors=[{"field": "Last-Event-ID", "message": "must be a whole number"}],
            )
        after = max(after, int(resume))
    key = principal.key_id
    if ctx.open_streams[key] >= ctx.limits.max_streams_per_key:
        raise ApiProblem(
            429,
            "too-many-streams",
            f"this key has {ctx.open_streams[key]} event streams open, the most it may: close "
            "one, or follow with JSON pages (?after=)",
        )
    ctx.open_streams[key] += 1
    return StreamingResponse(
        _stream(request, principal.scope, after, key),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _read(request: Request, tenant: str | None, after: int, limit: int) -> list[dict[str, Any]]:
    ctx = context(request)
    with ctx.queries.connection() as conn:
        return events_after(conn, ctx.schema, tenant=tenant, after=after, limit=limit)


async def _stream(
    request: Request, tenant: str | None, after: int, key: str
) -> AsyncIterator[bytes]:
    ctx = context(request)
    loop = asyncio.get_running_loop()
    try:
        yield b"retry: 1000\n\n"
        sent = loop.time()
        with ctx.watcher.subscribe_all() as changed:
            while True:
                changed.clear()
                read = functools.partial(_read, request, tenant, after, STREAM_PAGE)
                rows = await in_thread(request, read)
                for row in rows:
                    after = row["position"]
                    body = dump_json(FeedEvent.model_validate(row))
                    yield b"id: %d\nevent: %s\ndata: %s\n\n" % (after, row["type"].encode(), body)
                    sent = loop.time()
                if len(rows) == STREAM_PAGE:
                    continue
                # Woken when the log moves; the audit view applies it a moment later, so
                # a wake that finds nothing looks again shortly.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), POLL_SECONDS)
                # Over ASGI 2.4 only a failed send tells of a client gone; an idle stream
                # asks, so that it gives its key's place back within a poll.
                if await request.is_disconnected():
                    return
                if loop.time() - sent >= KEEPALIVE_SECONDS:
                    yield b": keep-alive\n\n"
                    sent = loop.time()
    finally:
        ctx.open_streams[key] -= 1
        if ctx.open_streams[key] <= 0:
            del ctx.open_streams[key]
