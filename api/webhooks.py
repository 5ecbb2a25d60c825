"""The /api/webhooks routes: a tenant's signing secret (read, rotated) and its default
callback, for admin keys (their own tenant, or `?tenant=`). docs/webhooks.md."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api.http import (
    authenticate,
    context,
    in_thread,
    model_response,
    param_problem,
    read_json,
    reject_unknown_params,
)
from api.schemas import WebhookDefaultIn, WebhookDefaultOut, WebhookSecretOut
from ledger.keys import Role
from ledger.webhooks import SecretInfo, WebhookDefault

_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
NO_STORE = {"Cache-Control": "no-store"}


async def _tenant(request: Request) -> tuple[str, str]:
    """(tenant, the admin's key id): the admin's own tenant, or `?tenant=`."""
    principal = await authenticate(request, Role.ADMIN)
    reject_unknown_params(request, {"tenant"})
    tenant = request.query_params.get("tenant", principal.tenant)
    if not _TENANT.match(tenant):
        raise param_problem("tenant", "must be 1 to 100 letters, digits, '-' or '_'")
    return tenant, principal.key_id


def _secret_body(tenant: str, info: SecretInfo) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "secret_id": info.current.secret_id,
        "secret": info.current.secret,
        "created_at": info.current.created_at,
        "previous_secret_id": None if info.previous is None else info.previous.secret_id,
        "previous_signs_until": info.previous_until,
    }


def _default_body(tenant: str, found: WebhookDefault) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "callback_url": found.callback_url,
        "callback_events": found.callback_events,
        "updated_at": found.updated_at,
    }


async def get_secret(request: Request) -> Response:
    tenant, _ = await _tenant(request)
    ledger = context(request).ledger
    info = await in_thread(request, lambda: ledger.webhooks.secret(tenant))
    return model_response(WebhookSecretOut, _secret_body(tenant, info), headers=NO_STORE)


async def rotate_secret(request: Request) -> Response:
    tenant, by = await _tenant(request)
    ledger = context(request).ledger
    info = await in_thread(request, lambda: ledger.webhooks.rotate(tenant, by))
    return model_response(WebhookSecretOut, _secret_body(tenant, info), headers=NO_STORE)


async def get_default(request: Request) -> Response:
    tenant, _ = await _tenant(request)
    ledger = context(request).ledger
    found = await in_thread(request, lambda: ledger.webhooks.default(tenant))
    return model_response(WebhookDefaultOut, _default_body(tenant, found))


async def put_default(request: Request) -> Response:
    tenant, by = await _tenant(request)
    body = await read_json(request, WebhookDefaultIn)
    ledger = context(request).ledger
    events: list[str] | None = None if body.callback_events is None else [*body.callback_events]
    found = await in_thread(
        request, lambda: ledger.webhooks.set_default(tenant, body.callback_url, events, by)
    )
    return model_response(WebhookDefaultOut, _default_body(tenant, found))
