"""The web dashboard at /ui over HTTP (httpx, in-process), as a user and as an attacker:
sessions, CSRF, roles, tenants, and what each page shows. The browser scenarios are in
the Playwright suite."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

import api.keys as keys_api
from api.context import ApiLimits
from ledger import AttemptError, AttemptResult
from tests.integration.conftest import Api

pytestmark = [pytest.mark.postgres, pytest.mark.asyncio]

TASK = {
    "description": "add numbers",
    "language": "python",
    "code": "print(sum(data))",
    "data": [1, 2, 3],
    "ttl_seconds": 30,
    "max_attempts": 1,
}
COOKIE = "taskledger_ui"


class Browser:
    """A client with its own cookies: one user's browser."""

    def __init__(self, api: Api, client: httpx.AsyncClient) -> None:
        self.api = api
        self.client = client
        self.csrf = ""

    async def sign_in(self, name: str) -> httpx.Response:
        login = await self.client.get("/ui/login")
        assert login.status_code == 200, login.text
        response = await self.client.post(
            "/ui/login", data={"api_key": self.api.keys[name], "csrf_token": csrf_of(login.text)}
        )
        if response.status_code == 303:
            self.csrf = csrf_of((await self.client.get("/ui")).text)
        return response

    async def post(self, url: str, **fields: Any) -> httpx.Response:
        return await self.client.post(url, data={"csrf_token": self.csrf, **fields})


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]*)"', html)
    assert found, "no CSRF field in the page"
    return found.group(1)


@pytest_asyncio.fixture
async def browsers(api: Api) -> AsyncIterator[Callable[..., Browser]]:
    clients: list[httpx.AsyncClient] = []

    def make(base_url: str = "http://taskledger.test") -> Browser:
        client = httpx.AsyncClient(transport=api.client._transport, base_url=base_url)
        clients.append(client)
        return Browser(api, client)

    yield make
    for client in clients:
        await client.aclose()


async def signed_in(browsers: Callable[..., Browser], name: str) -> Browser:
    browser = browsers()
    response = await browser.sign_in(name)
    assert response.status_code == 303, response.text
    return browser


async def submit(api: Api, key: str = "acme-submit", **fields: Any) -> dict[str, Any]:
    response = await api.client.post("/api/tasks", json={**TASK, **fields}, headers=api.auth(key))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def task(api: Api, task_id: str, key: str = "acme-admin") -> dict[str, Any]:
    response = await api.client.get(f"/api/tasks/{task_id}", headers=api.auth(key))
    body: dict[str, Any] = response.json()
    return body


def set_cookie(response: httpx.Response, name: str = COOKIE) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return header
    raise AssertionError(f"no Set-Cookie for {name}")


# -- signing in ----------------------------------------------------------------------------------


async def test_without_a_session_pages_send_the_browser_to_sign_in(api: Api) -> None:
    for path in ("/ui", "/ui/", "/ui/tasks", "/ui/audit", f"/ui/tasks/{uuid.uuid4()}"):
        response = await api.client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/ui/login"


async def test_the_session_cookie_is_signed_flagged_and_never_holds_the_key(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    browser = browsers()
    response = await browser.sign_in("acme-submit")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui"
    header = set_cookie(response)
    flags = [part.strip().lower() for part in header.split(";")]
    assert "httponly" in flags
    assert "samesite=strict" in flags
    assert "path=/ui" in flags
    assert "max-age=28800" in flags
    assert "secure" not in flags  # plain HTTP: a Secure cookie would never come back
    value = browser.client.cookies[COOKIE]
    key = api.keys["acme-submit"]
    assert key not in value
    assert key not in header
    signer = URLSafeTimedSerializer(api.context.ui_secret, salt="taskledger-ui-session")
    fields = signer.loads(value)
    assert set(fields) == {"tenant", "role", "key_id", "csrf", "signed_in_at"}
    assert (fields["tenant"], fields["role"]) == ("acme", "submit")
    assert key not in str(fields)
    overview = await browser.client.get("/ui")
    assert overview.status_code == 200
    assert "<h1>Overview</h1>" in overview.text
    assert "acme" in overview.text
    assert "submit" in overview.text


async def test_over_https_the_cookie_is_secure(api: Api, browsers: Callable[..., Browser]) -> None:
    browser = browsers("https://taskledger.test")
    response = await browser.sign_in("acme-read")
    assert response.status_code == 303
    assert "secure" in [p.strip().lower() for p in set_cookie(response).split(";")]


async def test_a_wrong_key_is_refused(api: Api, browsers: Callable[..., Browser]) -> None:
    browser = browsers()
    login = await browser.client.get("/ui/login")
    response = await browser.client.post(
        "/ui/login", data={"api_key": "not-a-key-at-all-000", "csrf_token": csrf_of(login.text)}
    )
    assert response.status_code == 401
    assert re.search(r'role="alert"[^>]*>[^<]*not valid', response.text)
    assert COOKIE not in browser.client.cookies


async def test_signing_in_needs_the_sign_in_pages_token(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    """Login CSRF: a page elsewhere cannot sign a victim in to the attacker's account."""
    browser = browsers()
    key = api.keys["acme-admin"]
    no_token = await browser.client.post("/ui/login", data={"api_key": key})
    assert no_token.status_code == 403
    assert "CSRF" in no_token.text
    await browser.client.get("/ui/login")  # the cookie, but a token of its own making
    forged = await browser.client.post("/ui/login", data={"api_key": key, "csrf_token": "x"})
    assert forged.status_code == 403
    login = await browser.client.get("/ui/login")
    elsewhere = await browser.client.post(
        "/ui/login",
        data={"api_key": key, "csrf_token": csrf_of(login.text)},
        headers={"Origin": "https://evil.example"},
    )
    assert elsewhere.status_code == 403
    assert COOKIE not in browser.client.cookies


async def test_sign_out_ends_the_session(api: Api, browsers: Callable[..., Browser]) -> None:
    browser = await signed_in(browsers, "acme-read")
    forged = await browser.client.post("/ui/logout")
    assert forged.status_code == 403
    assert (await browser.client.get("/ui")).status_code == 200
    response = await browser.post("/ui/logout")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?notice=signed-out"
    assert (await browser.client.get("/ui")).status_code == 303


# -- forged and altered sessions -----------------------------------------------------------------


async def test_a_cookie_signed_with_another_secret_is_refused(api: Api) -> None:
    forged = URLSafeTimedSerializer(b"another secret", salt="taskledger-ui-session").dumps(
        {"tenant": "acme", "role": "admin", "key_id": "x", "csrf": "c", "signed_in_at": 0}
    )
    response = await api.client.get("/ui", headers={"Cookie": f"{COOKIE}={forged}"})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login"


async def test_a_tampered_cookie_is_refused(api: Api, browsers: Callable[..., Browser]) -> None:
    browser = await signed_in(browsers, "acme-read")
    value = browser.client.cookies[COOKIE]
    payload, _, rest = value.partition(".")
    signer = URLSafeTimedSerializer(api.context.ui_secret, salt="taskledger-ui-session")
    fields = signer.loads(value)
    promoted = signer.dump_payload({**fields, "role": "admin"}).decode()
    assert promoted != payload
    response = await api.client.get("/ui/keys", headers={"Cookie": f"{COOKIE}={promoted}.{rest}"})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login"


async def test_a_session_older_than_eight_hours_is_refused(api: Api) -> None:
    class EightHoursAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 8 * 3600 - 5

    signer = URLSafeTimedSerializer(
        api.context.ui_secret, salt="taskledger-ui-session", signer=EightHoursAgo
    )
    old = signer.dumps(
        {"tenant": "acme", "role": "read", "key_id": "k", "csrf": "c", "signed_in_at": 0}
    )
    response = await api.client.get("/ui", headers={"Cookie": f"{COOKIE}={old}"})
    assert response.status_code == 303


async def test_a_session_whose_key_is_no_longer_valid_ends(
    api: Api, browsers: Callable[..., Browser], monkeypatch: pytest.MonkeyPatch
) -> None:
    browser = await signed_in(browsers, "acme-read")
    seen: list[str] = []

    def revoked(key_id: str) -> bool:
        seen.append(key_id)
        return False

    monkeypatch.setattr(api.context.authenticator, "session_valid", revoked)
    response = await browser.client.get("/ui/tasks")
    assert response.status_code == 303
    assert seen
    assert seen[0].startswith("cfg-")


# -- CSRF and roles ------------------------------------------------------------------------------


async def test_forged_posts_without_or_with_a_wrong_token_change_nothing(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api)
    browser = await signed_in(browsers, "acme-submit")
    url = f"/ui/tasks/{created['id']}"
    before = await task(api, created["id"])
    for fields in ({}, {"csrf_token": ""}, {"csrf_token": "a" * 43}):
        for action, extra in (
            ("cancel", {}),
            ("retry", {}),
            ("edit", {"description": "forged", "version": str(before["version"])}),
        ):
            response = await browser.client.post(f"{url}/{action}", data={**fields, **extra})
            assert response.status_code == 403, (action, fields)
            assert "CSRF" in response.text
    # Another session's token is no better.
    other = await signed_in(browsers, "acme-admin")
    stolen = await browser.client.post(f"{url}/cancel", data={"csrf_token": other.csrf})
    assert stolen.status_code == 403
    forged_submit = await browser.client.post("/ui/submit", data={**TASK, "code": "print(1)"})
    assert forged_submit.status_code == 403
    forged_bulk = await browser.client.post(
        "/ui/tasks/bulk", data={"action": "cancel", "confirmed": "yes"}
    )
    assert forged_bulk.status_code == 403
    after = await task(api, created["id"])
    assert after == before
    await api.catch_up()
    listed = await api.client.get("/api/tasks", headers=api.auth("acme-admin"))
    assert [t["id"] for t in listed.json()["items"]] == [created["id"]]


async def test_a_read_session_sees_no_action_and_may_take_none(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api)
    browser = await signed_in(browsers, "acme-read")
    page = await browser.client.get(f"/ui/tasks/{created['id']}")
    assert page.status_code == 200
    for button in (">Retry<", ">Cancel task<", ">Save<"):
        assert button not in page.text
    assert ">Submit<" not in page.text  # not in the nav either
    assert ">Keys<" not in page.text
    listed = await browser.client.get("/ui/tasks")
    assert "Retry all matching" not in listed.text
    for url in (f"/ui/tasks/{created['id']}/retry", f"/ui/tasks/{created['id']}/cancel"):
        response = await browser.post(url)
        assert response.status_code == 403
    bulk = await browser.post("/ui/tasks/bulk", action="cancel", confirmed="yes")
    assert bulk.status_code == 403
    assert (await browser.client.get("/ui/submit")).status_code == 403
    assert (await browser.client.get("/ui/keys")).status_code == 403
    assert (await task(api, created["id"]))["status"] == "Pending"


async def test_another_tenants_task_is_not_found_and_not_acted_on(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api, description="acme secret")
    await api.catch_up()
    globex = await signed_in(browsers, "globex-submit")
    for url in (f"/ui/tasks/{created['id']}", f"/ui/tasks/{created['id']}/status?version=0"):
        response = await globex.client.get(url)
        assert response.status_code == 404
        assert "<h1>Not found</h1>" in response.text
        assert "acme secret" not in response.text
    refused = await globex.post(f"/ui/tasks/{created['id']}/cancel")
    assert refused.status_code == 404
    confirm = await globex.post("/ui/tasks/bulk", action="cancel", q="acme secret")
    assert confirm.status_code == 200
    assert "0 tasks match" in confirm.text
    result = await globex.post("/ui/tasks/bulk", action="cancel", confirmed="yes", limit="1")
    assert re.search(r"Bulk cancel [\w-]+: 0 done, 0 refused", result.text)
    listed = await globex.client.get("/ui/tasks")
    assert created["id"] not in listed.text
    assert (await task(api, created["id"]))["status"] == "Pending"


# -- pages ---------------------------------------------------------------------------------------


async def test_every_ui_answer_carries_the_security_headers(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    browser = await signed_in(browsers, "acme-admin")
    for url in ("/ui/login", "/ui", "/ui/tasks", "/ui/nowhere", "/ui/static/ui.css"):
        response = await browser.client.get(url)
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "img-src 'self' data:" in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "same-origin"
        if not url.startswith("/ui/static/"):
            assert response.headers["cache-control"] == "no-store"
            assert "<script>" not in response.text  # no inline script: the CSP allows none
            assert " style=" not in response.text
    missing = await browser.client.get("/ui/nowhere")
    assert missing.status_code == 404
    assert "<h1>Not found</h1>" in missing.text
    assert (await browser.client.get("/ui/static/ui.js")).status_code == 200
    css = await browser.client.get("/ui/static/pygments.css")
    assert css.status_code == 200
    assert ".highlight" in css.text


async def test_the_overview_shows_counts_chart_queue_and_lag(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api)
    await asyncio.to_thread(api.context.ledger.start_attempt, uuid.UUID(created["id"]), 1, "w-1")
    await asyncio.to_thread(
        api.context.ledger.complete_attempt,
        uuid.UUID(created["id"]),
        1,
        AttemptResult(stdout="6\n"),
    )
    await submit(api)
    await api.catch_up()
    browser = await signed_in(browsers, "acme-read")
    page = await browser.client.get("/ui")
    assert page.status_code == 200
    text = page.text
    assert "Queue depth" in text
    assert "Run time" in text
    assert "View lag" in text
    assert re.search(r"Completed</span> <strong>1</strong>", text)
    assert re.search(r"Pending</span> <strong>1</strong>", text)
    assert '<svg class="chart"' in text
    assert 'role="img"' in text
    assert 'class="bar bar-completed"' in text
    assert "The chart as a table" in text
    assert "task_status" in text  # a view and its lag


async def test_submit_through_the_form_then_the_task_page(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    browser = await signed_in(browsers, "acme-submit")
    form = await browser.client.get("/ui/submit")
    assert form.status_code == 200
    fields = {
        "description": "sum <b>it</b>",
        "language": "python",
        "code": "import json, sys\nprint(sum(json.load(sys.stdin)))",
        "data": "[1, 2, 3]",
        "ttl_seconds": "30",
        "max_attempts": "2",
        "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', form.text)[1],  # type: ignore[index]
    }
    response = await browser.post("/ui/submit", **fields)
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert re.fullmatch(r"/ui/tasks/[0-9a-f-]{36}", location)
    again = await browser.post("/ui/submit", **fields)  # the same form posted twice
    assert again.headers["location"] == location
    page = await browser.client.get(location)
    assert page.status_code == 200
    text = page.text
    assert "<h1>Task: sum &lt;b&gt;it&lt;/b&gt;</h1>" in text  # escaped, never markup
    assert re.search(r'id="task-status" data-status="Pending"', text)
    for heading in ("Timeline", "History", "Code", "Data", "Output"):
        assert f">{heading}</h2>" in text
    assert re.search(r'<svg class="timeline"[^>]*role="img" aria-label="Timeline', text)
    assert 'class="highlight"' in text
    assert '<span class="kn">import</span>' in text
    assert "scheduled (submitted) by key cfg-" in text
    assert ">Retry<" in text
    assert ">Cancel task<" in text
    assert ">Save<" in text


async def test_the_submit_form_says_what_is_wrong(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    browser = await signed_in(browsers, "acme-submit")
    response = await browser.post(
        "/ui/submit",
        description="x",
        language="python",
        code="print(1)",
        data="[1,",
        ttl_seconds="0",
        max_attempts="many",
    )
    assert response.status_code == 422
    assert "data: is not JSON" in response.text
    assert "ttl_seconds" in response.text
    assert "max_attempts" in response.text
    assert 'value="x"' in response.text  # what was typed stays


async def test_retry_cancel_and_edit_from_the_task_page(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api)
    browser = await signed_in(browsers, "acme-submit")
    url = f"/ui/tasks/{created['id']}"
    refused = await browser.post(f"{url}/retry")
    assert refused.status_code == 409  # a Pending task is not retried: the ledger's reason
    assert "Pending" in refused.text
    cancelled = await browser.post(f"{url}/cancel", reason="not needed")
    assert cancelled.status_code == 303
    assert cancelled.headers["location"] == f"{url}?notice=cancelled"
    assert (await task(api, created["id"]))["status"] == "Cancelled"
    page = await browser.client.get(cancelled.headers["location"])
    assert "The task is cancelled." in page.text
    assert "cancelled by key cfg-" in page.text
    assert "not needed" in page.text
    retried = await browser.post(f"{url}/retry")
    assert retried.status_code == 303
    now = await task(api, created["id"])
    assert now["status"] == "Pending"
    assert now["attempt"] == 2
    stale = await browser.post(f"{url}/edit", description="renamed", version="1")
    assert stale.status_code == 412
    assert (await task(api, created["id"]))["description"] == TASK["description"]
    saved = await browser.post(f"{url}/edit", description="renamed", version=str(now["version"]))
    assert saved.status_code == 303
    assert (await task(api, created["id"]))["description"] == "renamed"


async def test_the_task_as_of_an_event_and_its_timeline(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api)
    task_id = uuid.UUID(created["id"])
    ledger = api.context.ledger
    clock: Any = ledger.clock
    clock.advance(1)
    await asyncio.to_thread(ledger.start_attempt, task_id, 1, "worker-7")
    clock.advance(2)
    await asyncio.to_thread(
        ledger.fail_attempt,
        task_id,
        1,
        AttemptError("program_error", "ZeroDivisionError"),
        retryable=False,
    )
    browser = await signed_in(browsers, "acme-read")
    page = await browser.client.get(f"/ui/tasks/{task_id}")
    text = page.text
    assert 'data-status="Failed"' in text
    assert "started by worker worker-7" in text
    assert "failed on worker worker-7: program_error: ZeroDivisionError" in text
    assert 'class="seg seg-queued"' in text
    assert 'class="seg seg-running"' in text
    assert 'label for="as_of_version">As of<' in text
    past = await browser.client.get(f"/ui/tasks/{task_id}?as_of_version=3")
    assert past.status_code == 200
    assert re.search(r'role="status" class="banner">As of event 3', past.text)
    assert 'data-status="InProgress"' in past.text
    assert ">Retry<" not in past.text  # the past is not acted on
    beyond = await browser.client.get(f"/ui/tasks/{task_id}?as_of_version=99")
    assert beyond.status_code == 422


async def test_the_status_fragment_answers_when_the_task_changes(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api)
    browser = await signed_in(browsers, "acme-read")
    url = f"/ui/tasks/{created['id']}/status?version={created['version']}"

    async def cancel_soon() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(api.context.ledger.cancel, uuid.UUID(created["id"]), by="someone")

    started = time.monotonic()
    response, _ = await asyncio.gather(
        browser.client.get(url, headers={"X-Requested-With": "taskledger-ui"}), cancel_soon()
    )
    assert time.monotonic() - started < 10
    assert response.status_code == 200
    assert 'id="task-status" data-status="Cancelled"' in response.text


# -- the list, its filters and bulk actions ------------------------------------------------------


async def test_the_list_filters_pages_and_refreshes(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    clock: Any = api.context.ledger.clock
    ids = []
    for n in range(3):
        ids.append((await submit(api, description=f"batch {n}"))["id"])
        clock.advance(1)  # newest first: by creation time
    other = await submit(api, description="unrelated", language="echo", code=None)
    await api.catch_up()
    api.context.limits = ApiLimits(page_size=2)
    browser = await signed_in(browsers, "acme-read")
    first = await browser.client.get(
        "/ui/tasks", params={"q": "BATCH", "status": "", "language": ""}
    )
    assert first.status_code == 200
    rows = re.findall(r'<tr data-task-id="([^"]+)">', first.text)
    assert rows == [ids[2], ids[1]]
    assert 'data-status="Pending"' in first.text
    following = re.search(r'href="/ui/tasks\?([^"]+)" rel="next">Next page', first.text)
    assert following
    second = await browser.client.get("/ui/tasks?" + following[1].replace("&amp;", "&"))
    assert re.findall(r'<tr data-task-id="([^"]+)">', second.text) == [ids[0]]
    echo = await browser.client.get("/ui/tasks", params={"language": "echo"})
    assert re.findall(r'<tr data-task-id="([^"]+)">', echo.text) == [other["id"]]
    refresh = re.search(r'data-refresh="([^"]+)"', first.text)
    assert refresh
    fragment = await browser.client.get(refresh[1].replace("&amp;", "&"))
    assert re.findall(r'<tr data-task-id="([^"]+)">', fragment.text) == [ids[2], ids[1]]


async def test_a_bad_filter_shows_the_apis_message(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    browser = await signed_in(browsers, "acme-read")
    from_api = await api.client.get(
        "/api/tasks", params={"created_after": "yesterday"}, headers=api.auth("acme-read")
    )
    assert from_api.status_code == 422
    page = await browser.client.get("/ui/tasks", params={"created_after": "yesterday"})
    assert page.status_code == 422
    assert from_api.json()["detail"] in page.text
    assert 'role="alert"' in page.text
    audit_api = await api.client.get(
        "/api/audit", params={"task_id": "nope"}, headers=api.auth("acme-read")
    )
    audit_page = await browser.client.get("/ui/audit", params={"task_id": "nope"})
    assert audit_page.status_code == 422
    assert audit_api.json()["detail"].replace("'", "&#39;") in audit_page.text
    # A time without an offset is taken as UTC by the pages (a browser's field has none).
    naive = await browser.client.get("/ui/tasks", params={"created_after": "2000-01-01T00:00"})
    assert naive.status_code == 200


async def test_bulk_cancel_then_retry_of_the_filtered_set(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    ids = [(await submit(api, description=f"nightly {n}"))["id"] for n in range(2)]
    keep = await submit(api, description="keep me")
    done = await submit(api, description="nightly done")
    await asyncio.to_thread(api.context.ledger.start_attempt, uuid.UUID(done["id"]), 1, "w")
    await asyncio.to_thread(
        api.context.ledger.complete_attempt, uuid.UUID(done["id"]), 1, AttemptResult()
    )
    await api.catch_up()
    browser = await signed_in(browsers, "acme-submit")
    listed = await browser.client.get("/ui/tasks", params={"q": "nightly"})
    assert "Retry all matching…" in listed.text
    assert "Cancel all matching…" in listed.text
    confirm = await browser.post("/ui/tasks/bulk", action="cancel", q="nightly", status="")
    assert confirm.status_code == 200
    assert "3 tasks match" in confirm.text
    assert ">Confirm<" in confirm.text
    assert (await task(api, ids[0]))["status"] == "Pending"  # nothing yet
    # One more task matches than were confirmed: refused, nothing done.
    await submit(api, description="nightly late")
    await api.catch_up()
    stale = await browser.post(
        "/ui/tasks/bulk", action="cancel", q="nightly", confirmed="yes", limit="3"
    )
    assert stale.status_code == 422
    assert "more than 3 tasks match" in stale.text
    assert (await task(api, ids[0]))["status"] == "Pending"
    result = await browser.post(
        "/ui/tasks/bulk", action="cancel", q="nightly", confirmed="yes", limit="4"
    )
    found = re.search(r"Bulk cancel ([\w-]+): 3 done, 1 refused", result.text)
    assert found, result.text
    assert "task is already Completed; it cannot be cancelled" in result.text
    for task_id in ids:
        history = await asyncio.to_thread(api.context.ledger.history, uuid.UUID(task_id))
        assert history[-1].type == "TaskCancelled"
        assert history[-1].data["bulk_id"] == found.group(1)
    assert [(await task(api, i))["status"] for i in ids] == ["Cancelled", "Cancelled"]
    assert (await task(api, keep["id"]))["status"] == "Pending"
    await api.catch_up()
    retried = await browser.post(
        "/ui/tasks/bulk", action="retry", status="Cancelled", confirmed="yes", limit="3"
    )
    assert re.search(r"Bulk retry [\w-]+: 3 done, 0 refused", retried.text)
    assert [(await task(api, i))["status"] for i in ids] == ["Pending", "Pending"]


# -- audit and keys ------------------------------------------------------------------------------


async def test_the_audit_page_and_its_exports(api: Api, browsers: Callable[..., Browser]) -> None:
    created = await submit(api)
    await submit(api, key="globex-submit")
    await api.catch_up()
    browser = await signed_in(browsers, "acme-read")
    page = await browser.client.get("/ui/audit", params={"task_id": created["id"], "type": ""})
    assert page.status_code == 200
    assert page.text.count(f'href="/ui/tasks/{created["id"]}"') == 2  # submitted, scheduled
    for label in ("Event type", "Task id", "Worker", "Since", "Until"):
        assert f">{label}</label>" in page.text
    link = re.search(r'href="(/ui/audit/export\?[^"]*format=csv)">Export CSV', page.text)
    assert link
    csv = await browser.client.get(link[1].replace("&amp;", "&"))
    assert csv.status_code == 200
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.count(created["id"]) == 2
    everything = await browser.client.get("/ui/audit/export", params={"format": "ndjson"})
    lines = everything.text.splitlines()
    assert len(lines) == 2  # acme's events only, not globex's
    assert all(created["id"] in line for line in lines)


async def test_keys_are_issued_once_shown_and_revoked(
    api: Api, browsers: Callable[..., Browser], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No view runners here (the test catches the views up): the pages' wait for the keys
    # view would only time out.
    monkeypatch.setattr(keys_api, "SETTLE_SECONDS", 0.05)
    admin = await signed_in(browsers, "acme-admin")
    page = await admin.client.get("/ui/keys")
    assert page.status_code == 200
    assert re.search(r'data-key-id="cfg-\w+">.*?configured in settings', page.text, re.S)
    issued = await admin.post("/ui/keys", tenant="acme", role="read", label="dashboard")
    assert issued.status_code == 200
    token = re.search(r'<output id="new-key" class="secret">([^<]+)</output>', issued.text)
    assert token
    assert token[1].startswith("tlk_")
    key_id = token[1][4:16]
    await api.catch_up()
    listed = await admin.client.get("/ui/keys")
    assert token[1] not in listed.text  # shown once
    assert key_id in listed.text
    assert ">Revoke<" in listed.text
    user = browsers()
    api.keys["issued"] = token[1]
    assert (await user.sign_in("issued")).status_code == 303
    revoked = await admin.post(f"/ui/keys/{key_id}/revoke")
    assert revoked.status_code == 303
    await api.catch_up()
    after = await admin.client.get("/ui/keys")
    assert re.search(rf'data-key-id="{key_id}">.*?revoked', after.text, re.S)
    bad = await admin.post("/ui/keys", tenant="no spaces", role="read", label="")
    assert bad.status_code == 422


async def test_the_task_page_shows_its_webhook_and_the_last_delivery(
    api: Api, browsers: Callable[..., Browser]
) -> None:
    created = await submit(api, callback_url="https://hooks.example.com/done")
    browser = await signed_in(browsers, "acme-read")
    before = await browser.client.get(f"/ui/tasks/{created['id']}")
    assert "<code>https://hooks.example.com/done</code>; nothing sent yet" in before.text
    await asyncio.to_thread(
        api.context.ledger.record_webhook_attempt,
        uuid.UUID(created["id"]),
        delivery_id=uuid.uuid4(),
        trigger_version=2,
        trigger_type="AttemptScheduled",
        url="https://hooks.example.com/done",
        delivery_attempt=1,
        outcome="failed",
        status_code=503,
        error="the receiver answered 503",
    )
    after = await browser.client.get(f"/ui/tasks/{created['id']}")
    assert "<strong>failed</strong> (HTTP 503): the receiver answered 503" in after.text
    assert "WebhookAttempted" in after.text  # in the history too
