"""The web dashboard at /ui: server-rendered pages over the API's own queries.

`create_ui(context)` is an app of its own, mounted by api/app.py at /ui, so that its
errors are pages (not problem documents) and every answer carries its security headers.
Modules: `sessions` (the signed cookie, CSRF), `render` (templates), `signin`,
`overview`, `task_list` (list, live rows, bulk), `task_page` (one task, its live status,
its actions; the submit form), `timeline`, `admin` (audit, keys), `params`.
"""

from __future__ import annotations

import logging

import psycopg
from eventsourcing import persistence as store
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.context import ApiContext
from api.errors import ApiProblem, ledger_problem, validation_errors
from api.ui import admin, overview, signin, task_list, task_page
from api.ui.render import HERE, error_page, to_sign_in
from api.ui.sessions import CsrfRefused, FormTooLarge, SignInRequired, end_session
from ledger.errors import LedgerError, LedgerUnavailable
from projections.queries import InvalidCursor

log = logging.getLogger("api.ui")

# No script, style or frame from anywhere else, none inline; no page of ours in a frame.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
        b"form-action 'self'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
]


class SecurityHeaders:
    """The headers above on every UI answer; `Cache-Control: no-store` on all but the
    static files (pages hold a tenant's data, and the keys page a new key)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].removeprefix(scope.get("root_path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if static or name.lower() != b"cache-control"
                ]
                headers += SECURITY_HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _sign_in(request: Request, exc: Exception) -> Response:
    response = to_sign_in(request)
    end_session(request, response)
    return response


async def _csrf(request: Request, exc: Exception) -> Response:
    return error_page(
        request,
        403,
        f"CSRF check failed: {exc}. Nothing was changed. Reload the page and try again.",
    )


async def _too_large(request: Request, exc: Exception) -> Response:
    return error_page(request, 413, "The form is too large (at most 1 MiB).")


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    detail = exc.detail
    if exc.status == 404:
        detail = "No such task here: it does not exist, or it is another tenant's."
    return error_page(request, exc.status, detail)


async def _ledger(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LedgerError)
    return await _problem(request, ledger_problem(exc))


async def _database(request: Request, exc: Exception) -> Response:
    return await _ledger(request, LedgerUnavailable(f"database error: {exc}"))


async def _cursor(request: Request, exc: Exception) -> Response:
    return error_page(request, 400, f"{exc}: start again from the first page.")


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in validation_errors(exc))
    return error_page(request, 422, detail)


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_page(request, 404, f"There is no page at {request.url.path}.")
    return error_page(request, exc.status_code, str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error(
        "unhandled error answering a UI request",
        exc_info=exc,
        extra={"request_id": getattr(request.state, "request_id", None), "path": request.url.path},
    )
    return error_page(request, 500, "The server failed to answer; the error is in its log.")


EXCEPTION_HANDLERS = {
    SignInRequired: _sign_in,
    CsrfRefused: _csrf,
    FormTooLarge: _too_large,
    ApiProblem: _problem,
    LedgerError: _ledger,
    psycopg.OperationalError: _database,
    psycopg.InterfaceError: _database,
    store.OperationalError: _database,
    store.InterfaceError: _database,
    InvalidCursor: _cursor,
    ValidationError: _invalid,
    HTTPException: _http,
    Exception: _unexpected,
}


async def _pygments_css(request: Request) -> Response:
    return Response(task_page.pygments_css(), media_type="text/css")


class AtRoot:
    """/ui itself, answered by the UI's "/" (a Mount matches only below its path: without
    this, /ui would first redirect to /ui/)."""

    def __init__(self, ui: ASGIApp) -> None:
        self.ui = ui

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "") + "/ui"
        path = root + "/"
        await self.ui(
            {**scope, "path": path, "raw_path": path.encode(), "root_path": root}, receive, send
        )


def ui_routes(context: ApiContext) -> list[BaseRoute]:
    """What api/app.py mounts: the UI at /ui and below."""
    ui = create_ui(context)
    return [Route("/ui", AtRoot(ui)), Mount("/ui", app=ui)]


def create_ui(context: ApiContext) -> Starlette:
    routes = [
        Route("/", overview.overview, methods=["GET"]),
        Route("/login", signin.login_page, methods=["GET"]),
        Route("/login", signin.login, methods=["POST"]),
        Route("/logout", signin.logout, methods=["POST"]),
        Route("/tasks", task_list.tasks_page, methods=["GET"]),
        Route("/tasks/rows", task_list.task_rows, methods=["GET"]),
        Route("/tasks/bulk", task_list.bulk, methods=["POST"]),
        Route("/tasks/{task_id}", task_page.task_page, methods=["GET"]),
        Route("/tasks/{task_id}/status", task_page.task_status, methods=["GET"]),
        Route("/tasks/{task_id}/retry", task_page.retry, methods=["POST"]),
        Route("/tasks/{task_id}/cancel", task_page.cancel, methods=["POST"]),
        Route("/tasks/{task_id}/edit", task_page.edit, methods=["POST"]),
        Route("/submit", task_page.submit_page, methods=["GET"]),
        Route("/submit", task_page.submit_form, methods=["POST"]),
        Route("/audit", admin.audit, methods=["GET"]),
        Route("/audit/export", admin.audit_file, methods=["GET"]),
        Route("/keys", admin.keys, methods=["GET"]),
        Route("/keys", admin.issue_key, methods=["POST"]),
        Route("/keys/{key_id}/revoke", admin.revoke_key, methods=["POST"]),
        Route("/static/pygments.css", _pygments_css, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="ui-static"),
    ]
    ui = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    ui.state.ctx = context  # the API's helpers find the context on the app
    ui.add_middleware(SecurityHeaders)
    return ui
