"""The harness of the browser tests: one real `taskledger dev` process for them all (on the
test PostgreSQL, in a fresh schema, with the test RabbitMQ), driven by Debian's Chromium
through Playwright's sync API; both are started once, by the first test that needs them.

- `ui`: the running process, its URL and its API keys by name (KEYS), and an API client
  per key to set up state quickly or check the ledger;
- `browser`: Chromium, headless; `page`: a fresh context and page per test at 1280x800,
  `open_page(width, height)` for more (each its own context, so its own session);
- `signed_in(page, key_name)`: signs in through the login form;
- `shot(page, step)`: a full-page screenshot in test-output/ui/<test>-<step>.png.

Every page also fails its test if it raised a JavaScript error or asked for anything from
another origin (the issue: every asset served by the app, no CDN).
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    expect,
    sync_playwright,
)
from psycopg import sql

from tests import services
from tests.processes import free_port, role_env, start_role, stop, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "ui"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Long enough for a task to be dispatched, run in the sandbox and shown (on 2 busy cores),
# short enough that a page that never updates fails in reasonable time.
expect.set_options(timeout=20_000)

# Keys of at least 16 characters (TASKLEDGER_API_KEYS), by the names the tests use.
KEYS = {
    "acme-admin": ("acme", "admin", "ui-test-acme-admin-" + secrets.token_hex(8)),
    "acme-submit": ("acme", "submit", "ui-test-acme-submit-" + secrets.token_hex(8)),
    "acme-read": ("acme", "read", "ui-test-acme-read-" + secrets.token_hex(8)),
    "globex-submit": ("globex", "submit", "ui-test-globex-submit-" + secrets.token_hex(8)),
}
UI_SECRET = "ui-test-session-secret-0123456789abcdef"


@dataclass
class Ui:
    """A running `taskledger dev`: where it serves and how to reach its API."""

    url: str
    log: Path
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def api(self, key_name: str) -> httpx.Client:
        """An API client with the key named `key_name` (one per key, closed at the end)."""
        if key_name not in self.clients:
            self.clients[key_name] = httpx.Client(
                base_url=self.url,
                headers={"Authorization": f"ApiKey {KEYS[key_name][2]}"},
                timeout=70,
            )
        return self.clients[key_name]

    def submit(self, key_name: str = "acme-submit", **body: Any) -> str:
        """Submits a task through the API; its id."""
        response = self.api(key_name).post("/api/tasks", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def task(self, task_id: str, key_name: str = "acme-submit", wait: float = 0) -> Any:
        """The task as the API has it (`wait`: until it is terminal, at most that long)."""
        params = {"wait": wait} if wait else {}
        response = self.api(key_name).get(f"/api/tasks/{task_id}", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def history(self, task_id: str, key_name: str = "acme-submit") -> list[Any]:
        response = self.api(key_name).get(f"/api/tasks/{task_id}/history")
        assert response.status_code == 200, response.text
        return list(response.json()["items"])

    def cancel(self, task_id: str, key_name: str = "acme-submit") -> None:
        """Cancels the task unless it is over already (a test's clean-up)."""
        response = self.api(key_name).post(f"/api/tasks/{task_id}/cancel", json={})
        assert response.status_code in (200, 409), response.text

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def ui_schema(database_url: str) -> Iterator[str]:
    """A schema of the browser tests' own, dropped afterwards."""
    name = f"ui_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def ui(database_url: str, ui_schema: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """`taskledger dev` as a process, with the keys of KEYS and a fixed session secret."""
    problem = services.broker_problem()
    if problem:
        services.unavailable("RabbitMQ", problem)
    tmp = tmp_path_factory.mktemp("ui-dev")
    port = free_port()
    env = role_env(
        tmp,
        database_url=database_url,
        database_schema=ui_schema,
        broker_url=services.BROKER_URL,
        api_keys=",".join(":".join(entry) for entry in KEYS.values()),
        ui_secret=UI_SECRET,
    )
    log = tmp / "dev.log"
    url = f"http://127.0.0.1:{port}"
    # Four slots: a test holds one with a task that sleeps while others run.
    process = start_role(["dev", "--port", str(port), "--concurrency", "4"], env, log)
    running = Ui(url, log)
    try:
        wait_until_serving(process, url, log, timeout=90)
        yield running
    finally:
        for client in running.clients.values():
            client.close()
        stop(process)


# Module scope, not session: Playwright's sync API runs an event loop in this thread for as
# long as it is open, and pytest-asyncio's tests after it would find that loop running.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Debian's Chromium, headless. Its sandbox refuses to start as root, so only there it
    runs with --no-sandbox (Playwright's `chromium_sandbox=False`)."""
    problem = services.chromium_problem()
    if problem:
        services.unavailable("Chromium", problem)
    launched = playwright.chromium.launch(
        executable_path=services.CHROMIUM,
        headless=True,
        chromium_sandbox=os.geteuid() != 0,
    )
    yield launched
    launched.close()


@dataclass
class Watched:
    """What the pages of a test did that fails it: JavaScript errors, foreign requests."""

    origin: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        page.on("request", self._request)
        page.on("dialog", self._dialog)

    def _request(self, request: Any) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in ("data", "blob", "about"):
            return
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.foreign.append(request.url)

    def _dialog(self, dialog: Any) -> None:
        # A native confirm() would be dismissed by default: accept it, as a user who
        # clicked the button means to.
        self.dialogs.append(dialog.message)
        dialog.accept()


OpenPage = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser, ui: Ui) -> Iterator[OpenPage]:
    """`open_page(width=1280, height=800)`: a page in a new context (its own cookies)."""
    watched = Watched(ui.url)
    contexts: list[BrowserContext] = []

    def opening(width: int = DESKTOP["width"], height: int = DESKTOP["height"]) -> Page:
        context = browser.new_context(base_url=ui.url, viewport={"width": width, "height": height})
        context.set_default_timeout(20_000)
        contexts.append(context)
        page = context.new_page()
        watched.watch(page)
        return page

    yield opening
    for context in contexts:
        context.close()
    assert not watched.errors, f"JavaScript errors on the pages: {watched.errors}"
    assert not watched.foreign, (
        f"requests to other origins (assets must be served by the app): {watched.foreign}"
    )


@pytest.fixture
def page(open_page: OpenPage) -> Page:
    """A fresh context and page for one test, 1280x800."""
    return open_page()


SignIn = Callable[[Page, str], Page]


@pytest.fixture
def signed_in(ui: Ui) -> SignIn:
    """`signed_in(page, "acme-submit")`: signs in with that key through the login form and
    waits for the overview."""

    def signing_in(page: Page, key_name: str) -> Page:
        page.goto("/ui/login")
        page.get_by_label("API key", exact=True).fill(KEYS[key_name][2])
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        return page

    return signing_in


class Shot(Protocol):
    def __call__(self, page: Page, step: str, *, full_page: bool = True) -> Path: ...


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Shot:
    """`shot(page, step)`: the whole page as test-output/ui/<test>-<step>.png
    (`full_page=False`: only what the viewport shows)."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")

    def taking(page: Page, step: str, *, full_page: bool = True) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{test}-{step}.png"
        page.screenshot(path=path, full_page=full_page)
        return path

    return taking


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed browser test's report ends with the last lines of the server's log."""
    report = yield
    running = getattr(item, "funcargs", {}).get("ui")
    if report.failed and isinstance(running, Ui):
        report.sections.append(("taskledger dev: the end of its log", running.log_tail()))
    return report
