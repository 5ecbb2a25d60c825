"""The Starlette application: `create_app(context)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from openapi_ui_bundles import swagger_ui
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import events, keys, system, tasks, webhooks
from api.context import ApiContext
from api.errors import EXCEPTION_HANDLERS
from api.http import json_response
from api.openapi import build_openapi
from api.ui import ui_routes

log = logging.getLogger("api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

SWAGGER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>taskledger API</title>
<link rel="stylesheet" href="/swagger/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger/static/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
</script></body></html>
"""


class RequestLog:
    """One JSON log line and the metrics of every request; a request id for each.

    The id comes from a well-formed X-Request-ID header or is made up, and is echoed back.
    """

    def __init__(self, app: ASGIApp, context: ApiContext) -> None:
        self.app = app
        self.metrics = context.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.request_seconds.labels(scope["method"], template).observe(elapsed)
            fields: dict[str, Any] = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            }
            for name in ("tenant", "key_id", "task_id"):
                if name in state:
                    fields[name] = state[name]
            log.info("request", extra=fields)


Endpoint = Callable[[Request], Awaitable[Response]]


def by_method(**endpoints: Endpoint) -> Endpoint:
    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    return dispatch


def create_app(context: ApiContext) -> Starlette:
    spec = build_openapi()

    async def openapi(request: Request) -> Response:
        return json_response(spec)

    async def swagger(request: Request) -> Response:
        return HTMLResponse(SWAGGER_PAGE)

    routes = [
        # One route per resource, so a 405's Allow header names all of its methods.
        Route(
            "/api/tasks",
            by_method(GET=tasks.list_tasks_route, POST=tasks.submit_task),
            methods=["GET", "POST"],
        ),
        # Before /api/tasks/{task_id}, which its path also fits (a 405 would name GET, PATCH).
        Route("/api/tasks/bulk", tasks.bulk_tasks, methods=["POST"]),
        Route(
            "/api/tasks/{task_id}",
            by_method(GET=tasks.get_task, PATCH=tasks.patch_task),
            methods=["GET", "PATCH"],
        ),
        Route("/api/tasks/{task_id}/retry", tasks.retry_task, methods=["POST"]),
        Route("/api/tasks/{task_id}/cancel", tasks.cancel_task, methods=["POST"]),
        Route("/api/tasks/{task_id}/history", tasks.task_history, methods=["GET"]),
        Route("/api/audit", system.audit, methods=["GET"]),
        Route("/api/stats", system.stats, methods=["GET"]),
        Route("/api/stats/minutes", system.stats_minutes, methods=["GET"]),
        Route(
            "/api/keys",
            by_method(GET=keys.list_keys_route, POST=keys.issue_key_route),
            methods=["GET", "POST"],
        ),
        Route("/api/keys/{key_id}/revoke", keys.revoke_key_route, methods=["POST"]),
        Route(
            "/api/webhooks/secret",
            by_method(GET=webhooks.get_secret, POST=webhooks.rotate_secret),
            methods=["GET", "POST"],
        ),
        Route(
            "/api/webhooks/default",
            by_method(GET=webhooks.get_default, PUT=webhooks.put_default),
            methods=["GET", "PUT"],
        ),
        Route("/api/workers", system.workers, methods=["GET"]),
        Route("/api/ledger/verify", system.verify_ledger, methods=["GET"]),
        Route("/api/events", events.events_feed, methods=["GET"]),
        Route("/healthz", system.healthz, methods=["GET"]),
        Route("/readyz", system.readyz, methods=["GET"]),
        Route("/metrics", system.metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/swagger", swagger, methods=["GET"]),
        Mount(
            "/swagger/static", StaticFiles(directory=str(swagger_ui.static_path)), name="swagger"
        ),
        *ui_routes(context),  # the web dashboard (api/ui/, docs/ui.md)
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        roles = [asyncio.create_task(role(stop)) for role in context.background]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*roles, return_exceptions=True)
            for close in context.shutdown:
                await close()
            await context.watcher.close()
            await context.submissions.close()

    app = Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.ctx = context
    app.add_middleware(RequestLog, context=context)
    return app
