"""The OpenAPI document against the spec, the routes, and the running API (schemathesis).

The schemathesis run sends generated requests, valid and invalid, to every operation of
the app in-process (over a real PostgreSQL ledger and real views) and checks every answer
against the document: no 5xx, a documented status code, the documented content type, a
body that matches the documented schema, the documented headers. Path ids are drawn from
real tasks in every status as well as from random UUIDs, so the 200/409 paths of
GET/PATCH/retry/cancel/history run too, not only 404s.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import psycopg
import pytest
import pytest_asyncio
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from psycopg import sql
from psycopg_pool import ConnectionPool
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.app import create_app
from api.auth import Authenticator, ConfiguredKey
from api.context import ApiContext
from api.metrics import ApiMetrics
from api.openapi import build_openapi
from api.watch import TaskWatcher
from ledger import AttemptError, AttemptResult, Ledger, ManualClock, RetryPolicy
from ledger.connections import postgres_env
from ledger.keys import Role
from projections import all_projections
from projections.base import ensure_installed
from projections.runner import apply_batch
from tests.integration.conftest import Api

pytestmark = pytest.mark.postgres

ADMIN_KEY = "acme-admin-key-0123456789"
KEYS = [
    ConfiguredKey("acme", Role.ADMIN, ADMIN_KEY),
    ConfiguredKey("acme", Role.SUBMIT, "acme-submit-key-0123456789"),
    ConfiguredKey("acme", Role.READ, "acme-read-key-0123456789"),
    ConfiguredKey("globex", Role.SUBMIT, "globex-submit-key-0123456789"),
]
AUTH = {"Authorization": f"ApiKey {ADMIN_KEY}"}
# Both headers of the document's security schemes (ApiKey and Bearer share Authorization),
# so schemathesis generates neither.
BOTH_AUTH = {**AUTH, "X-API-Key": ADMIN_KEY}
PROBLEM_JSON = "application/problem+json"
# Every generated long-poll is cut to this many seconds: `wait` may be up to 60 and a real
# task that is not terminal would hold the request that long.
MAX_WAIT = 0.2


# Filled by the `asgi_app` fixture, read while cases are generated (inside the test).
REAL_TASK_IDS: list[str] = []


# -- one ledger, one set of views and one app for the module ------------------------------------


@dataclass
class Backend:
    ledger: Ledger
    pool: ConnectionPool
    database_url: str
    schema: str
    task_ids: list[uuid.UUID]

    def context(self) -> ApiContext:
        """A fresh context (its own watcher and limiter) over the shared ledger and views."""
        return ApiContext(
            ledger=self.ledger,
            queries=self.pool,
            database_url=self.database_url,
            schema=self.schema,
            authenticator=Authenticator(KEYS, self.ledger.keys.authenticate),
            watcher=TaskWatcher(self.database_url, self.schema, poll_interval=0.2),
            metrics=ApiMetrics(),
            limiter=anyio.CapacityLimiter(8),
        )

    def catch_up(self) -> None:
        with psycopg.connect(self.database_url) as conn:
            for projection in all_projections().values():
                while apply_batch(conn, self.schema, projection, 1_000)[1]:
                    pass


def seed_tasks(ledger: Ledger, clock: ManualClock) -> list[uuid.UUID]:
    """Tasks in every status, in two tenants."""

    def submit(tenant: str = "acme", **fields: Any) -> uuid.UUID:
        fields = {"description": "seeded", "language": "echo", "code": "", **fields}
        return ledger.submit(tenant=tenant, submitted_by="seed", **fields).task.id

    pending = submit(data={"x": [1, 2, 3]})
    running = submit(language="python", code="print(1)")
    ledger.start_attempt(running, 1, "worker-1")
    completed = submit(data="hello")
    ledger.start_attempt(completed, 1, "worker-1")
    ledger.complete_attempt(completed, 1, AttemptResult(stdout="hello\n", duration_ms=3.5))
    failed = submit(language="python", code="raise SystemExit(2)", max_attempts=1)
    ledger.start_attempt(failed, 1, "worker-2")
    ledger.fail_attempt(
        failed, 1, AttemptError("program_error", "exit 2", exit_code=2), retryable=False
    )
    expired = submit(ttl_seconds=5)
    ledger.start_attempt(expired, 1, "worker-2")
    clock.advance(10)
    ledger.expire(expired, 1, detected_by="reaper")
    cancelled = submit()
    ledger.cancel(cancelled, by="seed", reason="not needed")
    other_tenant = submit(tenant="globex")
    return [pending, running, completed, failed, expired, cancelled, other_tenant]


@pytest.fixture(scope="module")
def backend(database_url: str) -> Iterator[Backend]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    clock = ManualClock()
    ledger = Ledger(
        postgres_env(database_url, schema=schema, pool_size=4, max_overflow=12),
        clock=clock,
        retry_policy=RetryPolicy(base_seconds=1),
    )
    pool = ConnectionPool(
        database_url, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True
    )
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for projection in all_projections().values():
                ensure_installed(conn, schema, projection)
        found = Backend(ledger, pool, database_url, schema, seed_tasks(ledger, clock))
        found.catch_up()
        yield found
    finally:
        pool.close()
        ledger.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


class InProcessApp:
    """The app as schemathesis's in-process transport serves it.

    Schemathesis needs the app when the module is imported (to send its auth probes there as
    well), before any fixture has built it: `asgi_app` plugs the app in for the module. The
    transport serves it on an event loop of its own, in another thread, and keeps its
    lifespan until the process exits; so this answers the lifespan itself and remembers the
    loop, where `asgi_app` closes the app's long-poll watcher before the schema is dropped.
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if self.app is None:
            raise RuntimeError("the app is served only while the asgi_app fixture is active")
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


IN_PROCESS = InProcessApp()


@pytest.fixture(scope="module")
def asgi_app(backend: Backend) -> Iterator[InProcessApp]:
    context = backend.context()
    IN_PROCESS.app = create_app(context)
    REAL_TASK_IDS[:] = [str(task_id) for task_id in backend.task_ids]
    yield IN_PROCESS
    REAL_TASK_IDS.clear()
    IN_PROCESS.app = None
    if IN_PROCESS.loop is not None:
        closing = asyncio.run_coroutine_threadsafe(context.watcher.close(), IN_PROCESS.loop)
        closing.result(10)


# -- the document itself -------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    document = build_openapi()
    assert document["openapi"].startswith("3.1.")
    validate_openapi(document)


def test_every_route_is_documented_with_its_methods() -> None:
    document = build_openapi()
    app = create_app(None)  # type: ignore[arg-type]  # routes only; nothing is served
    routes: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, Route) and (
            route.path.startswith("/api/") or route.path in ("/healthz", "/readyz")
        ):
            methods = {m.lower() for m in route.methods or ()} - {"head"}
            routes.setdefault(route.path, set()).update(methods)
    assert routes, "no /api routes found"
    documented = {path: set(item) for path, item in document["paths"].items()}
    assert documented == routes


def test_every_operation_has_an_id_and_problem_responses() -> None:
    document = build_openapi()
    seen: set[str] = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            operation_id = operation.get("operationId")
            assert operation_id, f"{where} has no operationId"
            assert operation_id not in seen, f"{where}: operationId {operation_id} is not unique"
            seen.add(operation_id)
            responses = operation["responses"]
            assert any(code.startswith("2") for code in responses), f"{where}: no 2xx"
            for code, response in responses.items():
                if not code.startswith(("4", "5")):
                    continue
                if (method, path) == ("get", "/readyz") and code == "503":
                    continue  # "not ready" is a Health body, by design
                content = response.get("content", {})
                assert list(content) == [PROBLEM_JSON], f"{where} {code}: {list(content)}"
                assert content[PROBLEM_JSON]["schema"] == {
                    "$ref": "#/components/schemas/Problem"
                }, f"{where} {code}"
            if operation.get("security"):
                assert "401" in responses, f"{where} needs a key but documents no 401"
                assert "403" in responses, f"{where} checks a role but documents no 403"


def test_every_way_to_send_a_key_is_a_security_scheme() -> None:
    document = build_openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["ApiKeyAuthorization"]["name"] == "Authorization"
    assert schemes["BearerAuth"]["type"] == "http"
    assert schemes["BearerAuth"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if "security" in operation:
                assert operation["security"] == [{name: []} for name in schemes], (method, path)


@pytest.mark.asyncio
async def test_served_document_is_the_built_one(backend: Backend) -> None:
    async with AppClient(backend) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == httpx.Response(200, json=build_openapi()).json()


# -- unauthenticated calls -----------------------------------------------------------------------


def concrete_path(path: str, task_id: uuid.UUID | str) -> str:
    return path.replace("{task_id}", str(task_id))


class AppClient:
    """`async with AppClient(backend) as client`: the app over the module's backend, with a
    context of its own, through httpx on the test's event loop."""

    def __init__(self, backend: Backend) -> None:
        self.context = backend.context()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self.context), raise_app_exceptions=False),
            base_url="http://taskledger.test",
        )

    async def __aenter__(self) -> httpx.AsyncClient:
        return await self.client.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)
        await self.context.watcher.close()


@pytest_asyncio.fixture
async def client(backend: Backend) -> AsyncIterator[httpx.AsyncClient]:
    async with AppClient(backend) as c:
        yield c


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "credentials",
    [
        {},
        {"Authorization": "ApiKey not-a-key-0123456789"},
        {"X-API-Key": "not-a-key-0123456789"},
        {"Authorization": "Bearer not-a-key-0123456789"},
        {"Authorization": "Basic " + ADMIN_KEY},
    ],
    ids=["none", "unknown-authorization", "unknown-x-api-key", "unknown-bearer", "wrong-scheme"],
)
async def test_operations_that_need_a_key_answer_401_problem_without_one(
    backend: Backend, client: httpx.AsyncClient, credentials: dict[str, str]
) -> None:
    document = build_openapi()
    task_id = backend.task_ids[0]
    checked = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if not operation.get("security"):
                continue
            body = {"language": "echo"} if method in ("post", "patch") else None
            response = await client.request(
                method, concrete_path(path, task_id), json=body, headers=credentials
            )
            where = f"{method.upper()} {path} with {credentials}"
            assert response.status_code == 401, f"{where}: {response.status_code}"
            assert response.headers["content-type"] == PROBLEM_JSON, where
            assert response.headers["www-authenticate"] == "ApiKey", where
            problem = response.json()
            assert problem["status"] == 401
            assert problem["type"].endswith("/unauthorized")
            checked += 1
    # Every secured one, /api/workers, /api/ledger/verify, /api/events, /api/keys,
    # /api/tasks/bulk and /api/webhooks included.
    assert checked == 21


@pytest.mark.asyncio
async def test_health_needs_no_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("missing", [uuid.uuid4(), "not-a-uuid"], ids=["unknown", "malformed"])
async def test_unknown_task_is_404_problem(
    client: httpx.AsyncClient, missing: uuid.UUID | str
) -> None:
    for method, path in [
        ("get", "/api/tasks/{task_id}"),
        ("patch", "/api/tasks/{task_id}"),
        ("post", "/api/tasks/{task_id}/retry"),
        ("post", "/api/tasks/{task_id}/cancel"),
        ("get", "/api/tasks/{task_id}/history"),
    ]:
        body = {"description": "x"} if method == "patch" else None
        response = await client.request(
            method, concrete_path(path, missing), json=body, headers=AUTH
        )
        assert response.status_code == 404, (method, path, response.text)
        assert response.headers["content-type"] == PROBLEM_JSON
        assert response.json()["type"].endswith("/task-not-found")


# -- schemathesis --------------------------------------------------------------------------------

# The document as built; test_served_document_is_the_built_one shows the app serves exactly
# this. (Loading it from the app with `schemathesis.pytest.from_fixture` would need the app
# at import time, and that loader does not run under pytest 9.2: it sets `Node._nodeid`.)
schema = schemathesis.openapi.from_dict(build_openapi())
schema.app = IN_PROCESS


@schema.hook
def flatmap_path_parameters(
    ctx: schemathesis.HookContext, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """Half the time a real task (every status, two tenants), else what was generated."""
    if not path_parameters or "task_id" not in path_parameters or not REAL_TASK_IDS:
        return st.just(path_parameters)
    real = st.sampled_from(REAL_TASK_IDS).map(lambda i: {**path_parameters, "task_id": i})
    return st.one_of(st.just(path_parameters), real)


@schema.hook
def flatmap_headers(
    ctx: schemathesis.HookContext, headers: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """A generated If-Match is nearly always a version no task has (412) or not a version at
    all (400); also send none, or a version the seeded tasks have, so PATCH can succeed."""
    if not headers or "If-Match" not in headers:
        return st.just(headers)
    without = {name: value for name, value in headers.items() if name != "If-Match"}
    versions = st.integers(1, 6).map(lambda v: {**without, "If-Match": f'"{v}"'})
    return st.one_of(st.just(headers), st.just(without), versions)


@schema.hook
def map_query(ctx: schemathesis.HookContext, query: dict[str, Any] | None) -> Any:
    """Cut long-polls short (see MAX_WAIT); every other value goes as generated."""
    wait = query.get("wait") if query else None
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > MAX_WAIT:
        return {**query, "wait": MAX_WAIT}  # type: ignore[dict-item]
    return query


CHECKS = [
    # not_a_server_error is implied: a 5xx is not documented, so status_code_conformance
    # fails it; it is asserted explicitly in the test as well.
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,
]


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_document(case: schemathesis.Case, asgi_app: InProcessApp) -> None:
    response = case.call_and_validate(headers=BOTH_AUTH, checks=CHECKS)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"


# -- defects schemathesis has found, pinned down ---------------------------------------------------


@pytest.mark.asyncio
async def test_nul_in_a_text_query_parameter_is_not_a_server_error(
    client: httpx.AsyncClient,
) -> None:
    # Found by the schemathesis run: worker_id is compared as text in PostgreSQL, which
    # refuses NUL, and the DataError became a 500.
    for url in ["/api/audit?worker_id=%00", "/api/audit?worker_id=w%00"]:
        response = await client.get(url, headers=AUTH)
        assert response.status_code < 500, f"{url}: {response.status_code} {response.text}"
        assert response.status_code in (200, 422), url


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/tasks", {"language": "echo", "description": "a\u0000b"}),
        ("post", "/api/tasks", {"language": "echo", "data": {"k": "a\u0000b"}}),
        ("post", "/api/tasks", {"language": "echo", "data": "\u0000"}),
        ("post", "/api/tasks", {"language": "python", "code": "print(1)\u0000"}),
        ("post", "/api/tasks/{task_id}/cancel", {"reason": "a\u0000b"}),
        ("patch", "/api/tasks/{task_id}", {"description": "a\u0000b"}),
        ("patch", "/api/tasks/{task_id}", {"data": {"k": "\u0000"}}),
    ],
    ids=[
        "submit-description",
        "submit-data-member",
        "submit-data-string",
        "submit-code",
        "cancel-reason",
        "patch-description",
        "patch-data",
    ],
)
async def test_what_the_api_accepts_the_views_can_hold(
    api: Api, method: str, path: str, body: dict[str, Any]
) -> None:
    """PostgreSQL text and jsonb cannot hold U+0000. The API must refuse it (422) or the
    views must cope: an accepted event they cannot apply stops them for every tenant
    (the runner retries the same batch forever; a rebuild meets the same event)."""
    created = await api.client.post(
        "/api/tasks", json={"language": "echo"}, headers=api.auth("acme-admin")
    )
    assert created.status_code == 201, created.text
    response = await api.client.request(
        method,
        concrete_path(path, uuid.UUID(created.json()["id"])),
        json=body,
        headers=api.auth("acme-admin"),
    )
    assert response.status_code in (200, 201, 422), response.text
    if response.status_code == 422:
        assert response.headers["content-type"] == PROBLEM_JSON
        return
    await api.catch_up()  # raises if the views cannot apply the event
    listed = await api.client.get("/api/tasks", headers=api.auth("acme-admin"))
    assert listed.status_code == 200
    assert len(listed.json()["items"]) == (2 if path == "/api/tasks" else 1)


@pytest.mark.asyncio
async def test_405_names_every_method_of_the_resource(client: httpx.AsyncClient) -> None:
    """RFC 9110 15.5.6: a 405 MUST carry Allow with the resource's supported methods."""
    document = build_openapi()
    task_id = uuid.uuid4()
    for path, item in document["paths"].items():
        documented = {method.upper() for method in item}
        # DELETE: no resource has it (PUT /api/webhooks/default exists).
        response = await client.request("DELETE", concrete_path(path, task_id), headers=AUTH)
        assert response.status_code == 405, path
        allowed = {m.strip() for m in response.headers["allow"].split(",")} - {"HEAD"}
        assert allowed == documented, f"DELETE {path}: Allow: {response.headers['allow']}"
