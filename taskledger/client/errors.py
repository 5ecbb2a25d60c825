"""What the client raises: one base, `ClientError`; an `ApiError` for each problem status,
carrying the server's problem document (RFC 9457, api/errors.py)."""

from __future__ import annotations

import httpx
from pydantic import ValidationError as PydanticValidationError

from api.schemas import FieldProblem, Problem


class ClientError(Exception):
    """Anything the client raises on purpose."""


class ConfigurationError(ClientError):
    """No URL or key where the client looked, or a client.toml it cannot read."""


class UsageError(ClientError, ValueError):
    """A call that cannot be made as given (no code, a language it cannot guess, …)."""


class ConnectionFailed(ClientError):
    """The server could not be reached, or the connection broke, after the retries the call
    allows. `url` is what was asked."""

    def __init__(self, method: str, url: str, cause: Exception, *, retried: bool) -> None:
        reason = str(cause) or type(cause).__name__
        note = "" if retried else " (not retried: the server may or may not have applied it)"
        super().__init__(f"{method} {url}: {reason}{note}")
        self.method = method
        self.url = url
        self.cause = cause


class ApiError(ClientError):
    """The server answered with an error; `problem` is its problem document."""

    def __init__(self, problem: Problem, *, method: str, url: str, headers: httpx.Headers) -> None:
        super().__init__(problem.detail)
        self.problem = problem
        self.method = method
        self.url = url
        self.headers = headers

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def type(self) -> str:
        return self.problem.type

    @property
    def title(self) -> str:
        return self.problem.title

    @property
    def detail(self) -> str:
        return self.problem.detail

    @property
    def errors(self) -> list[FieldProblem]:
        return list(self.problem.errors or [])

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"


class BadRequest(ApiError):
    """400: a malformed cursor, If-Match or Last-Event-ID."""


class Unauthorized(ApiError):
    """401: no key, or one the server does not know (revoked?)."""


class Forbidden(ApiError):
    """403: the key's role may not do this."""


class NotFound(ApiError):
    """404: no such task (or one of another tenant)."""


class Conflict(ApiError):
    """409: the task's state refuses it (`type` names the rule), or an Idempotency-Key
    reused with another body."""


class PreconditionFailed(ApiError):
    """412: `if_match` named a version the task has moved past."""


class ValidationError(ApiError):
    """422: a field the server refused; `errors` names each."""


class TooManyRequests(ApiError):
    """429: too many event streams open for this key (after the retries)."""


class ServerError(ApiError):
    """5xx: the server failed (`request_id` finds it in its log)."""


class Unavailable(ServerError):
    """503: the event store is out of reach right now (after the retries)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    422: ValidationError,
    429: TooManyRequests,
    503: Unavailable,
}


def error_for(response: httpx.Response) -> ApiError:
    """The typed error of an error response (read). A body that is not a problem document
    (a proxy's HTML page) becomes one from the status line and the start of the body."""
    try:
        problem = Problem.model_validate_json(response.content)
    except PydanticValidationError:
        text = response.text.strip()
        problem = Problem(
            type="about:blank",
            title=response.reason_phrase or "Error",
            status=response.status_code,
            detail=text[:300] or f"HTTP {response.status_code}",
        )
    status = response.status_code
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    request = response.request
    return kind(problem, method=request.method, url=str(request.url), headers=response.headers)
