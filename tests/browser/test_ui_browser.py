"""The /ui pages in a real browser (issue 16), found by the names the pages promise the
tests: roles, accessible names, labels, `#task-status[data-status]`, `tr[data-task-id]`.

Each scenario acts through the browser; the API (tests/browser/conftest.py `Ui`) only sets
up tasks quickly and checks what the ledger recorded. Nothing sleeps: every wait is an
`expect(...)` on the page (or a poll of the API) for the condition it names. Tasks that
should take a while take it in their own code (`time.sleep` in the sandbox).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Locator, Page, Response, expect

from tests.browser.conftest import PHONE, ROOT, OpenPage, Shot, SignIn, Ui
from tests.processes import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]

STATUS = "#task-status"
TASK_URL = re.compile(r"/ui/tasks/([0-9a-f-]{36})$")
WAITING = re.compile(r"^(Pending|InProgress)$")
# The README's picture of the overview: written when missing, or rewritten with
# TASKLEDGER_UPDATE_DOCS_IMAGES=1 (not on every run: each would change the file).
DOCS_OVERVIEW = ROOT / "docs" / "images" / "ui-overview.png"

FAIL = "import sys\nsys.exit(1)\n"
# Fails after 3 s: a retried run stays Pending/InProgress long enough to be seen so.
FAIL_SLOWLY = "import sys, time\ntime.sleep(3)\nsys.exit(1)\n"
# Runs until cancelled (its ttl is 60 s).
SLEEP = "import time\ntime.sleep(30)\n"


def unique(word: str) -> str:
    return f"{word}-{secrets.token_hex(4)}"


def section(page: Page, heading: str) -> Locator:
    """What the page shows under a section heading: the heading's parent element."""
    return page.get_by_role("heading", name=heading, exact=True).locator("xpath=..")


def choose(field: Locator, value: str) -> None:
    """Picks `value` in a select (by its value or label), or types it into a text field."""
    if field.evaluate("element => element.tagName") == "SELECT":
        field.select_option(value)
    else:
        field.fill(value)


def posted_to(path: str) -> Callable[[Response], bool]:
    """Whether a response answers a POST to `path`."""
    return lambda response: (
        urlsplit(response.url).path == path and response.request.method == "POST"
    )


@dataclass(frozen=True)
class Seeded:
    """Tasks submitted when the module starts, so that they are done by the time the
    scenarios that need them run."""

    failing_slowly: str  # Failed after 3 s (max attempts 1): the retry scenario's
    failed: str  # Failed: what a read key and another tenant look at
    word: str  # in the descriptions of `bulk` and `bulk_completed` only
    bulk: tuple[str, ...]  # Failed, to be retried in bulk
    bulk_completed: str  # Completed: the Status filter leaves it out


@pytest.fixture(scope="module", autouse=True)
def seeded(ui: Ui) -> Seeded:
    def python(description: str, code: str) -> str:
        return ui.submit(
            description=description, language="python", code=code, ttl_seconds=60, max_attempts=1
        )

    word = unique("bulkword")
    return Seeded(
        failing_slowly=python(unique("fails slowly"), FAIL_SLOWLY),
        failed=python(unique("fails"), FAIL),
        word=word,
        bulk=tuple(python(f"bulk {word} {n}", FAIL) for n in range(3)),
        bulk_completed=ui.submit(description=f"bulk {word} done", language="echo", data=1),
    )


def settled(ui: Ui, task_id: str, status: str) -> None:
    """The task ended with `status` (waits for it to end, at most 60 s)."""
    task = ui.task(task_id, wait=60)
    assert task["status"] == status, task


# -- scenarios ---------------------------------------------------------------------------------


def test_sign_in_with_a_submit_key_shows_the_overview_and_the_tenant(
    page: Page, signed_in: SignIn, shot: Shot
) -> None:
    response = page.goto("/ui")
    assert response is not None
    redirect = response.request.redirected_from  # no session: 303 to the login page
    answered = redirect.response() if redirect is not None else None
    assert answered is not None
    assert answered.status == 303
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    shot(page, "login")

    signed_in(page, "acme-submit")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    header = page.get_by_role("banner")
    expect(header).to_contain_text("acme")
    expect(header).to_contain_text("submit")
    shot(page, "overview")

    cookies = {cookie["name"]: cookie for cookie in page.context.cookies()}
    session = cookies["taskledger_ui"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["secure"] is False  # plain HTTP here
    assert "ui-test-acme-submit" not in session["value"]  # the key is never in it


def test_submit_through_the_form_and_watch_it_complete_without_reloading(
    ui: Ui, page: Page, signed_in: SignIn, shot: Shot
) -> None:
    signed_in(page, "acme-submit")
    page.get_by_role("navigation").get_by_role("link", name="Submit", exact=True).click()
    expect(page).to_have_url(re.compile(r"/ui/submit$"))
    description = unique("submitted in the browser")
    page.get_by_label("Description", exact=True).fill(description)
    choose(page.get_by_label("Language", exact=True), "python")
    # Takes 3 s, so the page shows it waiting or running first; prints what the code
    # does not contain, so finding it means the output is shown.
    page.get_by_label("Code", exact=True).fill(
        'import time\ntime.sleep(3)\nprint("printed:", data["n"] * 7)\n'
    )
    page.get_by_label("Data (JSON)", exact=True).fill('{"n": 6}')
    page.get_by_label("TTL (seconds)", exact=True).fill("60")
    page.get_by_label("Max attempts", exact=True).fill("1")
    shot(page, "form")
    page.get_by_role("button", name="Submit task").click()

    expect(page).to_have_url(TASK_URL)
    match = TASK_URL.search(page.url)
    assert match is not None
    task_id = match.group(1)
    expect(page.get_by_role("heading", name=description)).to_be_visible()
    status = page.locator(STATUS)
    expect(status).to_have_attribute("data-status", WAITING)
    shot(page, "waiting")

    page.evaluate("() => { window.__marker = 1 }")
    expect(status).to_have_attribute("data-status", "Completed")
    expect(status).to_contain_text("Completed")  # as text, not only as a colour
    assert page.evaluate("() => window.__marker") == 1, "the page was reloaded"
    shot(page, "completed")
    # Only the status is promised to update in place: the output is checked on the page
    # loaded afresh.
    page.reload()
    expect(page.locator("main")).to_contain_text("printed: 42")
    shot(page, "output")
    assert ui.task(task_id)["status"] == "Completed"


def test_the_timeline_and_the_task_as_of_its_first_event(
    ui: Ui, page: Page, signed_in: SignIn, shot: Shot
) -> None:
    task_id = ui.submit(
        description=unique("timeline"), language="python", code='print("hi")', ttl_seconds=60
    )
    settled(ui, task_id, "Completed")
    signed_in(page, "acme-submit")
    page.goto(f"/ui/tasks/{task_id}")

    timeline = page.get_by_role("img", name=re.compile(r"^Timeline"))
    expect(timeline).to_be_visible()
    expect(timeline.locator("rect").first).to_be_attached()  # a drawn segment
    # …and the text list of the attempts' steps names the first one.
    expect(section(page, "Timeline")).to_contain_text(re.compile(r"attempt\s*#?\s*1", re.I))
    shot(page, "timeline")

    page.get_by_label("As of", exact=True).select_option("1")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"[?&]as_of_version=1(&|$)"))
    expect(page.get_by_role("status").filter(has_text="As of event 1")).to_be_visible()
    expect(page.locator(STATUS)).to_have_attribute("data-status", "Pending")
    shot(page, "as-of-1")


def test_retry_a_failed_task(
    ui: Ui, seeded: Seeded, page: Page, signed_in: SignIn, shot: Shot
) -> None:
    task_id = seeded.failing_slowly
    settled(ui, task_id, "Failed")
    signed_in(page, "acme-submit")
    page.goto(f"/ui/tasks/{task_id}")
    status = page.locator(STATUS)
    expect(status).to_have_attribute("data-status", "Failed")
    scheduled = section(page, "History").get_by_text("AttemptScheduled")
    expect(scheduled).to_have_count(1)
    shot(page, "failed")

    page.get_by_role("button", name="Retry", exact=True).click()
    expect(scheduled).to_have_count(2)
    expect(status).to_have_attribute("data-status", WAITING)
    shot(page, "retried")
    types = [event["type"] for event in ui.history(task_id)]
    assert types.count("AttemptScheduled") == 2, types


def test_cancel_a_running_task(ui: Ui, page: Page, signed_in: SignIn, shot: Shot) -> None:
    task_id = ui.submit(
        description=unique("runs until cancelled"),
        language="python",
        code=SLEEP,
        ttl_seconds=60,
        max_attempts=1,
    )
    try:
        signed_in(page, "acme-submit")
        page.goto(f"/ui/tasks/{task_id}")
        status = page.locator(STATUS)
        expect(status).to_have_attribute("data-status", "InProgress")
        shot(page, "running")
        page.get_by_role("button", name="Cancel task").click()
        expect(status).to_have_attribute("data-status", "Cancelled")
        shot(page, "cancelled")
        assert ui.task(task_id)["status"] == "Cancelled"
    finally:
        ui.cancel(task_id)


def test_filter_then_bulk_retry(
    ui: Ui, seeded: Seeded, page: Page, signed_in: SignIn, shot: Shot
) -> None:
    for task_id in seeded.bulk:
        settled(ui, task_id, "Failed")
    settled(ui, seeded.bulk_completed, "Completed")

    def listed() -> set[str]:  # the list view follows the log within milliseconds
        items = ui.api("acme-submit").get("/api/tasks", params={"status": "Failed"}).json()
        return {item["id"] for item in items["items"] if seeded.word in item["description"]}

    wait_until(lambda: listed() == set(seeded.bulk), 30, "the failed tasks in the list view")

    signed_in(page, "acme-submit")
    page.get_by_role("navigation").get_by_role("link", name="Tasks", exact=True).click()
    choose(page.get_by_label("Status", exact=True), "Failed")
    page.get_by_label("Description contains", exact=True).fill(seeded.word)
    page.get_by_role("button", name="Filter", exact=True).click()
    rows = page.locator("table tr[data-task-id]")
    expect(rows).to_have_count(3)
    shown = rows.evaluate_all("rows => rows.map(row => row.dataset.taskId)")
    assert sorted(shown) == sorted(seeded.bulk)
    expect(rows.locator("[data-status='Failed']")).to_have_count(3)
    shot(page, "filtered")

    page.get_by_role("button", name=re.compile(r"^Retry all matching")).click()
    expect(page.get_by_text("3 tasks match")).to_be_visible()
    shot(page, "confirm")
    page.get_by_role("button", name="Confirm", exact=True).click()
    outcome = page.get_by_text(re.compile(r"Bulk retry \S+: 3 done, 0 refused"))
    expect(outcome).to_be_visible()
    shot(page, "done")
    found = re.search(r"Bulk retry (\S+): 3 done", outcome.inner_text())
    assert found is not None
    bulk_id = found.group(1)

    for n, task_id in enumerate(seeded.bulk):
        scheduled = [e for e in ui.history(task_id) if e["type"] == "AttemptScheduled"]
        assert len(scheduled) == 2, scheduled
        assert scheduled[-1]["data"].get("bulk_id") == bulk_id, scheduled[-1]
        page.goto(f"/ui/tasks/{task_id}")
        expect(section(page, "History")).to_contain_text(bulk_id)
        if n == 0:
            shot(page, "task-history")


def test_sign_out_ends_the_session(page: Page, signed_in: SignIn, shot: Shot) -> None:
    signed_in(page, "acme-submit")
    page.get_by_role("banner").get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key", exact=True)).to_be_visible()
    shot(page, "signed-out")
    page.goto("/ui")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()


def test_a_wrong_key_is_refused(page: Page, shot: Shot) -> None:
    page.goto("/ui/login")
    page.get_by_label("API key", exact=True).fill(unique("not-a-valid-key-at-all"))
    with page.expect_response(posted_to("/ui/login")) as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    expect(page.get_by_label("API key", exact=True)).to_be_visible()
    shot(page, "refused")


def test_a_read_key_sees_no_actions(
    ui: Ui, seeded: Seeded, page: Page, signed_in: SignIn, shot: Shot
) -> None:
    running = ui.submit(
        description=unique("read key looks"), language="python", code=SLEEP, ttl_seconds=60
    )
    try:
        signed_in(page, "acme-read")
        header = page.get_by_role("banner")
        expect(header).to_contain_text("read")
        nav = page.get_by_role("navigation")
        expect(nav.get_by_role("link", name="Tasks", exact=True)).to_be_visible()
        expect(nav.get_by_role("link", name="Submit", exact=True)).to_have_count(0)
        expect(nav.get_by_role("link", name="Keys", exact=True)).to_have_count(0)

        settled(ui, seeded.failed, "Failed")
        page.goto(f"/ui/tasks/{seeded.failed}")  # a submit key would see Retry here
        expect(page.locator(STATUS)).to_have_attribute("data-status", "Failed")
        expect(page.get_by_role("heading", name="History", exact=True)).to_be_visible()
        for action in ("Retry", "Cancel task", "Save", "Submit task"):
            expect(page.get_by_role("button", name=action, exact=True)).to_have_count(0)
        shot(page, "failed")

        page.goto(f"/ui/tasks/{running}")  # … and Cancel task here
        expect(page.locator(STATUS)).to_have_attribute("data-status", "InProgress")
        for action in ("Retry", "Cancel task", "Save", "Submit task"):
            expect(page.get_by_role("button", name=action, exact=True)).to_have_count(0)
        shot(page, "running")

        page.goto("/ui/tasks")
        expect(page.locator("table tr[data-task-id]").first).to_be_visible()
        matching = page.get_by_role("button", name=re.compile(r"all matching"))
        expect(matching).to_have_count(0)
        shot(page, "tasks")
    finally:
        ui.cancel(running)


def test_another_tenants_task_is_not_found(
    seeded: Seeded, page: Page, signed_in: SignIn, shot: Shot
) -> None:
    signed_in(page, "globex-submit")
    expect(page.get_by_role("banner")).to_contain_text("globex")
    response = page.goto(f"/ui/tasks/{seeded.failed}")  # acme's
    assert response is not None
    assert response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.locator("main")).not_to_contain_text("fails-")  # nothing of the task
    shot(page, "other-tenant")
    response = page.goto("/ui/tasks/00000000-0000-4000-8000-000000000000")
    assert response is not None
    assert response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()


def test_a_forged_form_post_without_the_csrf_token_is_refused(
    ui: Ui, page: Page, signed_in: SignIn
) -> None:
    task_id = ui.submit(
        description=unique("csrf target"), language="python", code=SLEEP, ttl_seconds=60
    )
    try:
        signed_in(page, "acme-submit")
        page.goto(f"/ui/tasks/{task_id}")
        status = page.locator(STATUS)
        expect(status).to_have_attribute("data-status", "InProgress")

        # page.request shares the context's cookies: the session is sent, the token is not.
        cancel = f"{ui.url}/ui/tasks/{task_id}/cancel"
        forged = page.request.post(cancel, form={"reason": "forged"}, max_redirects=0)
        assert forged.status == 403, forged.text()
        assert "CSRF" in forged.text()
        assert ui.task(task_id)["status"] == "InProgress"
        assert not [e for e in ui.history(task_id) if e["type"] == "TaskCancelled"]
        page.reload()
        expect(status).to_have_attribute("data-status", "InProgress")

        # The same post with the session's token is taken: the 403 was the missing token.
        token = page.locator("input[name=csrf_token]").first.input_value()
        genuine = page.request.post(cancel, form={"csrf_token": token}, max_redirects=0)
        assert genuine.status in (200, 303), genuine.text()
        assert ui.task(task_id)["status"] == "Cancelled"
    finally:
        ui.cancel(task_id)


def test_the_tasks_page_fits_a_phone(open_page: OpenPage, signed_in: SignIn, shot: Shot) -> None:
    page = open_page(**PHONE)
    signed_in(page, "acme-submit")
    shot(page, "overview")
    page.goto("/ui/tasks")
    expect(page.locator("table tr[data-task-id]").first).to_be_attached()
    widths = page.evaluate(
        "() => ({body: document.body.scrollWidth,"
        " page: document.documentElement.scrollWidth,"
        " viewport: document.documentElement.clientWidth})"
    )
    # Tables may scroll inside their own container; the page itself must not.
    assert widths["body"] <= widths["viewport"], widths
    assert widths["page"] <= widths["viewport"], widths
    shot(page, "tasks")


def test_the_overview_with_tasks_pictured_for_the_readme(
    ui: Ui, seeded: Seeded, page: Page, signed_in: SignIn, shot: Shot
) -> None:
    for task_id in seeded.bulk:
        ui.task(task_id, wait=60)  # the bulk retry's runs ended too: settled counts
    signed_in(page, "acme-admin")
    main = page.locator("main")
    for shown in ("Completed", "Failed"):
        expect(main).to_contain_text(shown)
    shot(page, "overview")
    if os.environ.get("TASKLEDGER_UPDATE_DOCS_IMAGES") == "1" or not DOCS_OVERVIEW.exists():
        DOCS_OVERVIEW.parent.mkdir(parents=True, exist_ok=True)
        written = shot(page, "overview-viewport", full_page=False)
        shutil.copyfile(written, DOCS_OVERVIEW)
