"""What the client sends again, and what it never does (taskledger/client/calls.py), against
a scripted server (httpx.MockTransport): the calls, retries, backoffs and typed errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskledger.client import (
    ApiError,
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    PreconditionFailed,
    RetryPolicy,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UsageError,
    ValidationError,
)
from taskledger.client.calls import EventStreamParser

URL = "http://taskledger.test"
TASK_ID = "7d6ff884-471e-4133-9d3f-3c083eca3b91"
POLICY = RetryPolicy(attempts=3, backoff_seconds=0.5, max_backoff_seconds=4)

TASK: dict[str, Any] = {
    "id": TASK_ID,
    "description": "d",
    "language": "python",
    "code": "print(1)",
    "data": None,
    "status": "Pending",
    "attempt": 1,
    "run_attempt": 1,
    "max_attempts": 3,
    "ttl_seconds": 300.0,
    "deadline": None,
    "created_at": "2030-01-01T00:00:00Z",
    "updated_at": "2030-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
    "worker_id": None,
    "result": None,
    "error": None,
    "version": 2,
}


def problem(status: int, detail: str = "no", **extra: Any) -> httpx.Response:
    body = {"type": f"https://taskledger.dev/problems/p{status}", "title": "T", "status": status}
    return httpx.Response(
        status,
        json={**body, "detail": detail, **extra},
        headers={"Content-Type": "application/problem+json", **extra.pop("headers", {})},
    )


class Server:
    """Answers requests from a script, one answer (or exception) per request, and keeps
    every request it got."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[..., Any]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self) -> Client:
        return Client(URL, "the-key", retries=POLICY, transport=httpx.MockTransport(self))

    def async_client(self) -> AsyncClient:
        return AsyncClient(URL, "the-key", retries=POLICY, transport=httpx.MockTransport(self))


@pytest.fixture(autouse=True)
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoffs, recorded instead of slept."""
    seconds: list[float] = []
    monkeypatch.setattr("httpx_retries.retry.time.sleep", seconds.append)

    async def asleep(delay: float) -> None:
        seconds.append(delay)

    monkeypatch.setattr("httpx_retries.retry.asyncio.sleep", asleep)
    monkeypatch.setattr("taskledger.client.sync.time.sleep", seconds.append)
    return seconds


def ok(body: dict[str, Any] = TASK, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def dropped() -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError("Server disconnected without sending a response.")


# -- what is retried ---------------------------------------------------------------------------


def test_a_get_is_retried_on_503_then_answers(slept: list[float]) -> None:
    server = Server(problem(503), problem(503), ok())
    with server.client() as tl:
        assert str(tl.get(TASK_ID).id) == TASK_ID
    assert len(server.requests) == 3
    # Exponential backoff with full jitter: at most 0.5 s, then 1 s (the policy's 0.5 s
    # doubled), under the cap.
    assert len(slept) == 2
    assert 0 <= slept[0] <= 0.5
    assert 0 <= slept[1] <= 1.0


def test_a_429_waits_as_long_as_retry_after_says(slept: list[float]) -> None:
    server = Server(problem(429, headers={"Retry-After": "3"}), ok())
    with server.client() as tl:
        tl.get(TASK_ID)
    assert slept == [3.0]


def test_retries_are_bounded_and_end_in_the_typed_error() -> None:
    server = Server(problem(503, "the event store is not available right now"))
    with server.client() as tl, pytest.raises(Unavailable) as unavailable:
        tl.get(TASK_ID)
    assert len(server.requests) == 1 + POLICY.attempts
    assert unavailable.value.detail == "the event store is not available right now"
    assert isinstance(unavailable.value, ServerError)


def test_a_connection_error_is_retried_then_named_with_the_url() -> None:
    server = Server(httpx.ConnectError("Connection refused"))
    with server.client() as tl, pytest.raises(ConnectionFailed) as failed:
        tl.history(TASK_ID)
    assert len(server.requests) == 1 + POLICY.attempts
    assert str(failed.value) == f"GET {URL}/api/tasks/{TASK_ID}/history: Connection refused"
    assert failed.value.url == f"{URL}/api/tasks/{TASK_ID}/history"


def test_a_submit_always_carries_an_idempotency_key_and_resends_the_same_one() -> None:
    server = Server(dropped(), problem(503), ok(status=201))
    with server.client() as tl:
        tl.submit("print(1)", language="python")
    keys = [request.headers["Idempotency-Key"] for request in server.requests]
    assert len(keys) == 3
    assert len(set(keys)) == 1
    uuid.UUID(keys[0])  # generated
    bodies = {request.content for request in server.requests}
    assert len(bodies) == 1  # the same body: the server answers the first task
    with server.client() as tl:
        tl.submit("print(1)", language="python", idempotency_key="mine")
        tl.submit("print(1)", language="python")
    assert server.requests[3].headers["Idempotency-Key"] == "mine"
    assert server.requests[4].headers["Idempotency-Key"] not in ("mine", keys[0])


@pytest.mark.parametrize(
    ("call", "path"),
    [
        (lambda tl: tl.cancel(TASK_ID), f"/api/tasks/{TASK_ID}/cancel"),
        (lambda tl: tl.retry(TASK_ID), f"/api/tasks/{TASK_ID}/retry"),
        (lambda tl: tl.update(TASK_ID, {"description": "x"}), f"/api/tasks/{TASK_ID}"),
    ],
)
def test_retry_cancel_and_update_are_never_sent_twice(
    call: Callable[[Client], Any], path: str
) -> None:
    server = Server(problem(503))
    with server.client() as tl, pytest.raises(Unavailable):
        call(tl)
    assert len(server.requests) == 1
    server = Server(dropped())
    with server.client() as tl, pytest.raises(ConnectionFailed) as lost:
        call(tl)
    assert len(server.requests) == 1
    assert f"{URL}{path}: Server disconnected" in str(lost.value)
    assert "not retried: the server may or may not have applied it" in str(lost.value)


# -- what is sent ------------------------------------------------------------------------------


def test_the_key_goes_as_the_apikey_scheme() -> None:
    server = Server(ok())
    with server.client() as tl:
        tl.get(TASK_ID)
    assert server.requests[0].headers["Authorization"] == "ApiKey the-key"
    assert server.requests[0].headers["User-Agent"].startswith("taskledger-client/")


def test_submit_sends_only_what_it_was_given(tmp_path: Path) -> None:
    server = Server(ok(status=201))
    program = tmp_path / "job.cs"
    program.write_text("class P {}")
    with server.client() as tl:
        tl.submit(file=program, data=[1], ttl_seconds=5, max_attempts=1)
        tl.submit(None, language="echo")
    assert json.loads(server.requests[0].content) == {
        "language": "csharp",
        "code": "class P {}",
        "data": [1],
        "description": "job.cs",
        "ttl_seconds": 5,
        "max_attempts": 1,
    }
    assert json.loads(server.requests[1].content) == {"language": "echo"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"code": "x"}, "say which language"),
        ({"file": "notes.txt"}, "cannot guess the language of notes.txt"),
        ({"code": "x", "file": "a.py"}, "not both"),
        ({"file": "missing.py"}, "cannot read missing.py"),
    ],
)
def test_submit_refuses_what_it_cannot_send(
    kwargs: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    server = Server(ok(status=201))
    with server.client() as tl, pytest.raises(UsageError, match=message):
        tl.submit(**kwargs)
    assert server.requests == []


def test_update_sends_a_merge_patch_with_if_match() -> None:
    server = Server(ok())
    with server.client() as tl:
        tl.update(TASK_ID, {"data": {"a": None}}, if_match=7)
    request = server.requests[0]
    assert (request.method, request.headers["If-Match"]) == ("PATCH", '"7"')
    assert request.headers["Content-Type"] == "application/merge-patch+json"
    assert json.loads(request.content) == {"data": {"a": None}}


def test_wait_long_polls_until_the_task_is_terminal() -> None:
    server = Server(
        ok(TASK), ok({**TASK, "status": "InProgress"}), ok({**TASK, "status": "Failed"})
    )
    with server.client() as tl:
        assert tl.wait(TASK_ID, timeout=600).status == "Failed"
    waits = [float(request.url.params["wait"]) for request in server.requests]
    assert waits[0] == 60  # at most what one request may wait
    assert len(waits) == 3


def test_list_follows_the_cursor_with_the_filters() -> None:
    item = {k: v for k, v in TASK.items() if k not in ("code", "data", "result", "error")}
    item = {**item, "summary": None, "error_kind": None}
    item.pop("run_attempt")
    server = Server(
        ok({"items": [item, item], "next_cursor": "c1"}),
        ok({"items": [item], "next_cursor": None}),
    )
    with server.client() as tl:
        found = list(tl.list(status=["Failed", "Expired"], language="python", q="x", page_size=2))
    assert len(found) == 3
    first, second = (request.url.params for request in server.requests)
    assert first.get_list("status") == ["Failed", "Expired"]
    assert (first["language"], first["q"], first["limit"]) == ("python", "x", "2")
    assert "cursor" not in first
    assert second["cursor"] == "c1"


# -- the typed errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (412, PreconditionFailed),
        (422, ValidationError),
        (429, TooManyRequests),
        (500, ServerError),
        (503, Unavailable),
        (418, ApiError),
    ],
)
def test_each_status_is_its_own_exception(status: int, kind: type[ApiError]) -> None:
    errors = [{"field": "language", "message": "Input should be 'python'"}]
    server = Server(problem(status, "what went wrong", errors=errors, request_id="r1"))
    with (
        Client(
            URL, "k", retries=RetryPolicy(attempts=0), transport=httpx.MockTransport(server)
        ) as tl,
        pytest.raises(ApiError) as raised,
    ):
        tl.cancel(TASK_ID)
    error = raised.value
    assert type(error) is kind
    assert (error.status, error.detail, error.title) == (status, "what went wrong", "T")
    assert error.type == f"https://taskledger.dev/problems/p{status}"
    assert [(e.field, e.message) for e in error.errors] == [
        (e["field"], e["message"]) for e in errors
    ]
    assert error.problem.request_id == "r1"
    assert str(error) == f"{status} T: what went wrong"


def test_an_answer_that_is_not_a_problem_document_still_becomes_one() -> None:
    server = Server(httpx.Response(502, text="<html>Bad Gateway</html>"))
    with (
        Client(
            URL, "k", retries=RetryPolicy(attempts=0), transport=httpx.MockTransport(server)
        ) as tl,
        pytest.raises(ServerError) as raised,
    ):
        tl.get(TASK_ID)
    assert (raised.value.status, raised.value.detail) == (502, "<html>Bad Gateway</html>")
    assert raised.value.errors == []


# -- the event feed ----------------------------------------------------------------------------


def feed_item(position: int) -> dict[str, Any]:
    return {
        "position": position,
        "task_id": TASK_ID,
        "version": position,
        "type": "AttemptStarted",
        "at": "2030-01-01T00:00:00Z",
        "data": {"attempt": 1},
        "hash": None,
    }


def sse(*positions: int) -> httpx.Response:
    lines = ["retry: 1000", ""]
    for position in positions:
        lines += [": keep-alive", "", f"id: {position}", "event: AttemptStarted"]
        lines += [f"data: {json.dumps(feed_item(position))}", ""]
    return httpx.Response(
        200, text="\n".join(lines) + "\n", headers={"Content-Type": "text/event-stream"}
    )


def test_events_page_then_follow_and_resume_after_a_broken_stream() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        after = int(request.url.params["after"])
        if "text/event-stream" not in request.headers.get("Accept", ""):
            items = [feed_item(after + 1)] if after < 3 else []  # positions 1 to 3, by ones
            return ok({"items": items, "next_after": items[-1]["position"] if items else after})
        # Each stream gives two events past `after`, then ends (as a restarted server's).
        return sse(after + 1, after + 2)

    server = Server(answer)
    with server.client() as tl:
        stream = tl.events(after=0, follow=True, page_size=1)
        positions = [next(stream).position for _ in range(7)]
        stream.close()
    assert positions == [1, 2, 3, 4, 5, 6, 7]
    pages = [r for r in server.requests if "text/event-stream" not in r.headers.get("Accept", "")]
    streams = [r for r in server.requests if r not in pages]
    # Pages while they are full, then streams, each resuming after the last event received.
    assert [int(r.url.params["after"]) for r in pages] == [0, 1, 2, 3]
    assert [int(r.url.params["after"]) for r in streams][:2] == [3, 5]


def test_event_stream_parser() -> None:
    parser = EventStreamParser()
    body = json.dumps(feed_item(9))
    lines = ["retry: 1000", "", ": keep-alive", "", "id: 9", "event: x", f"data: {body}", ""]
    events = [event for line in lines if (event := parser.feed(line)) is not None]
    assert [event.position for event in events] == [9]
    # A data field split over lines is joined with newlines (JSON does not mind).
    half = len(body) // 2
    split = [f"data: {body[:half]}", f"data:{body[half:]}", ""]
    assert [e.position for line in split if (e := parser.feed(line)) is not None] == [9]


# -- async: the same rules ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_submit_is_retried_with_its_key_and_cancel_is_not() -> None:
    server = Server(dropped(), ok(status=201))
    async with server.async_client() as tl:
        await tl.submit(None, language="echo")
    assert len({request.headers["Idempotency-Key"] for request in server.requests}) == 1
    assert len(server.requests) == 2
    server = Server(dropped())
    async with server.async_client() as tl:
        with pytest.raises(ConnectionFailed):
            await tl.cancel(TASK_ID)
    assert len(server.requests) == 1
    server = Server(problem(412))
    async with server.async_client() as tl:
        with pytest.raises(PreconditionFailed):
            await tl.update(TASK_ID, {"description": "x"}, if_match=1)
