"""Templates and their helpers: pages, fragments and the UI's error pages."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from api.errors import problem_title

log = logging.getLogger("api.ui")

HERE = Path(__file__).parent

# Status as text and a symbol, never by colour alone (the symbol is aria-hidden: the text
# says it).
STATUS_SYMBOLS = {
    "Pending": "○",
    "InProgress": "▶",
    "Completed": "✓",
    "Failed": "✗",
    "Expired": "◔",
    "Cancelled": "⊘",
}
STATUS_TEXT = {"InProgress": "In progress"}

# Fixed messages a redirect may ask a page to show (`?notice=`): a code, never free text,
# so a link cannot put words of its choosing on our page.
NOTICES = {
    "retried": "Retry scheduled: a new attempt is pending.",
    "cancelled": "The task is cancelled.",
    "saved": "Saved.",
    "signed-out": "You are signed out.",
    "revoked": "The key is revoked.",
}


def _time(value: datetime | None) -> Markup:
    if value is None:
        return Markup("—")
    return Markup('<time datetime="{}">{}</time>').format(
        value.isoformat(), value.strftime("%Y-%m-%d %H:%M:%S UTC")
    )


def _status(value: str) -> Markup:
    return Markup(
        '<span class="status status-{}"><span aria-hidden="true">{}</span> {}</span>'
    ).format(value.lower(), STATUS_SYMBOLS.get(value, "?"), STATUS_TEXT.get(value, value))


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z).decode()


def _query(pairs: list[tuple[str, str]], **changes: str | None) -> str:
    """A query string of `pairs` with `changes` (None removes a name)."""
    kept = [(k, v) for k, v in pairs if k not in changes]
    kept += [(k, v) for k, v in changes.items() if v is not None]
    return urlencode(kept)


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["time"] = _time
templates.filters["status"] = _status
templates.filters["json"] = _json
templates.globals["query"] = _query
templates.globals["STATUS_SYMBOLS"] = STATUS_SYMBOLS
templates.globals["STATUS_TEXT"] = STATUS_TEXT


def page(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    """`template` rendered for the request's session (None before signing in)."""
    session = getattr(request.state, "session", None)
    notice = NOTICES.get(request.query_params.get("notice", ""))
    body = templates.get_template(template).render(
        session=session, notice=notice, path=request.url.path, **values
    )
    return HTMLResponse(body, status)


def fragment(template: str, **values: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(**values))


def error_page(request: Request, status: int, detail: str) -> HTMLResponse:
    return page(request, "error.html", status, title=problem_title(status), detail=detail)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, 303)


def to_sign_in(request: Request) -> Response:
    """A browser with no valid session goes to sign in; a page's script polling a
    fragment gets 401 (it reloads the page, which then goes there)."""
    if request.headers.get("x-requested-with") == "taskledger-ui":
        return HTMLResponse("sign in again", 401)
    return see_other("/ui/login")
