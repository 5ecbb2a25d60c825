"""Signing in with an API key, and out."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.http import context, in_thread
from api.ui.render import page, see_other
from api.ui.sessions import (
    check_login_form,
    checked_form,
    end_session,
    login_page_with_token,
    read_form,
    read_session,
    require_session,
    start_session,
)

MAX_KEY_CHARS = 512


async def login_page(request: Request) -> Response:
    if read_session(request) is not None:
        return see_other("/ui")
    return login_page_with_token(
        request, lambda token: page(request, "login.html", error=None, csrf_token=token)
    )


async def login(request: Request) -> Response:
    form = await read_form(request)
    check_login_form(request, form)
    key = form.get("api_key")
    ctx = context(request)
    principal = None
    if isinstance(key, str) and 0 < len(key.strip()) <= MAX_KEY_CHARS:
        key = key.strip()
        principal = ctx.authenticator.known(key) or await in_thread(
            request, lambda: ctx.authenticator.authenticate(key)
        )
    if principal is None:
        return login_page_with_token(
            request,
            lambda token: page(
                request,
                "login.html",
                401,
                error="That API key is not valid (unknown or revoked).",
                csrf_token=token,
            ),
        )
    request.state.tenant = principal.tenant
    request.state.key_id = principal.key_id
    response = see_other("/ui")
    start_session(request, response, principal)
    return response


async def logout(request: Request) -> Response:
    session = await require_session(request)
    await checked_form(request, session)
    response = see_other("/ui/login?notice=signed-out")
    end_session(request, response)
    return response
