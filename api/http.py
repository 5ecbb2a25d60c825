"""Small HTTP helpers shared by the routes: JSON out, bodies in, parameters, auth."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import anyio.to_thread
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from api.auth import CHALLENGE, Principal
from api.context import ApiContext
from api.errors import ApiProblem
from api.schemas import dump_json
from ledger.keys import Role

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

JSON_TYPES = ("application/json", "application/merge-patch+json")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON document as it is (the OpenAPI document); bodies go through `model_response`."""
    return Response(
        orjson.dumps(body, option=orjson.OPT_UTC_Z),
        status,
        headers=headers,
        media_type="application/json",
    )


class ResponseMismatch(Exception):
    """A response body that its model refuses: the code and the OpenAPI document differ."""


def model_response(
    model: type[BaseModel],
    content: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    from_attributes: bool = False,
    exclude_unset: bool = False,
) -> Response:
    """`content` as the response model `model`, the schema the OpenAPI document gives for it:
    its fields and nothing else. `exclude_unset` leaves out the optional fields `content`
    does not give (absent, not null).

    Content that does not fit the model is our bug, so a 500 (with the mismatch in the
    log), not a 422 telling the client to fix its request.
    """
    try:
        body = model.model_validate(content, from_attributes=from_attributes)
    except ValidationError as error:
        raise ResponseMismatch(f"the {model.__name__} body does not fit its model") from error
    return Response(
        dump_json(body, exclude_unset=exclude_unset),
        status,
        headers=headers,
        media_type="application/json",
    )


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


async def in_thread(request: Request, function: Callable[[], T]) -> T:
    """Run blocking ledger or query work off the event loop, within the pool's size."""
    return await anyio.to_thread.run_sync(function, limiter=context(request).limiter)


async def authenticate(request: Request, role: Role) -> Principal:
    ctx = context(request)
    key = ctx.authenticator.presented_key(request)
    if key is None:
        raise ApiProblem(
            401,
            "unauthorized",
            "send an API key: `Authorization: ApiKey <key>`, `Authorization: Bearer <key>` "
            "or `X-API-Key: <key>`",
            headers=CHALLENGE,
        )
    principal = ctx.authenticator.known(key) or await in_thread(
        request, lambda: ctx.authenticator.authenticate(key)
    )
    if principal is None:
        raise ApiProblem(
            401, "unauthorized", "the API key is not valid (unknown or revoked)", headers=CHALLENGE
        )
    request.state.tenant = principal.tenant
    request.state.key_id = principal.key_id
    principal.require(role)
    return principal


async def read_json(request: Request, model: type[M], *, optional: bool = False) -> M:
    """The request body as `model`: 413 when too large, 415 when not JSON, 422 when wrong."""
    limit = context(request).limits.request_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiProblem(413, "body-too-large", f"the body is {declared} bytes; at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiProblem(413, "body-too-large", f"the body is over {limit} bytes")
    if not body and optional:
        return model()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in JSON_TYPES:
        raise ApiProblem(
            415,
            "unsupported-media-type",
            f"send the body as application/json (got {media_type or 'no content type'})",
        )
    return model.model_validate_json(bytes(body))


def task_id_param(request: Request) -> UUID:
    raw = request.path_params["task_id"]
    try:
        task_id = UUID(raw)
    except ValueError:
        # A path that names no task is an unknown resource (404, as for any other id no
        # task has), not a field of the request to correct (422).
        raise ApiProblem(
            404, "task-not-found", f"task {raw!r} does not exist (task ids are UUIDs)"
        ) from None
    request.state.task_id = str(task_id)
    return task_id


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise param_problem(name, f"must be an integer from {low} to {high}")
    return value


def float_param(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise param_problem(name, f"must be a number from {low:g} to {high:g}")
    return value


def time_param(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise param_problem(
            name, "must be an RFC 3339 time with an offset, e.g. 2030-01-01T00:00:00Z"
        )
    return value


def choice_params(request: Request, name: str, allowed: tuple[str, ...]) -> list[str]:
    values = request.query_params.getlist(name)
    for value in values:
        if value not in allowed:
            raise param_problem(name, f"{value!r} is not one of {', '.join(allowed)}")
    return values


def param_problem(name: str, message: str) -> ApiProblem:
    """A 422 naming the query parameter `name` and what is wrong with it."""
    return ApiProblem(
        422, "invalid-request", f"{name}: {message}", errors=[{"field": name, "message": message}]
    )


def reject_unknown_params(request: Request, known: set[str]) -> None:
    """Refuse parameters the endpoint does not know, and values no query could hold."""
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise param_problem(unknown[0], "is not a parameter of this endpoint")
    for name, value in request.query_params.multi_items():
        if "\x00" in value:
            raise param_problem(name, "contains a NUL character (U+0000)")
