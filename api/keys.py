"""The /api/keys routes: API keys listed, issued and revoked by admin keys (as
`taskledger keys` does from the shell). A key's secret is in the answer to its issue,
once; the ledger keeps only its digest."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api.auth import Principal
from api.context import ApiContext
from api.errors import ApiProblem
from api.http import (
    authenticate,
    context,
    in_thread,
    model_response,
    read_json,
    reject_unknown_params,
)
from api.schemas import IssuedKey, KeyCreate, KeyList, KeyOut
from ledger.keys import Role
from ledger.log import head_position
from projections.api_keys import ApiKeysProjection
from projections.queries import list_keys, wait_for_position


def all_keys(ctx: ApiContext, principal: Principal) -> list[dict[str, Any]]:
    """The keys the caller may see (blocking): configured ones, then issued ones."""
    scope = principal.scope
    listed: list[dict[str, Any]] = [
        {
            "key_id": configured.key_id,
            "tenant": configured.tenant,
            "role": str(configured.role),
            "label": "",
            "source": "configured",
            "issued_by": None,
            "issued_at": None,
            "revoked_at": None,
            "revoked_by": None,
        }
        for configured in ctx.authenticator.configured
        if scope is None or configured.tenant == scope
    ]
    with ctx.queries.connection() as conn:
        issued = list_keys(conn, ctx.schema, tenant=scope)
    return listed + [{**row, "source": "issued"} for row in issued]


def issue_key(ctx: ApiContext, principal: Principal, body: KeyCreate) -> dict[str, Any]:
    """Issue a key (blocking); its answer holds the key itself, the one time it is shown."""
    issued, token = ctx.ledger.keys.issue(
        tenant=body.tenant, role=body.role, issued_by=principal.key_id, label=body.label
    )
    return {
        "key_id": issued.key_id,
        "tenant": issued.tenant,
        "role": issued.role,
        "label": body.label,
        "source": "issued",
        "issued_by": principal.key_id,
        "issued_at": ctx.ledger.clock.now(),
        "revoked_at": None,
        "revoked_by": None,
        "key": token,
    }


SETTLE_SECONDS = 2.0


def settle_keys(ctx: ApiContext) -> None:
    """Wait (at most SETTLE_SECONDS) until the keys view holds every event written so far,
    so that a page listing the keys right after an issue or a revoke shows it."""
    with ctx.queries.connection() as conn:
        head = head_position(conn, ctx.schema)
    wait_for_position(
        ctx.database_url, ctx.schema, ApiKeysProjection.name, head, timeout=SETTLE_SECONDS
    )


def revoke_key(ctx: ApiContext, principal: Principal, key_id: str) -> dict[str, Any]:
    """Revoke an issued key (blocking; revoking it again changes nothing) and describe it.
    A configured key is a 409: it is removed from TASKLEDGER_API_KEYS, not here."""
    if any(c.key_id == key_id for c in ctx.authenticator.configured):
        raise ApiProblem(
            409,
            "key-is-configured",
            f"key {key_id} is configured in TASKLEDGER_API_KEYS; remove it there and "
            "restart the api processes",
        )
    key = ctx.ledger.keys.revoke(key_id, by=principal.key_id)  # KeyNotFound: a 404
    return {
        "key_id": key.key_id,
        "tenant": key.tenant,
        "role": str(key.role),
        "label": key.label,
        "source": "issued",
        "issued_by": key.issued_by,
        "issued_at": key.created_on,
        "revoked_at": key.revoked_at,
        "revoked_by": key.revoked_by,
    }


async def list_keys_route(request: Request) -> Response:
    principal = await authenticate(request, Role.ADMIN)
    reject_unknown_params(request, set())
    ctx = context(request)
    return model_response(
        KeyList, {"items": await in_thread(request, lambda: all_keys(ctx, principal))}
    )


async def issue_key_route(request: Request) -> Response:
    principal = await authenticate(request, Role.ADMIN)
    reject_unknown_params(request, set())
    body = await read_json(request, KeyCreate)
    ctx = context(request)
    issued = await in_thread(request, lambda: issue_key(ctx, principal, body))
    return model_response(IssuedKey, issued, 201, {"Cache-Control": "no-store"})


async def revoke_key_route(request: Request) -> Response:
    principal = await authenticate(request, Role.ADMIN)
    reject_unknown_params(request, set())
    key_id = request.path_params["key_id"]
    ctx = context(request)
    revoked = await in_thread(request, lambda: revoke_key(ctx, principal, key_id))
    return model_response(KeyOut, revoked)
