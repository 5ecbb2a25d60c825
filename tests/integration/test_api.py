"""The HTTP API through httpx's ASGI transport, against a real PostgreSQL ledger and views."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from api.schemas import TaskOut, TaskSummaryOut
from ledger import AttemptError, AttemptResult, ManualClock
from ledger.errors import LedgerUnavailable
from ledger.leases import WorkerInfo
from tests.integration.conftest import Api

pytestmark = [pytest.mark.postgres, pytest.mark.asyncio]

TASK = {
    "description": "add",
    "language": "python",
    "code": "print(sum(data))",
    "data": [1, 2, 3],
    "ttl_seconds": 30,
    "max_attempts": 2,
}
PROBLEM = "application/problem+json"


async def submit(api: Api, key: str = "acme-submit", **fields: Any) -> dict[str, Any]:
    response = await api.client.post("/api/tasks", json={**TASK, **fields}, headers=api.auth(key))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"]
    assert body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


async def event_count(api: Api) -> int:
    return await asyncio.to_thread(
        lambda: api.context.ledger.store.recorder.max_notification_id() or 0
    )


# -- submitting ----------------------------------------------------------------------------------


async def test_submit_returns_the_task_with_location_and_etag(api: Api) -> None:
    response = await api.client.post("/api/tasks", json=TASK, headers=api.auth("acme-submit"))
    assert response.status_code == 201
    task = response.json()
    assert response.headers["location"] == f"/api/tasks/{task['id']}"
    assert response.headers["etag"] == f'"{task["version"]}"'
    assert task["status"] == "Pending"
    assert task["attempt"] == 1
    assert task["data"] == [1, 2, 3]
    assert task["result"] is None
    assert task["created_at"].endswith("Z")
    fetched = await api.client.get(response.headers["location"], headers=api.auth("acme-read"))
    assert fetched.json() == task


async def test_echo_needs_no_code_and_defaults_apply(api: Api) -> None:
    response = await api.client.post(
        "/api/tasks",
        json={"language": "echo", "data": {"ping": 1}},
        headers=api.auth("acme-submit"),
    )
    task = response.json()
    assert (task["code"], task["description"]) == ("", "")
    assert (task["ttl_seconds"], task["max_attempts"]) == (300, 3)


async def test_idempotency_key_returns_the_same_task_or_409(api: Api) -> None:
    headers = {**api.auth("acme-submit"), "Idempotency-Key": "order-7"}
    first = await api.client.post("/api/tasks", json=TASK, headers=headers)
    again = await api.client.post("/api/tasks", json=TASK, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    different = await api.client.post("/api/tasks", json={**TASK, "data": [9]}, headers=headers)
    assert_problem(different, 409)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**TASK, "language": "cobol"}, "language"),
        ({**TASK, "ttl_seconds": 0}, "ttl_seconds"),
        ({**TASK, "ttl_seconds": 86_401}, "ttl_seconds"),
        ({**TASK, "ttl_seconds": "30"}, "ttl_seconds"),
        ({**TASK, "max_attempts": 11}, "max_attempts"),
        ({**TASK, "max_attempts": 2.5}, "max_attempts"),
        ({**TASK, "description": "x" * 1_001}, "description"),
        ({**TASK, "code": "x" * (64 * 1024 + 1)}, "code"),
        ({**TASK, "data": {"n": 2**64}}, "data"),
        ({**TASK, "surprise": True}, "surprise"),
        ({k: v for k, v in TASK.items() if k != "code"}, "body"),
        ({k: v for k, v in TASK.items() if k != "language"}, "language"),
    ],
)
async def test_bad_submissions_name_the_field_and_write_nothing(
    api: Api, body: dict[str, Any], field: str
) -> None:
    before = await event_count(api)
    response = await api.client.post("/api/tasks", json=body, headers=api.auth("acme-submit"))
    assert_problem(response, 422, field)
    assert await event_count(api) == before


async def test_malformed_json_wrong_type_large_body(api: Api) -> None:
    headers = {**api.auth("acme-submit"), "content-type": "application/json"}
    assert_problem(await api.client.post("/api/tasks", content=b"{nope", headers=headers), 422)
    assert_problem(await api.client.post("/api/tasks", content=b"[1]", headers=headers), 422)
    text = {**api.auth("acme-submit"), "content-type": "text/plain"}
    assert_problem(await api.client.post("/api/tasks", content=b"{}", headers=text), 415)
    huge = b'{"data": "' + b"x" * (1024 * 1024) + b'"}'
    assert_problem(await api.client.post("/api/tasks", content=huge, headers=headers), 413)


# -- reading -------------------------------------------------------------------------------------


async def test_unknown_and_malformed_ids(api: Api) -> None:
    headers = api.auth("acme-read")
    assert_problem(await api.client.get(f"/api/tasks/{uuid.uuid4()}", headers=headers), 404)
    assert_problem(await api.client.get("/api/tasks/not-a-uuid", headers=headers), 404)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/tasks/{id}", None),
        ("get", "/api/tasks/{id}/history", None),
        ("patch", "/api/tasks/{id}", {"description": "x"}),
        ("post", "/api/tasks/{id}/retry", None),
        ("post", "/api/tasks/{id}/cancel", None),
    ],
)
@pytest.mark.parametrize("task_id", ["not-a-uuid", "123", "7d6ff884-471e-4133-9d3f-3c083eca3b9"])
async def test_a_malformed_task_id_is_an_unknown_task(
    api: Api, method: str, path: str, body: Any, task_id: str
) -> None:
    """404 as for any id no task has (a resource path, not a field to correct: not 422)."""
    await submit(api)
    before = await event_count(api)
    response = await api.client.request(
        method.upper(), path.format(id=task_id), json=body, headers=api.auth("acme-submit")
    )
    problem = assert_problem(response, 404)
    assert problem["type"].endswith("/task-not-found")
    assert task_id in problem["detail"]
    assert await event_count(api) == before


async def test_unknown_routes_and_methods_are_problems(api: Api) -> None:
    assert_problem(await api.client.get("/api/nothing-here"), 404)
    assert_problem(await api.client.delete("/api/tasks", headers=api.auth("acme-admin")), 405)


async def test_history_lists_every_event_in_order(api: Api) -> None:
    task = await submit(api)
    task_id = uuid.UUID(task["id"])
    ledger = api.context.ledger
    await asyncio.to_thread(ledger.start_attempt, task_id, 1, "w1")
    await asyncio.to_thread(ledger.complete_attempt, task_id, 1, AttemptResult(stdout="6\n"))
    response = await api.client.get(f"/api/tasks/{task_id}/history", headers=api.auth("acme-read"))
    items = response.json()["items"]
    assert [(i["version"], i["type"]) for i in items] == [
        (1, "TaskSubmitted"),
        (2, "AttemptScheduled"),
        (3, "AttemptStarted"),
        (4, "AttemptCompleted"),
    ]
    assert items[3]["data"]["result"]["stdout"] == "6\n"
    got = (await api.client.get(f"/api/tasks/{task_id}", headers=api.auth("acme-read"))).json()
    assert got["status"] == "Completed"
    assert got["result"]["stdout"] == "6\n"
    assert got["worker_id"] == "w1"


async def test_long_poll_returns_when_the_task_finishes(api: Api) -> None:
    task = await submit(api)
    task_id = uuid.UUID(task["id"])
    ledger = api.context.ledger

    async def worker() -> None:
        await asyncio.sleep(0.2)  # let the request start waiting first
        await asyncio.to_thread(ledger.start_attempt, task_id, 1, "w1")
        await asyncio.to_thread(ledger.complete_attempt, task_id, 1, AttemptResult())

    finishing = asyncio.create_task(worker())
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await api.client.get(
        f"/api/tasks/{task_id}", params={"wait": 30}, headers=api.auth("acme-read")
    )
    await finishing
    assert response.json()["status"] == "Completed"
    assert loop.time() - started < 25, "the wait ended by the task finishing, not the timeout"


async def test_a_change_made_while_the_watcher_connects_still_wakes_its_waiter(
    api: Api,
) -> None:
    """The first waiter starts the watcher; the task finishes before the watcher has
    read where the log ends, so that change is below its starting point."""
    task = await submit(api)
    task_id = uuid.UUID(task["id"])
    ledger = api.context.ledger
    with api.context.watcher.subscribe(task_id) as changed:
        # No await between subscribing and finishing: the watcher has not run yet.
        ledger.start_attempt(task_id, 1, "w1")
        ledger.complete_attempt(task_id, 1, AttemptResult())
        await asyncio.wait_for(changed.wait(), 5)


async def test_long_poll_times_out_with_the_current_state(api: Api) -> None:
    task = await submit(api)
    response = await api.client.get(
        f"/api/tasks/{task['id']}", params={"wait": 0.3}, headers=api.auth("acme-read")
    )
    assert response.json()["status"] == "Pending"
    too_long = await api.client.get(
        f"/api/tasks/{task['id']}", params={"wait": 61}, headers=api.auth("acme-read")
    )
    assert_problem(too_long, 422, "wait")


async def test_bodies_have_the_fields_of_their_documented_shape(api: Api) -> None:
    """The schemas are the OpenAPI document and docs/api.md's shapes (tests/unit/test_docs)."""
    task = await submit(api)
    fetched = await api.client.get(f"/api/tasks/{task['id']}", headers=api.auth("acme-read"))
    assert set(task) == set(fetched.json()) == set(TaskOut.model_fields)
    await api.catch_up()
    listed = (await api.client.get("/api/tasks", headers=api.auth("acme-read"))).json()
    (item,) = listed["items"]
    assert set(item) == set(TaskSummaryOut.model_fields)
    assert item["id"] == task["id"]


async def test_list_filters_and_pages(api: Api) -> None:
    ids = [(await submit(api, description=f"t{n}"))["id"] for n in range(7)]
    csharp = await submit(api, language="csharp", code="class P {}")
    await api.catch_up()
    seen = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, "language": "python"}
        if cursor:
            params["cursor"] = cursor
        page = (
            await api.client.get("/api/tasks", params=params, headers=api.auth("acme-read"))
        ).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    only = await api.client.get(
        "/api/tasks", params={"language": "csharp"}, headers=api.auth("acme-read")
    )
    assert [i["id"] for i in only.json()["items"]] == [csharp["id"]]
    pending = await api.client.get(
        "/api/tasks",
        params=[("status", "Pending"), ("status", "Failed")],
        headers=api.auth("acme-read"),
    )
    assert len(pending.json()["items"]) == 8
    for params, field in (
        ({"status": "Done"}, "status"),
        ({"limit": 501}, "limit"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"cursor": "garbage"}, "cursor"),
        ({"sort": "id"}, "sort"),
    ):
        response = await api.client.get("/api/tasks", params=params, headers=api.auth("acme-read"))
        assert_problem(response, 400 if field == "cursor" else 422, field)


async def test_stats_count_by_status(api: Api) -> None:
    await submit(api)
    task = await submit(api)
    await api.client.post(f"/api/tasks/{task['id']}/cancel", headers=api.auth("acme-submit"))
    await api.catch_up()
    stats = (await api.client.get("/api/stats", headers=api.auth("acme-read"))).json()
    assert stats["counts"] == {"Pending": 1, "Cancelled": 1}
    assert stats["projections"]["task_status"]["lag_events"] == 0


async def test_audit_lists_events_across_tasks(api: Api) -> None:
    first = await submit(api)
    await submit(api)
    await api.client.post(f"/api/tasks/{first['id']}/cancel", headers=api.auth("acme-submit"))
    await api.catch_up()
    response = await api.client.get(
        "/api/audit", params={"type": "TaskCancelled"}, headers=api.auth("acme-read")
    )
    items = response.json()["items"]
    assert [(i["type"], i["task_id"]) for i in items] == [("TaskCancelled", first["id"])]
    everything = await api.client.get(
        "/api/audit", params={"task_id": first["id"]}, headers=api.auth("acme-read")
    )
    assert [i["type"] for i in everything.json()["items"]] == [
        "TaskCancelled",
        "AttemptScheduled",
        "TaskSubmitted",
    ]
    assert_problem(
        await api.client.get("/api/audit", params={"task_id": "x"}, headers=api.auth("acme-read")),
        422,
        "task_id",
    )


# -- changing ------------------------------------------------------------------------------------


async def test_patch_with_if_match(api: Api) -> None:
    task = await submit(api)
    url = f"/api/tasks/{task['id']}"
    headers = {**api.auth("acme-submit"), "If-Match": f'"{task["version"]}"'}
    patched = await api.client.patch(
        url, json={"data": {"extra": 1}, "description": "new"}, headers=headers
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["description"] == "new"
    assert patched.json()["data"] == {"extra": 1}
    assert patched.headers["etag"] == f'"{task["version"] + 1}"'
    stale = await api.client.patch(url, json={"description": "again"}, headers=headers)
    assert_problem(stale, 412)
    assert_problem(
        await api.client.patch(url, json={}, headers=api.auth("acme-submit")), 422, "body"
    )
    assert_problem(
        await api.client.patch(url, json={"status": "Completed"}, headers=api.auth("acme-submit")),
        422,
        "status",
    )


async def test_patch_after_pending_is_a_conflict_naming_the_state(api: Api) -> None:
    task = await submit(api)
    await asyncio.to_thread(api.context.ledger.start_attempt, uuid.UUID(task["id"]), 1, "w")
    response = await api.client.patch(
        f"/api/tasks/{task['id']}", json={"code": "print(2)"}, headers=api.auth("acme-submit")
    )
    assert "InProgress" in assert_problem(response, 409)["detail"]
    description = await api.client.patch(
        f"/api/tasks/{task['id']}", json={"description": "ok"}, headers=api.auth("acme-submit")
    )
    assert description.status_code == 200


async def test_cancel_then_retry_with_a_new_ttl(api: Api) -> None:
    task = await submit(api)
    url = f"/api/tasks/{task['id']}"
    cancelled = await api.client.post(
        f"{url}/cancel", json={"reason": "typo"}, headers=api.auth("acme-submit")
    )
    assert cancelled.json()["status"] == "Cancelled"
    assert_problem(await api.client.post(f"{url}/cancel", headers=api.auth("acme-submit")), 409)
    retried = await api.client.post(
        f"{url}/retry", json={"ttl_seconds": 5}, headers=api.auth("acme-submit")
    )
    body = retried.json()
    assert (body["status"], body["attempt"], body["ttl_seconds"]) == ("Pending", 2, 5)
    assert_problem(await api.client.post(f"{url}/retry", headers=api.auth("acme-submit")), 409)


async def test_run_attempt_restarts_at_1_after_a_manual_retry(api: Api) -> None:
    """`"attempt": 2, "max_attempts": 1` is not a broken limit: the retry began a new run,
    and `run_attempt` (what max_attempts bounds) says so."""
    task = await submit(api, max_attempts=1)
    assert (task["attempt"], task["run_attempt"], task["max_attempts"]) == (1, 1, 1)
    task_id = uuid.UUID(task["id"])
    ledger = api.context.ledger
    await asyncio.to_thread(ledger.start_attempt, task_id, 1, "w1")
    await asyncio.to_thread(
        ledger.fail_attempt, task_id, 1, AttemptError("program_error", "exit 1"), retryable=True
    )
    url = f"/api/tasks/{task_id}"
    failed = (await api.client.get(url, headers=api.auth("acme-read"))).json()
    assert (failed["status"], failed["attempt"], failed["run_attempt"]) == ("Failed", 1, 1)
    retried = await api.client.post(f"{url}/retry", headers=api.auth("acme-submit"))
    body = retried.json()
    assert (body["status"], body["attempt"], body["run_attempt"]) == ("Pending", 2, 1)
    assert body["max_attempts"] == 1
    fetched = (await api.client.get(url, headers=api.auth("acme-read"))).json()
    assert fetched == body


# -- who may do what -------------------------------------------------------------------------------


async def test_missing_or_wrong_key_is_401_with_a_challenge(api: Api) -> None:
    for headers in ({}, {"Authorization": "ApiKey wrong"}, {"X-API-Key": "wrong"},
                    {"Authorization": "Bearer wrong-key-0123456789"},
                    {"Authorization": "Bearer "},
                    {"Authorization": "Basic acme-read-key-0123456789"}):  # fmt: skip
        response = await api.client.get("/api/tasks", headers=headers)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "ApiKey"
    assert (
        await api.client.get("/api/tasks", headers={"X-API-Key": api.keys["acme-read"]})
    ).status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "ApiKey", "apikey"])
async def test_the_key_may_come_as_a_bearer_token(api: Api, scheme: str) -> None:
    """Generated clients (openapi-python-client's AuthenticatedClient) send Bearer."""
    headers = {"Authorization": f"{scheme} {api.keys['acme-submit']}"}
    created = await api.client.post("/api/tasks", json=TASK, headers=headers)
    assert created.status_code == 201, created.text
    fetched = await api.client.get(created.headers["location"], headers=headers)
    assert fetched.status_code == 200, fetched.text
    # The role is the key's, whichever way it came.
    read_only = {"Authorization": f"{scheme} {api.keys['acme-read']}"}
    assert_problem(await api.client.post("/api/tasks", json=TASK, headers=read_only), 403)


async def test_issued_keys_work_until_revoked(api: Api) -> None:
    ledger = api.context.ledger
    principal, token = await asyncio.to_thread(
        lambda: ledger.keys.issue(tenant="acme", role="read", issued_by="test")
    )
    headers = {"Authorization": f"ApiKey {token}"}
    assert (await api.client.get("/api/stats", headers=headers)).status_code == 200
    await asyncio.to_thread(lambda: ledger.keys.revoke(principal.key_id, by="test"))
    api.context.authenticator._cache.clear()  # the cache would keep it up to 10 s
    assert_problem(await api.client.get("/api/stats", headers=headers), 401)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/tasks", TASK),
        ("patch", "/api/tasks/{id}", {"description": "x"}),
        ("post", "/api/tasks/{id}/retry", None),
        ("post", "/api/tasks/{id}/cancel", None),
    ],
)
async def test_read_keys_cannot_change_anything(
    api: Api, method: str, path: str, body: Any
) -> None:
    task = await submit(api)
    before = await event_count(api)
    response = await api.client.request(
        method.upper(), path.format(id=task["id"]), json=body, headers=api.auth("acme-read")
    )
    assert_problem(response, 403)
    assert await event_count(api) == before


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/tasks/{id}", None),
        ("get", "/api/tasks/{id}/history", None),
        ("patch", "/api/tasks/{id}", {"description": "mine now"}),
        ("post", "/api/tasks/{id}/retry", None),
        ("post", "/api/tasks/{id}/cancel", None),
    ],
)
async def test_another_tenants_task_does_not_exist(
    api: Api, method: str, path: str, body: Any
) -> None:
    task = await submit(api)
    before = await event_count(api)
    response = await api.client.request(
        method.upper(), path.format(id=task["id"]), json=body, headers=api.auth("globex-submit")
    )
    assert_problem(response, 404)
    assert await event_count(api) == before


async def test_lists_audit_and_stats_are_per_tenant_and_admins_see_all(api: Api) -> None:
    mine = await submit(api)
    theirs = await submit(api, key="globex-submit")
    await api.catch_up()

    async def ids(path: str, key: str) -> set[str]:
        items = (await api.client.get(path, headers=api.auth(key))).json()["items"]
        return {item.get("task_id", item.get("id")) for item in items}

    assert await ids("/api/tasks", "acme-read") == {mine["id"]}
    assert await ids("/api/tasks", "globex-submit") == {theirs["id"]}
    assert await ids("/api/tasks", "acme-admin") == {mine["id"], theirs["id"]}
    assert await ids("/api/audit", "globex-submit") == {theirs["id"]}
    assert await ids("/api/audit", "acme-admin") == {mine["id"], theirs["id"]}
    stats = (await api.client.get("/api/stats", headers=api.auth("globex-submit"))).json()
    assert stats["counts"] == {"Pending": 1}
    admin_get = await api.client.get(f"/api/tasks/{theirs['id']}", headers=api.auth("acme-admin"))
    assert admin_get.status_code == 200


# -- operations ------------------------------------------------------------------------------------


async def test_health_readiness_metrics_and_docs(api: Api) -> None:
    assert (await api.client.get("/healthz")).json()["status"] == "ok"
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["database"] == "ok"
    await submit(api)
    metrics = (await api.client.get("/metrics")).text
    assert 'taskledger_tasks_submitted_total{language="python"} 1.0' in metrics
    assert (
        'taskledger_http_requests_total{method="POST",route="/api/tasks",status="201"}' in metrics
    )
    spec = (await api.client.get("/openapi.json")).json()
    assert spec["openapi"] == "3.1.0"
    page = await api.client.get("/swagger")
    assert "/swagger/static/swagger-ui-bundle.js" in page.text
    assert (await api.client.get("/swagger/static/swagger-ui-bundle.js")).status_code == 200


async def test_readiness_reports_a_lagging_projection(api: Api) -> None:
    await submit(api)  # the views are not caught up in these tests unless asked
    api.context.limits = type(api.context.limits)(ready_max_projection_lag=0)
    ready = await api.client.get("/readyz")
    assert ready.status_code == 503
    assert "behind by" in ready.json()["checks"]["projection:task_status"]


async def test_request_ids_are_echoed_and_errors_carry_them(api: Api) -> None:
    response = await api.client.get(
        "/api/tasks/x", headers={**api.auth("acme-read"), "X-Request-ID": "abc-123"}
    )
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["request_id"] == "abc-123"


async def test_an_unexpected_error_is_a_500_problem_without_internals(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.context.ledger, "get", explode)
    task_id = uuid.uuid4()
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        response = await api.client.get(f"/api/tasks/{task_id}", headers=api.auth("acme-read"))
    body = assert_problem(response, 500)
    assert "secret internals" not in response.text
    assert body["request_id"]
    message = "unhandled error answering a request"
    (logged,) = [r for r in caplog.records if r.getMessage() == message]
    # The operator's line names the request and the task, and keeps the internals.
    assert vars(logged)["request_id"] == body["request_id"]
    assert str(vars(logged)["task_id"]) == str(task_id)
    assert logged.exc_info is not None


async def test_workers_are_listed_from_their_heartbeats(api: Api) -> None:
    task = await submit(api)
    task_id = uuid.UUID(task["id"])
    ledger = api.context.ledger
    await asyncio.to_thread(ledger.start_attempt, task_id, 1, "worker-7")
    assert ledger.leases is not None
    info = WorkerInfo(
        worker_id="worker-7",
        host="box",
        pid=42,
        version="1.2.3",
        slots=2,
        busy=1,
        running=[{"task_id": str(task_id), "attempt": 1, "language": "python"}],
        started_at=datetime.now(UTC),
    )
    assert await asyncio.to_thread(ledger.leases.heartbeat, info) == {(task_id, 1)}
    admin = (await api.client.get("/api/workers", headers=api.auth("acme-admin"))).json()
    (seen,) = [w for w in admin["workers"] if w["worker_id"] == "worker-7"]
    assert (seen["state"], seen["slots"], seen["busy"], seen["running"]) == ("alive", 2, 1, 1)
    assert seen["attempts"] == [{"task_id": str(task_id), "attempt": 1, "language": "python"}]
    # Other roles see the workers, not which tenants' tasks they run.
    reader = (await api.client.get("/api/workers", headers=api.auth("acme-read"))).json()
    (seen,) = [w for w in reader["workers"] if w["worker_id"] == "worker-7"]
    assert "attempts" not in seen
    assert (await api.client.get("/api/workers")).status_code == 401


async def test_an_unavailable_store_answers_503_without_driver_text(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = (
        'event store error: connection to server at "db.internal" (10.0.0.7), port 5432 '
        'failed: FATAL: password authentication failed for user "ledger"; SELECT * FROM x'
    )

    def down(*args: Any, **kwargs: Any) -> Any:
        raise LedgerUnavailable(secret)

    monkeypatch.setattr(api.context.submissions, "_batch", down)
    monkeypatch.setattr(api.context.ledger, "get", down)
    response = await api.client.post(
        "/api/tasks", json={"language": "echo"}, headers=api.auth("acme-submit")
    )
    fetched = await api.client.get(f"/api/tasks/{uuid.uuid4()}", headers=api.auth("acme-read"))
    for answer in (response, fetched):
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        body = answer.text
        for leaked in ("db.internal", "10.0.0.7", "password", "SELECT", "FATAL"):
            assert leaked not in body, body
        assert answer.json()["detail"] == (
            "the event store is not available right now; retry in a moment"
        )


async def test_the_ledger_verification_is_for_admins_and_tells_no_task(api: Api) -> None:
    """An admin sees whether the chain holds, and where it breaks: counts, positions and
    hashes, never another tenant's task id; a submit key of the tenant gets 403."""
    task = await submit(api)
    await submit(api, key="globex-submit")
    history = await api.client.get(
        f"/api/tasks/{task['id']}/history", headers=api.auth("acme-read")
    )
    items = history.json()["items"]
    assert all(len(item["hash"]) == 64 and item["position"] >= 1 for item in items)
    refused = await api.client.get("/api/ledger/verify", headers=api.auth("acme-submit"))
    assert refused.status_code == 403
    ok = await api.client.get("/api/ledger/verify", headers=api.auth("acme-admin"))
    assert ok.status_code == 200
    body = ok.json()
    assert (body["status"], body["events"], body["problem"]) == ("ok", 4, None)
    assert body["head"]["chain"] != items[-1]["hash"]  # the other tenant's events came after
    position = items[-1]["position"]
    with psycopg.connect(api.context.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET state = state || ' '::bytea WHERE notification_id = %s").format(
                sql.Identifier(api.context.schema, "taskledger_events")
            ),
            (position,),
        )
    broken = (await api.client.get("/api/ledger/verify", headers=api.auth("acme-admin"))).json()
    assert broken["status"] == "broken"
    assert broken["problem"] == {"position": position, "kind": "changed"}
    assert task["id"] not in str(broken)


async def test_a_task_as_of_a_time_or_a_version(api: Api) -> None:
    task = await submit(api)
    created = datetime.fromisoformat(task["created_at"])
    await asyncio.to_thread(api.context.ledger.start_attempt, uuid.UUID(task["id"]), 1, "w")
    url, reader = f"/api/tasks/{task['id']}", api.auth("acme-read")
    now = (await api.client.get(url, headers=reader)).json()
    assert (now["status"], now["version"]) == ("InProgress", 3)
    first = await api.client.get(url, params={"as_of_version": 2}, headers=reader)
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["version"]) == ("Pending", 2)
    assert first.headers["etag"] == '"2"'
    # Version 1 (TaskSubmitted) was saved with AttemptScheduled: read as that save.
    submitted = await api.client.get(url, params={"as_of_version": 1}, headers=reader)
    assert submitted.status_code == 200, submitted.text
    assert submitted.json() == first.json()
    then = await api.client.get(url, params={"as_of": created.isoformat()}, headers=reader)
    assert then.json()["version"] in (2, 3)  # both events may share the moment
    before = (created - timedelta(microseconds=1)).isoformat()
    assert_problem(await api.client.get(url, params={"as_of": before}, headers=reader), 404)
    later = await api.client.get(url, params={"as_of": "2999-01-01T00:00:00Z"}, headers=reader)
    assert later.json() == now
    for params, field in (
        ({"as_of_version": 4}, "as_of_version"),
        ({"as_of_version": 0}, "as_of_version"),
        ({"as_of": "yesterday"}, "as_of"),
        ({"as_of": "2030-01-01T00:00:00"}, "as_of"),  # no offset
        ({"as_of": created.isoformat(), "as_of_version": 2}, "as_of_version"),
        ({"as_of_version": 2, "wait": 1}, "wait"),
    ):
        assert_problem(await api.client.get(url, params=params, headers=reader), 422, field)
    other = api.auth("globex-submit")
    assert_problem(await api.client.get(url, params={"as_of_version": 1}, headers=other), 404)


async def test_the_task_list_as_of_a_time(api: Api, clock: ManualClock) -> None:
    """GET /api/tasks?as_of=T: the tasks created by T, each as it was then, with the usual
    filters (applied to those states), pages and tenants."""
    early = await submit(api)
    clock.advance(10)
    middle = clock.now()
    clock.advance(10)
    late = await submit(api)
    await asyncio.to_thread(api.context.ledger.start_attempt, uuid.UUID(early["id"]), 1, "w")
    await submit(api, key="globex-submit")
    await api.catch_up()
    reader = api.auth("acme-read")

    async def listed(**params: Any) -> list[tuple[str, str]]:
        response = await api.client.get("/api/tasks", params=params, headers=reader)
        assert response.status_code == 200, response.text
        return [(item["id"], item["status"]) for item in response.json()["items"]]

    now = await listed()
    assert now == [(late["id"], "Pending"), (early["id"], "InProgress")]
    then = await listed(as_of=middle.isoformat())
    assert then == [(early["id"], "Pending")]  # not started yet; the late one not there
    assert await listed(as_of=middle.isoformat(), status="InProgress") == []
    paged = await api.client.get(
        "/api/tasks", params={"as_of": clock.now().isoformat(), "limit": 1}, headers=reader
    )
    cursor = paged.json()["next_cursor"]
    assert [i["id"] for i in paged.json()["items"]] == [late["id"]]
    assert await listed(as_of=clock.now().isoformat(), limit=1, cursor=cursor) == [
        (early["id"], "InProgress")
    ]
    before = (datetime.fromisoformat(early["created_at"]) - timedelta(seconds=1)).isoformat()
    assert await listed(as_of=before) == []
    bad = await api.client.get("/api/tasks", params={"as_of": "soon"}, headers=reader)
    assert_problem(bad, 422, "as_of")


async def test_history_and_audit_export_as_ndjson_and_csv_that_the_standard_library_reads(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csv
    import io
    import json

    from api import system

    monkeypatch.setattr(system, "EXPORT_PAGE", 7)  # the audit export reads many pages
    tasks = [await submit(api, description=f"export {n}") for n in range(6)]
    await submit(api, key="globex-submit")
    await asyncio.to_thread(api.context.ledger.start_attempt, uuid.UUID(tasks[0]["id"]), 1, "w")
    await api.catch_up()
    reader = api.auth("acme-read")
    url = f"/api/tasks/{tasks[0]['id']}/history"
    items = (await api.client.get(url, headers=reader)).json()["items"]

    ndjson = await api.client.get(url, params={"format": "ndjson"}, headers=reader)
    assert ndjson.status_code == 200
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    assert "attachment" in ndjson.headers["content-disposition"]
    assert [json.loads(line) for line in ndjson.text.splitlines()] == items
    as_csv = await api.client.get(url, params={"format": "csv"}, headers=reader)
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert list(rows[0]) == ["version", "type", "at", "data", "position", "hash"]
    assert [json.loads(r["data"]) for r in rows] == [item["data"] for item in items]
    assert [(int(r["version"]), r["type"], r["at"], r["hash"]) for r in rows] == [
        (i["version"], i["type"], i["at"], i["hash"]) for i in items
    ]

    # The audit: every matching event (here 13, two pages of 7), newest first, this tenant's.
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/api/audit", params=params, headers=reader)).json()
        pages += page["items"]
        if not (cursor := page["next_cursor"]):
            break
    exported = await api.client.get("/api/audit", params={"format": "ndjson"}, headers=reader)
    lines = [json.loads(line) for line in exported.text.splitlines()]
    assert lines == pages
    assert len(lines) == 13
    scheduled = await api.client.get(
        "/api/audit", params={"format": "csv", "type": "AttemptScheduled"}, headers=reader
    )
    rows = list(csv.DictReader(io.StringIO(scheduled.text)))
    assert {r["type"] for r in rows} == {"AttemptScheduled"}
    assert {r["task_id"] for r in rows} == {t["id"] for t in tasks}
    assert {r["worker_id"] for r in rows} == {""}  # null: an empty cell
    for params, field in (
        ({"format": "xml"}, "format"),
        ({"format": "csv", "limit": 5}, "limit"),
        ({"format": "ndjson", "cursor": "x"}, "cursor"),
    ):
        assert_problem(
            await api.client.get("/api/audit", params=params, headers=reader), 422, field
        )
    bad = await api.client.get(url, params={"format": "xml"}, headers=reader)
    assert_problem(bad, 422, "format")
