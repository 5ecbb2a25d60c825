"""The UI's sessions and its CSRF protection.

A session is a signed cookie (itsdangerous, with `ApiContext.ui_secret`) holding who
signed in (tenant, role, key id), a CSRF token and when: never the API key. Signed, not
encrypted: its content is no secret, and a change to it breaks the signature. It lasts
8 hours, and every request checks again that its key is still valid
(`Authenticator.session_valid`): a revoked key ends its sessions.

CSRF: a synchronizer token. The session's token is in a hidden `csrf_token` field of every
form, and a POST without it (or with another) changes nothing. The cookie is also
SameSite=Strict, which browsers honour, but the token does not depend on that.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from api.auth import Principal
from api.context import ApiContext
from api.http import context, in_thread
from ledger.keys import Role

COOKIE = "taskledger_ui"
COOKIE_PATH = "/ui"
SESSION_SECONDS = 8 * 3600
# Signing in needs a token too ("login CSRF": a forged sign-in would put the victim in the
# attacker's session, and what they then submit in the attacker's tenant). Before there is
# a session, the token lives in a cookie of its own, signed and short-lived, only sent to
# the sign-in page. Why a token rather than checking Origin / Sec-Fetch-Site: those
# headers are absent from some clients and stripped by some proxies and privacy tools, so
# a check on them has to let a missing header through, and that is the hole. A token is
# there or not. (Origin is checked as well when it is sent: a second, independent lock.)
LOGIN_COOKIE = "taskledger_ui_login"
LOGIN_COOKIE_PATH = "/ui/login"
LOGIN_TOKEN_SECONDS = 3600
FORM_BYTES = 1024 * 1024  # a form body (the submit form carries code and data)


class SignInRequired(Exception):
    """No valid session: the page sends the browser to sign in."""


class CsrfRefused(Exception):
    """A form post without the CSRF token of its session (or of the sign-in page)."""


class FormTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Session:
    tenant: str
    role: Role
    key_id: str
    csrf: str
    signed_in_at: int  # Unix time

    @property
    def principal(self) -> Principal:
        return Principal(self.tenant, self.role, self.key_id)

    @property
    def can_act(self) -> bool:
        return self.role in (Role.SUBMIT, Role.ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def _signer(ctx: ApiContext, purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(ctx.ui_secret, salt=f"taskledger-ui-{purpose}")


def start_session(request: Request, response: Response, principal: Principal) -> None:
    """Sign `principal` in: the session cookie on `response`, the sign-in token gone."""
    fields = {
        "tenant": principal.tenant,
        "role": str(principal.role),
        "key_id": principal.key_id,
        "csrf": secrets.token_urlsafe(32),
        "signed_in_at": int(time.time()),
    }
    _set_cookie(
        request,
        response,
        COOKIE,
        _signer(context(request), "session").dumps(fields),
        SESSION_SECONDS,
        COOKIE_PATH,
    )
    response.delete_cookie(LOGIN_COOKIE, path=LOGIN_COOKIE_PATH)


def _set_cookie(
    request: Request, response: Response, name: str, value: str, max_age: int, path: str
) -> None:
    """Every cookie of the UI: HttpOnly, SameSite=Strict, Secure when served over HTTPS."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def end_session(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE,
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def read_session(request: Request) -> Session | None:
    """The request's session if its cookie is ours, unaltered and under 8 hours old."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        fields: Any = _signer(context(request), "session").loads(raw, max_age=SESSION_SECONDS)
    except BadSignature:  # also SignatureExpired, its subclass
        return None
    try:
        return Session(
            tenant=str(fields["tenant"]),
            role=Role(fields["role"]),
            key_id=str(fields["key_id"]),
            csrf=str(fields["csrf"]),
            signed_in_at=int(fields["signed_in_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


async def require_session(request: Request, role: Role = Role.READ) -> Session:
    """The signed-in session (SignInRequired without one, or when its key is no longer
    valid); 403 when its role is below `role`."""
    session = read_session(request)
    if session is None:
        raise SignInRequired
    ctx = context(request)
    if not await in_thread(request, lambda: ctx.authenticator.session_valid(session.key_id)):
        raise SignInRequired
    request.state.session = session
    request.state.tenant = session.tenant  # for the request log, as the API's routes do
    request.state.key_id = session.key_id
    session.principal.require(role)
    return session


async def read_form(request: Request) -> FormData:
    declared = request.headers.get("content-length", "")
    # Browsers always declare a form's length; the server reads no more than that.
    if not declared.isdigit() or int(declared) > FORM_BYTES:
        raise FormTooLarge
    return await request.form(max_files=0, max_fields=200)


def _same(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


async def checked_form(request: Request, session: Session) -> FormData:
    """The posted form, once its `csrf_token` is the session's (CsrfRefused otherwise)."""
    form = await read_form(request)
    if not _same(form.get("csrf_token"), session.csrf):
        raise CsrfRefused("the form's CSRF token is missing or not this session's")
    return form


def login_page_with_token(request: Request, render: Callable[[str], Response]) -> Response:
    """The sign-in page `render(token)` makes, and the token's signed cookie on it."""
    token = secrets.token_urlsafe(32)
    response = render(token)
    _set_cookie(
        request,
        response,
        LOGIN_COOKIE,
        _signer(context(request), "login").dumps(token),
        LOGIN_TOKEN_SECONDS,
        LOGIN_COOKIE_PATH,
    )
    return response


def check_login_form(request: Request, form: FormData) -> None:
    """CsrfRefused unless the sign-in form carries the token of this browser's cookie
    (ours, under an hour old) and, when the browser says where it posts from, it is us."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise CsrfRefused(f"the sign-in form was posted from another origin ({origin})")
    raw = request.cookies.get(LOGIN_COOKIE, "")
    try:
        expected = _signer(context(request), "login").loads(raw, max_age=LOGIN_TOKEN_SECONDS)
    except BadSignature:
        raise CsrfRefused("the sign-in page's CSRF token is missing or expired") from None
    if not isinstance(expected, str) or not _same(form.get("csrf_token"), expected):
        raise CsrfRefused("the sign-in form's CSRF token does not match")
