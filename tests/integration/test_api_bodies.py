"""Every body the API answers fits the schema its OpenAPI document gives for that answer,
exactly: no field the document does not describe, every field it requires, the types,
formats and values it states. One walk through the API calls every documented operation
with real tasks (in every state the bodies differ by) and checks each answer.
"""

from __future__ import annotations

import asyncio
import copy
import typing
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import BaseModel

from api.openapi import build_openapi
from api.operations import OPERATIONS
from api.schemas import Problem, TaskList, TaskOut, TaskSummaryOut, Workers
from ledger import AttemptError, AttemptResult
from ledger.leases import WorkerInfo
from projections.task_status import COLUMNS
from tests.integration.conftest import Api

FORMATS = FormatChecker()


def closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to others: the
    document leaves them open (clients must accept new fields), but a body with a field
    the document does not describe means the body and the document have drifted apart."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


class Document:
    """The served OpenAPI document, checking answers against it and noting what it saw."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.components = closed(copy.deepcopy(document["components"]["schemas"]))
        self.checked: set[tuple[str, str, str]] = set()  # method, path, status

    def check(self, response: httpx.Response, path: str) -> Any:
        """Assert that `response` (to a request on the documented `path`) is documented:
        its status, its content type, and its body against that answer's schema."""
        method = response.request.method.lower()
        where = f"{method.upper()} {path} → {response.status_code}"
        answers = self.document["paths"][path][method]["responses"]
        assert str(response.status_code) in answers, f"{where}: undocumented status"
        content = answers[str(response.status_code)]["content"]
        media_type = response.headers["content-type"].split(";")[0]
        assert media_type in content, f"{where}: {media_type} is not in {list(content)}"
        root = {"components": {"schemas": self.components}, **content[media_type]["schema"]}
        validator = Draft202012Validator(root, format_checker=FORMATS)
        body = response.json()
        problems = [
            f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
            for e in validator.iter_errors(body)
        ]
        assert not problems, f"{where}: the body does not fit its schema:\n" + "\n".join(problems)
        self.checked.add((method, path, str(response.status_code)))
        return body


def test_the_checks_see_formats() -> None:
    """The date-time and uuid formats are checked (date-time needs rfc3339-validator)."""
    assert not FORMATS.conforms("2030-01-01 00:00", "date-time")
    assert FORMATS.conforms("2030-01-01T00:00:00Z", "date-time")
    assert not FORMATS.conforms("not-a-uuid", "uuid")


def test_closing_a_schema_refuses_an_undocumented_field() -> None:
    document = Document(build_openapi())
    request = httpx.Request("GET", "http://taskledger.test/healthz")
    extra = httpx.Response(200, json={"status": "ok", "checks": {}, "uptime": 3}, request=request)
    with pytest.raises(AssertionError, match="uptime"):
        document.check(extra, "/healthz")
    missing = httpx.Response(200, json={"checks": {}}, request=request)
    with pytest.raises(AssertionError, match="status"):
        document.check(missing, "/healthz")


def response_models() -> set[type[BaseModel]]:
    """Every model a response body is made of, nested ones included."""
    found: set[type[BaseModel]] = set()

    def visit(annotation: Any) -> None:
        model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if model and annotation not in found:
            found.add(annotation)
            for field in annotation.model_fields.values():
                visit(field.annotation)
        for argument in typing.get_args(annotation):
            visit(argument)

    for operation in OPERATIONS:
        visit(operation.response)
    visit(Problem)
    return found


def test_response_models_write_their_fields_as_they_are() -> None:
    """dump_json writes a model's fields with orjson, not with pydantic's serializer: a
    model that changed how a field is written would not be written as its schema says."""
    models = response_models()
    assert {TaskOut, TaskList, Workers, Problem} <= models
    for model in models:
        decorators = model.__pydantic_decorators__
        assert not decorators.field_serializers, model
        assert not decorators.model_serializers, model
        assert not model.model_computed_fields, model
        assert model.model_config.get("extra") != "allow", model  # extras are not fields
        for name, field in model.model_fields.items():
            assert field.alias in (None, name), (model, name)
            assert field.serialization_alias in (None, name), (model, name)
            assert not field.exclude, (model, name)


def test_list_items_are_columns_of_the_task_view() -> None:
    assert set(TaskSummaryOut.model_fields) <= set(COLUMNS)


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_every_operation_answers_what_its_document_says(api: Api) -> None:
    document = Document((await api.client.get("/openapi.json")).json())
    assert document.document == httpx.Response(200, json=build_openapi()).json()
    admin, reader, submitter = (
        api.auth("acme-admin"),
        api.auth("acme-read"),
        api.auth("acme-submit"),
    )
    get, post, patch = api.client.get, api.client.post, api.client.patch
    ledger = api.context.ledger

    # Submitted, and the same submission again (its Idempotency-Key): 201, then 200.
    echo = {"language": "echo", "description": "an echo", "data": {"when": "now", "n": [1, 2.5]}}
    again = {**submitter, "Idempotency-Key": "bodies-1"}
    for status in (201, 200):
        response = await post("/api/tasks", json=echo, headers=again)
        assert response.status_code == status, response.text
        pending = document.check(response, "/api/tasks")

    # Completed (a result), failed (an error), then retried; updated; cancelled.
    python = {"language": "python", "code": "print(6)", "data": None, "max_attempts": 1}
    completed = document.check(
        await post("/api/tasks", json=python, headers=submitter), "/api/tasks"
    )
    failed = document.check(await post("/api/tasks", json=python, headers=submitter), "/api/tasks")
    for task_id in (completed["id"], failed["id"]):
        await asyncio.to_thread(ledger.start_attempt, uuid.UUID(task_id), 1, "worker-1")
    await asyncio.to_thread(
        ledger.complete_attempt,
        uuid.UUID(completed["id"]),
        1,
        AttemptResult(stdout="6\n", stderr="warning\n", exit_code=0, duration_ms=12.5),
    )
    await asyncio.to_thread(
        ledger.fail_attempt,
        uuid.UUID(failed["id"]),
        1,
        AttemptError("program_error", "exit 2", exit_code=2),
        retryable=False,
    )
    one = "/api/tasks/{task_id}"
    body = document.check(await get(f"/api/tasks/{completed['id']}", headers=reader), one)
    assert body["result"]["stdout"] == "6\n"
    assert body["error"] is None
    body = document.check(await get(f"/api/tasks/{failed['id']}?wait=1", headers=reader), one)
    assert body["error"] == {"kind": "program_error", "message": "exit 2"}
    assert body["result"] is None
    retried = await post(f"/api/tasks/{failed['id']}/retry", json={}, headers=submitter)
    assert retried.status_code == 200, retried.text
    document.check(retried, "/api/tasks/{task_id}/retry")
    patched = await patch(
        f"/api/tasks/{pending['id']}",
        json={"description": "renamed", "data": {"n": None}},
        headers={**submitter, "If-Match": f'"{pending["version"]}"'},
    )
    assert patched.status_code == 200, patched.text
    document.check(patched, one)
    cancelled = await post(
        f"/api/tasks/{pending['id']}/cancel", json={"reason": "enough"}, headers=submitter
    )
    assert cancelled.status_code == 200, cancelled.text
    document.check(cancelled, "/api/tasks/{task_id}/cancel")
    for task in (pending, completed, failed):
        history = await get(f"/api/tasks/{task['id']}/history", headers=reader)
        assert len(document.check(history, "/api/tasks/{task_id}/history")["items"]) >= 3

    # The views: a page with a next one and the last page, of tasks and of events.
    await api.catch_up()
    for url in ("/api/tasks?limit=2", "/api/tasks?status=Completed", "/api/tasks"):
        page = document.check(await get(url, headers=reader), "/api/tasks")
        assert page["items"]
    assert (await get("/api/tasks?limit=2", headers=reader)).json()["next_cursor"]
    for url in ("/api/audit?limit=2", f"/api/audit?task_id={completed['id']}"):
        assert document.check(await get(url, headers=reader), "/api/audit")["items"]
    stats = document.check(await get("/api/stats", headers=reader), "/api/stats")
    assert stats["counts"]
    assert stats["projections"]
    assert stats["run_time"]["count"] >= 1
    minutes = document.check(await get("/api/stats/minutes", headers=reader), "/api/stats/minutes")
    assert len(minutes["minutes"]) == 60
    found = document.check(await get("/api/tasks?q=RENAMED", headers=reader), "/api/tasks")
    assert [task["id"] for task in found["items"]] == [pending["id"]]

    # Bulk: a retry of the Cancelled task and a refusal of the Completed one.
    bulk = await post(
        "/api/tasks/bulk",
        json={"action": "retry", "filter": {"status": ["Cancelled", "Completed"]}},
        headers=submitter,
    )
    assert bulk.status_code == 200, bulk.text
    outcome = document.check(bulk, "/api/tasks/bulk")
    assert (outcome["matched"], outcome["done"]) == (2, 1)
    assert [refused["id"] for refused in outcome["refused_tasks"]] == [completed["id"]]

    # Keys: issued (the key shown once), listed without it, revoked.
    issued = await post(
        "/api/keys", json={"tenant": "acme", "role": "read", "label": "ci"}, headers=admin
    )
    assert issued.status_code == 201, issued.text
    key = document.check(issued, "/api/keys")
    await api.catch_up()
    listed = document.check(await get("/api/keys", headers=admin), "/api/keys")["items"]
    assert key["key_id"] in [item["key_id"] for item in listed]
    assert all("key" not in item for item in listed)
    revoked = await post(f"/api/keys/{key['key_id']}/revoke", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert document.check(revoked, "/api/keys/{key_id}/revoke")["revoked_at"] is not None

    # Workers: with their attempts for an admin key, without them (absent) for others.
    assert ledger.leases is not None
    await asyncio.to_thread(ledger.start_attempt, uuid.UUID(failed["id"]), 2, "worker-7")
    running = [{"task_id": failed["id"], "attempt": 2, "language": "python"}]
    info = WorkerInfo(
        worker_id="worker-7",
        host="box",
        pid=42,
        version="1.2.3",
        slots=2,
        busy=1,
        running=running,
        started_at=datetime.now(UTC),
    )
    await asyncio.to_thread(ledger.leases.heartbeat, info)
    (seen,) = document.check(await get("/api/workers", headers=admin), "/api/workers")["workers"]
    assert seen["attempts"] == running
    (seen,) = document.check(await get("/api/workers", headers=reader), "/api/workers")["workers"]
    assert "attempts" not in seen

    # The events feed, as JSON pages (the stream is tested in test_events_feed).
    feed = document.check(await get("/api/events?limit=3", headers=reader), "/api/events")
    assert len(feed["items"]) == 3
    rest = await get(f"/api/events?after={feed['next_after']}", headers=reader)
    assert document.check(rest, "/api/events")["items"]

    # Webhooks: a task with a callback and a delivery attempt; a tenant's secret (read,
    # rotated) and default callback (set, read).
    hooked = document.check(
        await post(
            "/api/tasks",
            json={**echo, "callback_url": "https://hooks.example.com/t", "callback_events": None},
            headers=submitter,
        ),
        "/api/tasks",
    )
    assert hooked["callback_url"] == "https://hooks.example.com/t"
    assert hooked["last_delivery"] is None
    await asyncio.to_thread(
        ledger.record_webhook_attempt,
        uuid.UUID(hooked["id"]),
        delivery_id=uuid.uuid4(),
        trigger_version=1,
        trigger_type="TaskSubmitted",
        url="https://hooks.example.com/t",
        delivery_attempt=1,
        outcome="failed",
        status_code=None,
        error="could not connect",
        next_attempt_at=datetime.now(UTC),
    )
    body = document.check(await get(f"/api/tasks/{hooked['id']}", headers=reader), one)
    assert body["last_delivery"]["outcome"] == "failed"
    secret = document.check(
        await get("/api/webhooks/secret", headers=admin), "/api/webhooks/secret"
    )
    assert secret["secret"].startswith("whsec_")
    rotated = document.check(
        await post("/api/webhooks/secret", headers=admin), "/api/webhooks/secret"
    )
    assert rotated["previous_secret_id"] == secret["secret_id"]
    put = await api.client.put(
        "/api/webhooks/default",
        json={"callback_url": "https://hooks.example.com/default"},
        headers=admin,
    )
    assert document.check(put, "/api/webhooks/default")["callback_events"] is None
    default = document.check(
        await get("/api/webhooks/default", headers=admin), "/api/webhooks/default"
    )
    assert default["callback_url"] == "https://hooks.example.com/default"

    # The ledger's chain walked: admin only.
    verified = document.check(await get("/api/ledger/verify", headers=admin), "/api/ledger/verify")
    assert verified["status"] == "ok"
    document.check(await get("/api/ledger/verify", headers=reader), "/api/ledger/verify")

    # Health and readiness: ok, degraded (only the broker fails), not ready.
    document.check(await get("/healthz"), "/healthz")
    assert document.check(await get("/readyz"), "/readyz")["status"] == "ok"

    async def failing() -> str:
        return "unreachable"

    api.context.readiness["broker"] = failing
    assert document.check(await get("/readyz"), "/readyz")["status"] == "degraded"
    api.context.readiness["database-probe"] = failing
    not_ready = await get("/readyz")
    assert not_ready.status_code == 503
    assert document.check(not_ready, "/readyz")["status"] == "unavailable"

    # Problems: no key, a role too weak, no such task, a refused transition, a bad field.
    document.check(await get("/api/tasks"), "/api/tasks")
    document.check(await post("/api/tasks", json=echo, headers=reader), "/api/tasks")
    document.check(await get(f"/api/tasks/{uuid.uuid4()}", headers=reader), one)
    refused = await post(f"/api/tasks/{completed['id']}/cancel", headers=submitter)
    assert refused.status_code == 409
    document.check(refused, "/api/tasks/{task_id}/cancel")
    invalid = await post("/api/tasks", json={"language": "cobol"}, headers=submitter)
    assert document.check(invalid, "/api/tasks")["errors"][0]["field"] == "language"

    documented = {
        (method, path) for path, item in document.document["paths"].items() for method in item
    }
    assert {(method, path) for method, path, _ in document.checked} == documented
