"""The audit (filters as GET /api/audit has, pages, exports) and the keys (admin)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from api.errors import ApiProblem
from api.exports import export_format
from api.http import context, in_thread, reject_unknown_params
from api.keys import all_keys, settle_keys
from api.keys import issue_key as issue_api_key
from api.keys import revoke_key as revoke_api_key
from api.schemas import KeyCreate
from api.system import EVENT_TYPES, audit_export, audit_filters, audit_page
from api.ui.params import as_query, filled
from api.ui.render import page, see_other
from api.ui.sessions import checked_form, require_session
from ledger.keys import Role

AUDIT_FILTERS = ("type", "task_id", "worker_id", "since", "until")
AUDIT_PAGE = 100


async def audit(request: Request) -> Response:
    session = await require_session(request)
    ctx = context(request)
    pairs = [(k, v) for k, v in filled(request) if k in AUDIT_FILTERS]
    values: dict[str, Any] = {
        "filters": dict(request.query_params),
        "event_types": EVENT_TYPES,
        "pairs": pairs,
        "error": None,
        "items": [],
        "next_cursor": None,
    }
    try:
        query = as_query(request, request.query_params.multi_items())
        reject_unknown_params(query, {*AUDIT_FILTERS, "cursor"})
        filters = audit_filters(query)
    except ApiProblem as problem:
        values["error"] = problem.detail
        return page(request, "audit.html", problem.status, **values)
    cursor = query.query_params.get("cursor")
    found = await in_thread(
        request, lambda: audit_page(ctx, session.principal, filters, AUDIT_PAGE, cursor)
    )
    values.update(items=found.items, next_cursor=found.next_cursor)
    return page(request, "audit.html", **values)


async def audit_file(request: Request) -> Response:
    """The audit's matching events as a file: the API's export, for the session."""
    session = await require_session(request)
    query = as_query(request, request.query_params.multi_items())
    reject_unknown_params(query, {*AUDIT_FILTERS, "format"})
    kind = export_format(query)
    if kind is None:
        raise ApiProblem(422, "invalid-request", "format: must be csv or ndjson")
    return audit_export(request, session.principal, audit_filters(query), kind)


async def _keys_page(request: Request, status: int = 200, **values: Any) -> Response:
    session = await require_session(request, Role.ADMIN)
    ctx = context(request)
    keys = await in_thread(request, lambda: all_keys(ctx, session.principal))
    values.setdefault("new_key", None)
    values.setdefault("error", None)
    return page(
        request,
        "keys.html",
        status,
        keys=keys,
        roles=[str(role) for role in Role],
        csrf=session.csrf,
        **values,
    )


async def keys(request: Request) -> Response:
    return await _keys_page(request)


async def issue_key(request: Request) -> Response:
    session = await require_session(request, Role.ADMIN)
    form = await checked_form(request, session)
    try:
        wanted = KeyCreate.model_validate(
            {name: str(form.get(name, "")).strip() for name in ("tenant", "role", "label")}
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(map(str, first["loc"])) or "body"
        raise ApiProblem(
            422, "invalid-request", f"{field}: {first['msg']}", errors=[{"field": field}]
        ) from None
    ctx = context(request)

    def issue() -> dict[str, Any]:
        issued = issue_api_key(ctx, session.principal, wanted)
        settle_keys(ctx)
        return issued

    issued = await in_thread(request, issue)
    # Shown this once, on this response only (the pages are never cached: no-store).
    return await _keys_page(request, 200, new_key=issued["key"], new_key_id=issued["key_id"])


async def revoke_key(request: Request) -> Response:
    session = await require_session(request, Role.ADMIN)
    await checked_form(request, session)
    key_id = request.path_params["key_id"]
    ctx = context(request)

    def revoke() -> None:
        revoke_api_key(ctx, session.principal, key_id)
        settle_keys(ctx)

    await in_thread(request, revoke)
    return see_other("/ui/keys?notice=revoked")
