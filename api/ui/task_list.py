"""The task list: filters, keyset pages, rows refreshed live, and bulk retry or cancel of
everything the filters match (after a confirmation)."""

from __future__ import annotations

from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response

from api.bulk import MAX_TASKS, BulkResult, bulk_action, matching_ids
from api.errors import ApiProblem
from api.http import context, in_thread, reject_unknown_params
from api.tasks import LANGUAGES, LISTED_COLUMNS, STATUSES, task_filters
from api.ui.params import as_query, filled
from api.ui.render import fragment, page
from api.ui.sessions import Session, checked_form, require_session
from ledger.keys import Role
from projections.queries import Page, TaskFilter, list_tasks

FILTERS = ("status", "language", "created_after", "created_before", "q")


def _page(request: Request, session: Session, filters: TaskFilter, cursor: str | None) -> Any:
    ctx = context(request)

    def query() -> Page:
        with ctx.queries.connection() as conn:
            return list_tasks(
                conn,
                ctx.schema,
                tenant=session.principal.scope,
                filters=filters,
                limit=ctx.limits.page_size,
                cursor=cursor,
                columns=LISTED_COLUMNS,
            )

    return in_thread(request, query)


def _read_filters(request: Request) -> tuple[Request, TaskFilter]:
    query = as_query(request, request.query_params.multi_items())
    reject_unknown_params(query, {*FILTERS, "cursor"})
    return query, task_filters(query)


async def tasks_page(request: Request) -> Response:
    session = await require_session(request)
    values: dict[str, Any] = {
        "filters": dict(request.query_params),
        "statuses": STATUSES,
        "languages": LANGUAGES,
        "pairs": [(k, v) for k, v in filled(request) if k in FILTERS],
        "error": None,
        "items": [],
        "next_cursor": None,
    }
    try:
        query, filters = _read_filters(request)
    except ApiProblem as problem:
        # The API's own words for a bad filter, on the page, with its status.
        values["error"] = problem.detail
        return page(request, "tasks.html", problem.status, **values)
    listed = await _page(request, session, filters, query.query_params.get("cursor"))
    values.update(items=listed.items, next_cursor=listed.next_cursor)
    return page(request, "tasks.html", **values)


async def task_rows(request: Request) -> Response:
    """The rows of the list as the filters and cursor give them now (the page's script
    replaces its rows with these every few seconds)."""
    session = await require_session(request)
    query, filters = _read_filters(request)
    listed = await _page(request, session, filters, query.query_params.get("cursor"))
    return fragment("_rows.html", items=listed.items)


def _count(request: Request, session: Session, filters: TaskFilter) -> Any:
    """How many tasks match, as the action will find them (422 past its bound)."""
    ctx = context(request)
    return in_thread(request, lambda: len(matching_ids(ctx, session.principal, filters, MAX_TASKS)))


async def bulk(request: Request) -> Response:
    """First post: how many tasks match, and a Confirm button. Confirmed: the action,
    and its outcome (done, refused and why)."""
    session = await require_session(request, Role.SUBMIT)
    form = await checked_form(request, session)
    action = form.get("action")
    if action not in ("retry", "cancel"):
        raise ApiProblem(422, "invalid-request", "action: must be retry or cancel")
    chosen: Literal["retry", "cancel"] = "retry" if action == "retry" else "cancel"
    pairs = [(k, v) for k, v in form.multi_items() if k in FILTERS and isinstance(v, str)]
    query = as_query(request, pairs)
    filters = task_filters(query)
    kept = [(k, v) for k, v in pairs if v.strip()]
    if form.get("confirmed") != "yes":
        matched = await _count(request, session, filters)
        return page(
            request,
            "bulk_confirm.html",
            action=chosen,
            matched=matched,
            pairs=kept,
            csrf=session.csrf,
        )
    ctx = context(request)
    reason = f"bulk {chosen} from the UI"
    # The count confirmed: if more tasks match by now, the action refuses (nothing done)
    # and says so, rather than act on tasks nobody saw counted.
    confirmed = form.get("limit")
    limit = int(confirmed) if isinstance(confirmed, str) and confirmed.isdigit() else 0
    if not 1 <= limit <= MAX_TASKS:
        raise ApiProblem(422, "invalid-request", f"limit: must be 1 to {MAX_TASKS}")
    result: BulkResult = await in_thread(
        request,
        lambda: bulk_action(ctx, session.principal, chosen, filters, reason=reason, limit=limit),
    )
    return page(request, "bulk_result.html", result=result, pairs=kept)
