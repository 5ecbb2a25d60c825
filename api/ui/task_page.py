"""One task: its summary, code, data, output, timeline and history, as of any of its
events; its live status; retry, cancel and edit. And the submit form."""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from markupsafe import Markup
from pydantic import ValidationError
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from starlette.requests import Request
from starlette.responses import Response

from api.errors import ApiProblem, validation_errors
from api.http import context, in_thread, int_param, task_id_param
from api.schemas import TaskCreate, TaskPatch
from api.tasks import LANGUAGES, submit, task_content, watch_task
from api.ui.render import fragment, page, see_other
from api.ui.sessions import Session, checked_form, require_session
from api.ui.timeline import build as build_timeline
from ledger import TaskState
from ledger.keys import Role
from ledger.state import HistoryEntry

# Code is highlighted into CSS classes (no inline styles: the pages' CSP allows none);
# their colours are the stylesheet served at /ui/static/pygments.css.
FORMATTER = HtmlFormatter(cssclass="highlight", wrapcode=True)
PYGMENTS_STYLE = "default"  # its colours meet WCAG AA contrast on white (Pygments 2.11+)
LIVE_WAIT_SECONDS = 25.0  # a status long poll answers after this long without a change


def pygments_css() -> str:
    formatter = HtmlFormatter(style=PYGMENTS_STYLE, cssclass="highlight")
    css: str = formatter.get_style_defs(".highlight")  # type: ignore[no-untyped-call]
    return css


LEXERS = {"python": "python", "csharp": "csharp"}  # echo runs no code: plain text


def _lexer(language: str) -> Lexer:
    return get_lexer_by_name(LEXERS.get(language, "text"))


def highlighted(code: str, language: str) -> Markup:
    # Pygments escapes the code it formats.
    return Markup(highlight(code, _lexer(language), FORMATTER))  # noqa: S704


async def task_page(request: Request) -> Response:
    session = await require_session(request)
    task_id = task_id_param(request)
    as_of = int_param(request, "as_of_version", 0, 1, 2**31 - 1)
    ctx = context(request)
    scope = session.principal.scope

    def read() -> tuple[TaskState, list[HistoryEntry], TaskState | None]:
        history = ctx.ledger.history(task_id, tenant=scope)
        current = ctx.ledger.get(task_id, tenant=scope)
        past = ctx.ledger.get_as_of(task_id, tenant=scope, version=as_of) if as_of else None
        return current, history, past

    current, history, past = await in_thread(request, read)
    shown = past or current
    entries = history[: shown.version]
    now = entries[-1].at if past is not None else ctx.ledger.clock.now()
    content = task_content(shown)
    return page(
        request,
        "task.html",
        task=shown,
        content=content,
        current=current,
        as_of=as_of or None,
        history=history,
        entries=entries,
        timeline=build_timeline(entries, shown.attempts, max(now, entries[-1].at)),
        code=highlighted(shown.code, shown.language),
        data=orjson.dumps(shown.data, option=orjson.OPT_INDENT_2).decode(),
        csrf=session.csrf,
    )


async def task_status(request: Request) -> Response:
    """The status element, as soon as the task is past `version` (or after a while
    without a change): the page's script long-polls it."""
    session = await require_session(request)
    task_id = task_id_param(request)
    known = int_param(request, "version", 0, 0, 2**31 - 1)
    ctx = context(request)

    def load() -> TaskState:
        return ctx.ledger.get(task_id, tenant=session.principal.scope)

    task = await watch_task(request, task_id, load, lambda t: t.version != known, LIVE_WAIT_SECONDS)
    return fragment("_status.html", task=task, page_version=known)


async def retry(request: Request) -> Response:
    session = await require_session(request, Role.SUBMIT)
    task_id = task_id_param(request)
    await checked_form(request, session)
    ctx = context(request)
    await in_thread(
        request,
        lambda: ctx.ledger.retry(task_id, by=session.key_id, tenant=session.principal.scope),
    )
    return see_other(f"/ui/tasks/{task_id}?notice=retried")


async def cancel(request: Request) -> Response:
    session = await require_session(request, Role.SUBMIT)
    task_id = task_id_param(request)
    form = await checked_form(request, session)
    reason = form.get("reason")
    ctx = context(request)
    task = await in_thread(
        request,
        lambda: ctx.ledger.cancel(
            task_id,
            by=session.key_id,
            reason=reason[:1000] if isinstance(reason, str) else "",
            tenant=session.principal.scope,
        ),
    )
    ctx.metrics.tasks_cancelled.labels(task.language).inc()
    return see_other(f"/ui/tasks/{task_id}?notice=cancelled")


async def edit(request: Request) -> Response:
    """Change the description, if the task is still at the version the form was made
    from (the API's If-Match): a stale form changes nothing and says so (412)."""
    session = await require_session(request, Role.SUBMIT)
    task_id = task_id_param(request)
    form = await checked_form(request, session)
    version = form.get("version")
    if not isinstance(version, str) or not version.isdigit():
        raise ApiProblem(422, "invalid-request", "version: must be the task's version number")
    patch = TaskPatch.model_validate({"description": form.get("description")})
    ctx = context(request)
    await in_thread(
        request,
        lambda: ctx.ledger.update(
            task_id,
            {"description": patch.description},
            by=session.key_id,
            expected_version=int(version),
            tenant=session.principal.scope,
        ),
    )
    return see_other(f"/ui/tasks/{task_id}?notice=saved")


SUBMIT_DEFAULTS = {
    "description": "",
    "language": "python",
    "code": "",
    "data": "null",
    "ttl_seconds": "300",
    "max_attempts": "3",
}


def _submit_form(
    request: Request,
    session: Session,
    status: int,
    values: dict[str, str],
    errors: list[dict[str, str]],
) -> Response:
    return page(
        request,
        "submit.html",
        status,
        values=values,
        errors=errors,
        languages=LANGUAGES,
        csrf=session.csrf,
    )


async def submit_page(request: Request) -> Response:
    session = await require_session(request, Role.SUBMIT)
    values = {**SUBMIT_DEFAULTS, "idempotency_key": _idempotency_key(None)}
    return _submit_form(request, session, 200, values, [])


def _idempotency_key(form_value: object) -> str:
    """Each rendering of the form has its own key (a hidden field): a form posted twice
    (a double click, a reload) submits one task, as the API's Idempotency-Key does."""
    if isinstance(form_value, str) and 16 <= len(form_value) <= 255:
        return form_value
    return secrets.token_urlsafe(24)


def _number(value: str, kind: type[float] | type[int]) -> float | int | str:
    """The form's text as a number (strings the model then refuses by name otherwise)."""
    try:
        return kind(value)
    except ValueError:
        return value


async def submit_form(request: Request) -> Response:
    session = await require_session(request, Role.SUBMIT)
    form = await checked_form(request, session)
    values = {name: str(form.get(name, default)) for name, default in SUBMIT_DEFAULTS.items()}
    values["idempotency_key"] = _idempotency_key(form.get("idempotency_key"))
    errors: list[dict[str, str]] = []
    fields: dict[str, Any] = {
        "description": values["description"],
        "language": values["language"],
        "code": values["code"] or None,
        "ttl_seconds": _number(values["ttl_seconds"], float),
        "max_attempts": _number(values["max_attempts"], int),
    }
    try:
        fields["data"] = orjson.loads(values["data"]) if values["data"].strip() else None
    except orjson.JSONDecodeError as error:
        errors.append({"field": "data", "message": f"is not JSON: {error}"})
    try:
        body = TaskCreate.model_validate(fields)
    except ValidationError as error:
        errors.extend(validation_errors(error))
    if errors:
        return _submit_form(request, session, 422, values, errors)
    submission = await submit(context(request), session.principal, body, values["idempotency_key"])
    return see_other(f"/ui/tasks/{submission.task.id}")
