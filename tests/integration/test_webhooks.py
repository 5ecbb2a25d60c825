"""Signed completion webhooks end to end: real PostgreSQL, the webhook_deliveries view
followed by its runner, the deliverer, and a real HTTP receiver on 127.0.0.1 (allowed
through `webhook_allow`) that verifies every signature with `standardwebhooks`."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpcore
import orjson
import psycopg
import pytest
import pytest_asyncio
import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.delivery import Deliverer, sign
from api.http import model_response
from api.outbound import PinnedBackend, TargetRefused
from api.schemas import TaskOut
from api.tasks import task_content
from ledger import AttemptResult, Ledger, ManualClock, SystemClock
from ledger.secrets import GRACE
from ledger.state import HistoryEntry
from ledger.targets import TargetPolicy
from ledger.webhooks import delivery_id
from projections import WebhookDeliveriesProjection, all_projections
from projections.base import ensure_installed
from projections.runner import ProjectionRunner
from projections.webhook_deliveries import deliveries_of, due
from tests.integration.conftest import Api

pytestmark = [pytest.mark.postgres, pytest.mark.asyncio]

ALLOW_LOCAL = TargetPolicy.parse("127.0.0.1")
FAST = {"poll_interval": 0.2, "standby_interval": 0.1, "connect_timeout": 1, "total_timeout": 3}


# -- a receiver ---------------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every request and answers each with the
    next of `answers` (status, extra headers), then 200."""

    sock: socket.socket
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(headers, body))
        status, extra = self.answers.pop(0) if self.answers else (200, {})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in extra.items()],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    async def start(self) -> None:
        """Listen (on the socket bound from the start: until now, connections are refused)."""
        config = uvicorn.Config(
            self.app,
            log_config=None,
            lifespan="off",
            access_log=False,
            ws="none",
            http="h11",
            interface="asgi3",
        )
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await self.task


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver bound to a port of 127.0.0.1, not yet listening (`start` it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    found = Receiver(sock)
    yield found
    await found.stop()
    sock.close()


# -- the ledger, the view, the deliverer ----------------------------------------------------------


def make_ledger(store_env: dict[str, str], allow: str = "127.0.0.1") -> Ledger:
    return Ledger(store_env, clock=SystemClock(), webhook_targets=TargetPolicy.parse(allow))


@pytest.fixture
def live(store_env: dict[str, str], database_url: str, schema: str) -> Iterator[Ledger]:
    """A ledger on the real clock that accepts callbacks to 127.0.0.1, with the views
    installed and the webhook_deliveries view followed by its runner."""
    ledger = make_ledger(store_env)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for projection in all_projections().values():
            ensure_installed(conn, schema, projection)
    runner = ProjectionRunner(
        database_url,
        schema,
        WebhookDeliveriesProjection(),
        poll_interval=0.2,
        standby_interval=0.1,
    )
    runner.start()
    yield ledger
    runner.stop()
    ledger.close()


@contextlib.asynccontextmanager
async def delivering(deliverer: Deliverer) -> AsyncIterator[Deliverer]:
    stop = asyncio.Event()
    role = asyncio.create_task(deliverer.run(stop))
    try:
        await asyncio.wait_for(deliverer.is_leader.wait(), 10)
        yield deliverer
    finally:
        stop.set()
        await asyncio.wait_for(role, 20)


def deliverer_for(ledger: Ledger, database_url: str, schema: str, **options: Any) -> Deliverer:
    settings: dict[str, Any] = {**FAST, "targets": ALLOW_LOCAL, "backoff": (0.2, 0.4, 0.8)}
    settings.update(options)
    return Deliverer(database_url, schema, ledger, ledger.clock, **settings)


async def until(what: str, check: Callable[[], Any], seconds: float = 20.0) -> Any:
    """Wait (with a deadline) until `check()` (run in a thread) returns something true."""
    deadline = time.monotonic() + seconds
    while True:
        found = await asyncio.to_thread(check)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s for {what}")
        await asyncio.sleep(0.05)


def attempts_of(ledger: Ledger, task_id: uuid.UUID) -> list[HistoryEntry]:
    return [h for h in ledger.history(task_id) if h.type == "WebhookAttempted"]


def completed_task(ledger: Ledger, url: str, **fields: Any) -> tuple[uuid.UUID, int]:
    """A task with a callback to `url`, completed; (its id, the completion's version)."""
    task = ledger.submit(
        description="hooked",
        language="echo",
        code="",
        data={"n": 1},
        tenant="acme",
        submitted_by="key-1",
        callback_url=url,
        **fields,
    ).task
    ledger.start_attempt(task.id, 1, "worker-1")
    done = ledger.complete_attempt(task.id, 1, AttemptResult(stdout="6\n"))
    return task.id, done.version


def delivered(ledger: Ledger, task_id: uuid.UUID) -> list[HistoryEntry] | None:
    found = attempts_of(ledger, task_id)
    return found if found and found[-1].data["outcome"] == "delivered" else None


# -- delivery ------------------------------------------------------------------------------------


async def test_a_receiver_answering_500_then_200_gets_it_once_signed_and_both_are_recorded(
    live: Ledger, receiver: Receiver, database_url: str, schema: str
) -> None:
    receiver.answers = [(500, {})]
    await receiver.start()
    task_id, version = await asyncio.to_thread(completed_task, live, receiver.url)
    deliverer = deliverer_for(live, database_url, schema)
    async with delivering(deliverer):
        attempts = await until("the delivery", lambda: delivered(live, task_id))
        # The view applies the last attempt; nothing more is sent after a 2xx.
        await until(
            "the view to say delivered",
            lambda: _state(database_url, schema, task_id) == ["delivered"],
        )
        await asyncio.sleep(0.5)  # a chance for a wrong second send to show (none must)
    assert [(a.data["outcome"], a.data["status_code"]) for a in attempts] == [
        ("failed", 500),
        ("delivered", 200),
    ]
    assert attempts[0].data["error"] == "HTTP 500"
    assert attempts[0].data["next_attempt_at"] is not None
    assert [a.data["delivery_attempt"] for a in attempts] == [1, 2]
    assert len(receiver.requests) == 2

    # Signed per Standard Webhooks with the tenant's secret, the same id both times; another
    # tenant's secret does not verify.
    expected_id = str(delivery_id(task_id, version))
    secret = live.webhooks.secret("acme").current.secret
    other = live.webhooks.secret("globex").current.secret
    for request in receiver.requests:
        assert request.headers["webhook-id"] == expected_id
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"].startswith("taskledger-webhooks/")
        assert request.headers["webhook-signature"].startswith("v1,")
        Webhook(secret).verify(request.body, request.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(request.body, request.headers)

    # The body: the task as GET ?as_of_version answers it, and the event.
    body = orjson.loads(receiver.requests[-1].body)
    assert body["type"] == "AttemptCompleted"
    as_of = await asyncio.to_thread(live.get_as_of, task_id, version=version)
    assert body["task"] == orjson.loads(model_response(TaskOut, task_content(as_of)).body)
    assert body["task"]["status"] == "Completed"
    assert body["task"]["callback_url"] == receiver.url
    assert body["event"]["version"] == version
    assert body["event"]["type"] == "AttemptCompleted"
    assert body["event"]["data"]["result"]["stdout"] == "6\n"

    # The task shows the last delivery.
    shown = TaskOut.model_validate(task_content(await asyncio.to_thread(live.get, task_id)))
    assert shown.last_delivery is not None
    assert (shown.last_delivery.outcome, shown.last_delivery.status_code) == ("delivered", 200)
    assert shown.last_delivery.delivery_id == uuid.UUID(expected_id)
    assert shown.status == "Completed"
    registry = deliverer.metrics.registry
    assert registry.get_sample_value("taskledger_webhook_deliveries_total", {"outcome": "failed"})
    assert registry.get_sample_value("taskledger_webhook_delivery_seconds_count") == 2


def _state(database_url: str, schema: str, task_id: uuid.UUID) -> list[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return [row["state"] for row in deliveries_of(conn, schema, task_id)]


async def test_a_receiver_that_is_down_for_a_while_gets_it_once_it_is_up(
    live: Ledger, receiver: Receiver, database_url: str, schema: str
) -> None:
    task_id, _ = await asyncio.to_thread(completed_task, live, receiver.url)
    async with delivering(deliverer_for(live, database_url, schema, backoff=(0.3,))):
        failed = await until(
            "two refused connections", lambda: len(attempts_of(live, task_id)) >= 2 or None
        )
        assert all(a.data["outcome"] == "failed" for a in attempts_of(live, task_id))
        assert "ConnectError" in str(failed and attempts_of(live, task_id)[0].data["error"])
        await receiver.start()
        attempts = await until("the delivery", lambda: delivered(live, task_id))
    assert len(receiver.requests) == 1
    assert attempts[-1].data["delivery_attempt"] == len(attempts) >= 3


async def test_a_retry_window_that_ends_gives_up(
    live: Ledger, receiver: Receiver, database_url: str, schema: str
) -> None:
    receiver.answers = [(503, {})] * 5
    await receiver.start()
    task_id, _ = await asyncio.to_thread(completed_task, live, receiver.url)
    deliverer = deliverer_for(live, database_url, schema, backoff=(5.0,), retry_hours=1 / 3600)
    async with delivering(deliverer):
        await until(
            "the delivery to be given up",
            lambda: _state(database_url, schema, task_id) == ["gave-up"],
        )
    (attempt,) = attempts_of(live, task_id)
    assert (attempt.data["outcome"], attempt.data["status_code"]) == ("gave-up", 503)
    assert attempt.data["next_attempt_at"] is None


async def test_a_webhook_sent_again_after_a_crash_before_its_record_keeps_its_id(
    live: Ledger, receiver: Receiver, database_url: str, schema: str
) -> None:
    await receiver.start()
    task_id, version = await asyncio.to_thread(completed_task, live, receiver.url)

    def due_row() -> list[dict[str, Any]]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            return [r for r in due(conn, schema, datetime.now(UTC), 10) if r["task_id"] == task_id]

    (row,) = await until("the delivery owed", due_row)
    deliverer = deliverer_for(live, database_url, schema)
    async with deliverer.client() as client:
        sent = await deliverer.send(client, row)  # ... and the process dies: no record
    assert sent.delivered
    assert attempts_of(live, task_id) == []
    async with delivering(deliverer):
        (attempt,) = await until("the delivery", lambda: delivered(live, task_id))
    assert attempt.data["delivery_attempt"] == 1
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.headers["webhook-id"] == str(delivery_id(task_id, version))
    assert orjson.loads(first.body) == orjson.loads(second.body)


async def test_the_tenant_default_callback_and_the_events_a_task_names(
    live: Ledger, receiver: Receiver, database_url: str, schema: str
) -> None:
    await receiver.start()
    await asyncio.to_thread(live.webhooks.set_default, "acme", receiver.url, None, "admin")

    def submit_and_start(**fields: Any) -> uuid.UUID:
        task = live.submit(
            language="echo", code="", description="", tenant="acme", submitted_by="k", **fields
        ).task
        live.start_attempt(task.id, 1, "worker-1")
        return task.id

    by_default = await asyncio.to_thread(submit_and_start)  # Started: not terminal, not sent
    started = await asyncio.to_thread(submit_and_start, callback_events=["AttemptStarted"])
    async with delivering(deliverer_for(live, database_url, schema)):
        await until("the AttemptStarted webhook", lambda: delivered(live, started))
        await asyncio.to_thread(live.cancel, by_default, by="k")
        await until("the TaskCancelled webhook", lambda: delivered(live, by_default))
    types = sorted(orjson.loads(r.body)["type"] for r in receiver.requests)
    assert types == ["AttemptStarted", "TaskCancelled"]


# -- SSRF ----------------------------------------------------------------------------------------


async def test_refused_targets_are_recorded_as_failed_attempts_that_say_why(
    store_env: dict[str, str],
    live: Ledger,
    receiver: Receiver,
    database_url: str,
    schema: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Accepted when submitted (the ledger's allow list opened them), refused when sent by
    a deliverer whose policy does not: no request leaves, each attempt says why."""
    await receiver.start()
    port = receiver.sock.getsockname()[1]
    permissive = make_ledger(store_env, "127.0.0.1, 10.0.0.1, 169.254.169.254, ::1, localhost")
    targets = {
        f"http://127.0.0.1:{port}/hook": "127.0.0.1 is a loopback address",
        "http://10.0.0.1/hook": "10.0.0.1 is a private address",
        "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is a link-local address",
        f"http://[::1]:{port}/hook": "::1 is a loopback address",
        f"http://localhost:{port}/hook": "localhost names this host",
    }
    try:
        ids = {
            url: (await asyncio.to_thread(completed_task, permissive, url))[0] for url in targets
        }
    finally:
        permissive.close()
    caplog.set_level(logging.WARNING, logger="api.delivery")
    strict = deliverer_for(live, database_url, schema, targets=TargetPolicy(), backoff=(60.0,))
    async with delivering(strict):
        for url, task_id in ids.items():
            (attempt,) = await until(url, lambda t=task_id: attempts_of(live, t) or None)
            assert attempt.data["outcome"] == "failed"
            assert attempt.data["status_code"] is None
            assert attempt.data["error"].startswith(targets[url]), attempt.data["error"]
            assert attempt.data["error"].endswith("set TASKLEDGER_WEBHOOK_ALLOW to allow it")
    assert receiver.requests == []
    logged = [r.getMessage() for r in caplog.records]
    assert any("127.0.0.1 is a loopback address; set TASKLEDGER_WEBHOOK_ALLOW" in m for m in logged)


async def test_a_redirect_is_not_followed_and_an_allowed_name_is_reached(
    store_env: dict[str, str], receiver: Receiver, database_url: str, schema: str
) -> None:
    """A 302 to the metadata address is a failure with its status (never followed); the
    name `localhost`, allowed by name, is resolved and reached."""
    ledger = make_ledger(store_env, "localhost")
    with psycopg.connect(database_url, autocommit=True) as conn:
        for projection in all_projections().values():
            ensure_installed(conn, schema, projection)
    runner = ProjectionRunner(
        database_url, schema, WebhookDeliveriesProjection(), poll_interval=0.2
    )
    runner.start()
    try:
        receiver.answers = [(302, {"location": "http://169.254.169.254/latest/meta-data/"})]
        await receiver.start()
        url = f"http://localhost:{receiver.sock.getsockname()[1]}/hook"
        task_id, _ = await asyncio.to_thread(completed_task, ledger, url)
        deliverer = deliverer_for(
            ledger, database_url, schema, targets=TargetPolicy.parse("localhost")
        )
        async with delivering(deliverer):
            attempts = await until("the delivery", lambda: delivered(ledger, task_id))
        first = attempts[0].data
        assert (first["outcome"], first["status_code"]) == ("failed", 302)
        assert first["error"] == "HTTP 302: redirects are not followed"
        assert len(receiver.requests) == 2  # the 302, then the retry: nothing else
        assert receiver.requests[0].headers["host"] == f"localhost:{receiver.sock.getsockname()[1]}"
    finally:
        runner.stop()
        ledger.close()


class RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(host)
        raise httpcore.ConnectError("not in this test")


async def test_every_address_a_name_resolves_to_is_checked_before_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name that resolves to a public address and to 127.0.0.1 is refused (DNS that
    answers both, or rebinding between two lookups); nothing is connected to."""
    answers = {
        "mixed.example": ["93.184.216.34", "127.0.0.1"],
        "public.example": ["93.184.216.34"],
    }
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in answers[host]
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    inner = RecordingBackend()
    backend = PinnedBackend(TargetPolicy(), inner)
    with pytest.raises(TargetRefused, match=r"mixed\.example resolves to 127\.0\.0\.1, which is a"):
        await backend.connect_tcp("mixed.example", 443, timeout=1)
    assert inner.calls == []
    # A public name is connected to at the address checked, not looked up again.
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("public.example", 443, timeout=1)
    assert inner.calls == ["93.184.216.34"]
    assert await backend.addresses("8.8.8.8", 80) == [ipaddress.ip_address("8.8.8.8")]


# -- secrets -------------------------------------------------------------------------------------


async def test_after_a_rotation_both_secrets_verify_for_the_grace_then_only_the_new_one(
    api: Api, clock: ManualClock
) -> None:
    admin = api.auth("acme-admin")
    ledger = api.context.ledger
    first = (await api.client.get("/api/webhooks/secret", headers=admin)).json()
    again = (await api.client.get("/api/webhooks/secret", headers=admin)).json()
    assert first == again  # made on first need, then kept
    assert first["previous_secret_id"] is None
    rotated = await api.client.post("/api/webhooks/secret", headers=admin)
    assert rotated.status_code == 200
    assert rotated.headers["cache-control"] == "no-store"
    new = rotated.json()
    assert new["secret_id"] != first["secret_id"]
    assert new["previous_secret_id"] == first["secret_id"]
    until_at = datetime.fromisoformat(new["previous_signs_until"])
    assert until_at == datetime.fromisoformat(new["created_at"]) + GRACE

    def signed_now() -> tuple[bytes, dict[str, str]]:
        body = b'{"type":"AttemptCompleted"}'
        secrets = ledger.webhooks.signing_secrets("acme", clock.now())
        at = datetime.now(UTC)
        headers = {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": sign(secrets, "msg_1", at, body),
        }
        return body, headers

    body, headers = signed_now()
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(first["secret"]).verify(body, headers)
    Webhook(new["secret"]).verify(body, headers)

    clock.advance(GRACE.total_seconds() - 1)
    body, headers = signed_now()
    Webhook(first["secret"]).verify(body, headers)

    clock.advance(2)
    body, headers = signed_now()
    Webhook(new["secret"]).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(first["secret"]).verify(body, headers)
    shown = (await api.client.get("/api/webhooks/secret", headers=admin)).json()
    assert (shown["secret_id"], shown["previous_secret_id"]) == (new["secret_id"], None)
    # The history of the tenant's settings says who rotated, never the secret.
    other = await api.client.get("/api/webhooks/secret?tenant=globex", headers=admin)
    assert other.json()["tenant"] == "globex"
    assert other.json()["secret"] != new["secret"]
    forbidden = await api.client.get("/api/webhooks/secret", headers=api.auth("acme-submit"))
    assert forbidden.status_code == 403


async def test_secrets_are_not_in_any_event(api: Api, database_url: str, schema: str) -> None:
    admin = api.auth("acme-admin")
    secret = (await api.client.post("/api/webhooks/secret", headers=admin)).json()["secret"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            f'SELECT topic, state FROM "{schema}".taskledger_events'  # noqa: S608 - our schema
        ).fetchall()
    topics = [topic for topic, _ in rows]
    assert "ledger.webhooks:TenantSettings.WebhookSecretRotated" in topics
    assert all(secret.encode() not in bytes(state) for _, state in rows)


# -- the API: validation, PATCH, the default ---------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"callback_url": "ftp://hooks.example.com/x"}, "callback_url"),
        ({"callback_url": "https://u:p@hooks.example.com/x"}, "callback_url"),
        ({"callback_url": "http://10.0.0.1/x"}, "callback_url"),
        ({"callback_url": "http://169.254.169.254/"}, "callback_url"),
        ({"callback_url": "http://[::1]/"}, "callback_url"),
        ({"callback_url": "https://h.example/" + "a" * 2_000}, "callback_url"),
        ({"callback_url": 42}, "callback_url"),
        ({"callback_events": ["TaskSubmitted"]}, "callback_events.0"),
        ({"callback_events": []}, "callback_events"),
    ],
)
async def test_bad_callbacks_are_422_naming_the_field_and_store_nothing(
    api: Api, fields: dict[str, Any], field_name: str
) -> None:
    ledger = api.context.ledger
    before = ledger.store.recorder.max_notification_id()
    response = await api.client.post(
        "/api/tasks", json={"language": "echo", **fields}, headers=api.auth("acme-submit")
    )
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field_name
    assert ledger.store.recorder.max_notification_id() == before


async def test_the_callback_can_change_until_the_task_is_terminal(api: Api) -> None:
    submitter = api.auth("acme-submit")
    created = await api.client.post(
        "/api/tasks",
        json={"language": "echo", "callback_url": "https://hooks.example.com/a"},
        headers=submitter,
    )
    assert created.status_code == 201
    task = created.json()
    assert (task["callback_url"], task["callback_events"], task["last_delivery"]) == (
        "https://hooks.example.com/a",
        None,
        None,
    )
    url = f"/api/tasks/{task['id']}"
    patched = await api.client.patch(
        url,
        json={"callback_url": "https://hooks.example.com/b", "callback_events": ["TaskExpired"]},
        headers=submitter,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["callback_url"] == "https://hooks.example.com/b"
    assert patched.json()["callback_events"] == ["TaskExpired"]
    refused = await api.client.patch(
        url, json={"callback_url": "http://10.1.2.3/"}, headers=submitter
    )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "callback_url"
    cleared = await api.client.patch(url, json={"callback_url": None}, headers=submitter)
    assert cleared.json()["callback_url"] is None
    await api.client.post(f"{url}/cancel", headers=submitter)
    late = await api.client.patch(
        url, json={"callback_url": "https://hooks.example.com/c"}, headers=submitter
    )
    assert late.status_code == 409
    assert late.json()["type"].endswith("/task-is-terminal")
    history = (await api.client.get(f"{url}/history", headers=submitter)).json()["items"]
    assert history[0]["data"]["callback_url"] == "https://hooks.example.com/a"


async def test_the_tenant_default_is_set_read_and_cleared_by_admins(api: Api) -> None:
    admin = api.auth("acme-admin")
    empty = (await api.client.get("/api/webhooks/default", headers=admin)).json()
    assert empty == {
        "tenant": "acme",
        "callback_url": None,
        "callback_events": None,
        "updated_at": None,
    }
    put = await api.client.put(
        "/api/webhooks/default?tenant=globex",
        json={"callback_url": "https://hooks.example.com/g", "callback_events": ["TaskExpired"]},
        headers=admin,
    )
    assert put.status_code == 200, put.text
    read = (await api.client.get("/api/webhooks/default?tenant=globex", headers=admin)).json()
    assert (read["callback_url"], read["callback_events"]) == (
        "https://hooks.example.com/g",
        ["TaskExpired"],
    )
    bad = await api.client.put(
        "/api/webhooks/default", json={"callback_url": "http://127.0.0.1/"}, headers=admin
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "callback_url"
    cleared = await api.client.put(
        "/api/webhooks/default?tenant=globex", json={"callback_url": None}, headers=admin
    )
    assert cleared.json()["callback_url"] is None
    submitter = await api.client.get("/api/webhooks/default", headers=api.auth("acme-submit"))
    assert submitter.status_code == 403
    assert (
        await api.client.get("/api/webhooks/default?tenant=a%20b", headers=admin)
    ).status_code == 422
