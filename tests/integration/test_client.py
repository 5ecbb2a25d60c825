"""taskledger.client against a real server: `taskledger dev` on PostgreSQL and RabbitMQ,
its worker running the programs. Every call, sync and async; each typed error; and the
retries, attacked through a proxy that loses the answer after the server acted."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from taskledger.client import (
    AsyncClient,
    Client,
    Conflict,
    ConnectionFailed,
    FeedEvent,
    Forbidden,
    NotFound,
    PreconditionFailed,
    RetryPolicy,
    TaskOut,
    Unauthorized,
    ValidationError,
)
from tests.integration.client_server import FaultyProxy, Server, dev_server

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=3, backoff_seconds=0.05)


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with dev_server(database_url, tmp_path_factory.mktemp("client-dev")) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, server.key(), retries=FAST) as opened:
        yield opened


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def listed(client: Client, description: str, count: int = 1) -> list[str]:
    """The ids of the tasks described so, once the list (a view, a moment behind) has
    `count` of them."""
    deadline = time.monotonic() + 20
    while True:
        ids = [str(task.id) for task in client.list(q=description)]
        if len(ids) >= count or time.monotonic() > deadline:
            return ids
        time.sleep(0.1)


# -- every call --------------------------------------------------------------------------------


def test_submit_wait_get_history(client: Client) -> None:
    description = unique("sum")
    code = "import sys\nprint(sum(data))\nprint('to stderr', file=sys.stderr)\n"
    task = client.submit(
        code, language="python", data=[1, 2, 3], description=description, ttl_seconds=30
    )
    assert isinstance(task, TaskOut)
    assert (task.status, task.description, task.ttl_seconds) == ("Pending", description, 30)
    done = client.wait(task.id, timeout=60)
    assert done.status == "Completed", done
    assert done.result is not None
    assert (done.result.stdout, done.result.stderr) == ("6\n", "to stderr\n")
    assert client.get(task.id) == done
    assert client.get(str(task.id), wait=5).version == done.version
    history = client.history(task.id)
    assert [item.type for item in history] == [
        "TaskSubmitted",
        "AttemptScheduled",
        "AttemptStarted",
        "AttemptCompleted",
    ]
    assert all(item.position for item in history)


def test_submit_a_file_guesses_its_language_and_names_the_task(
    client: Client, tmp_path: Path
) -> None:
    program = tmp_path / "hello_world.py"
    program.write_text("print('hello', data['who'])\n")
    task = client.submit(file=program, data={"who": "file"}, max_attempts=2)
    assert (task.language, task.description, task.max_attempts) == ("python", program.name, 2)
    assert task.code == program.read_text()
    done = client.wait(task.id, timeout=60)
    assert done.result is not None
    assert done.result.stdout == "hello file\n"


def test_wait_gives_back_the_task_unfinished_when_its_time_is_up(client: Client) -> None:
    task = client.submit("import time; time.sleep(30)", language="python")
    started = time.monotonic()
    waited = client.wait(task.id, timeout=1.5)
    assert 1.4 < time.monotonic() - started < 10
    assert waited.status in ("Pending", "InProgress")
    cancelled = client.cancel(task.id, reason="enough")
    assert cancelled.status == "Cancelled"
    assert client.history(task.id)[-1].data["reason"] == "enough"


def test_list_pages_through_everything_with_the_filters(client: Client) -> None:
    description = unique("listed")
    submitted = [
        client.submit(None, language="echo", data=n, description=description) for n in range(5)
    ]
    for task in submitted:
        assert client.wait(task.id, timeout=30).status == "Completed"
    expected = {str(task.id) for task in submitted}
    assert len(listed(client, description, 5)) == 5
    deadline = time.monotonic() + 20
    while True:  # every one Completed in the view too
        paged = list(client.list(q=description, status="Completed", page_size=2))
        if len(paged) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {str(task.id) for task in paged} == expected
    created = [task.created_at for task in paged]
    assert created == sorted(created, reverse=True)  # newest first, across the pages
    assert list(client.list(q=description, status=["Failed", "Expired"])) == []
    assert list(client.list(q=description, language="python")) == []
    hour = timedelta(hours=1)
    now = datetime.now(UTC)
    assert len(list(client.list(q=description, created_after=now - hour))) == 5
    assert list(client.list(q=description, created_before=now - hour)) == []


def test_retry_a_failed_task_and_update_a_pending_one(client: Client) -> None:
    failed = client.submit("import sys; sys.exit(3)", language="python", max_attempts=1)
    assert client.wait(failed.id, timeout=60).status == "Failed"
    again = client.retry(failed.id, ttl_seconds=20)
    assert (again.status, again.attempt, again.ttl_seconds) == ("Pending", 2, 20)
    # Patched by version. A finished task, whose version nothing else moves: a Pending
    # one is started by the worker at any moment, and its If-Match would race that.
    task = client.wait(client.submit(None, language="echo", description="before").id, timeout=60)
    assert task.status == "Completed"
    patched = client.update(task.id, {"description": "after"}, if_match=task.version)
    assert patched.description == "after"
    assert patched.version == task.version + 1
    with pytest.raises(PreconditionFailed) as stale:
        client.update(task.id, {"description": "again"}, if_match=task.version)
    assert stale.value.status == 412
    assert stale.value.type.endswith("/version-mismatch")


def test_events_resume_from_a_position_and_follow_new_ones(client: Client) -> None:
    first = client.submit(None, language="echo", data=1)
    client.wait(first.id, timeout=30)
    deadline = time.monotonic() + 20
    while True:  # the feed is the audit view, a moment behind the store
        mine = [event for event in client.events() if event.task_id == first.id]
        if any(event.type == "AttemptCompleted" for event in mine) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(isinstance(event, FeedEvent) for event in mine)
    positions = [event.position for event in mine]
    assert positions == sorted(positions)
    # Resuming after the first event gives the rest, not the first again.
    resumed = [event for event in client.events(after=positions[0]) if event.task_id == first.id]
    assert [event.position for event in resumed] == positions[1:]


def test_events_follow_live(client: Client) -> None:
    head = max((event.position for event in client.events()), default=0)
    stream = client.events(after=head, follow=True, timeout=30)
    task = client.submit(None, language="echo", data="live")
    types = []
    for event in stream:
        if event.task_id == task.id:
            types.append(event.type)
            if event.type == "AttemptCompleted":
                break
    stream.close()
    assert types == ["TaskSubmitted", "AttemptScheduled", "AttemptStarted", "AttemptCompleted"]


def test_events_follow_stops_at_its_timeout(client: Client) -> None:
    head = max((event.position for event in client.events()), default=0)
    started = time.monotonic()
    assert list(client.events(after=head + 10**6, follow=True, timeout=1.0)) == []
    assert 0.9 < time.monotonic() - started < 5


# -- each typed error --------------------------------------------------------------------------


def test_each_problem_is_its_own_exception(server: Server, client: Client) -> None:
    with Client(server.url, "not-a-key-0123456789") as stranger, pytest.raises(Unauthorized) as e:
        stranger.get(uuid.uuid4())
    assert e.value.status == 401
    with Client(server.url, server.key("acme-read")) as reader, pytest.raises(Forbidden) as f:
        reader.submit(None, language="echo")
    assert f.value.status == 403
    with pytest.raises(NotFound) as missing:
        client.get(uuid.uuid4())
    assert missing.value.type.endswith("/task-not-found")
    done = client.submit(None, language="echo")
    client.wait(done.id, timeout=30)
    with pytest.raises(Conflict) as conflict:
        client.cancel(done.id)
    assert "Completed" in conflict.value.detail
    with pytest.raises(ValidationError) as invalid:
        client.submit("x", language="ruby")
    assert [problem.field for problem in invalid.value.errors] == ["language"]
    assert invalid.value.problem.request_id
    # Another tenant's task is not found, as if it did not exist.
    with Client(server.url, server.key("globex-submit")) as other, pytest.raises(NotFound):
        other.get(done.id)


def test_the_same_idempotency_key_with_another_body_is_a_conflict(client: Client) -> None:
    key = unique("key")
    first = client.submit(None, language="echo", data=1, idempotency_key=key)
    assert client.submit(None, language="echo", data=1, idempotency_key=key).id == first.id
    with pytest.raises(Conflict) as reused:
        client.submit(None, language="echo", data=2, idempotency_key=key)
    assert reused.value.type.endswith("/idempotency-key-reused")


# -- async -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_async_client_makes_every_call(server: Server, tmp_path: Path) -> None:
    program = tmp_path / "double.py"
    program.write_text("print(data * 2)\n")
    description = unique("async")
    async with AsyncClient(server.url, server.key(), retries=FAST) as tl:
        task = await tl.submit(file=program, data=21, description=description)
        done = await tl.wait(task.id, timeout=60)
        assert done.result is not None
        assert done.result.stdout == "42\n"
        assert (await tl.get(task.id)).version == done.version
        assert [item.type for item in await tl.history(task.id)][-1] == "AttemptCompleted"
        ids: list[str] = []
        with anyio.fail_after(20):
            while not ids:
                ids = [str(t.id) async for t in tl.list(q=description, page_size=1)]
        assert ids == [str(task.id)]
        failed = await tl.submit("raise SystemExit(2)", language="python", max_attempts=1)
        assert (await tl.wait(failed.id, timeout=60)).status == "Failed"
        assert (await tl.retry(failed.id)).status == "Pending"
        cancelled = await tl.cancel(failed.id)
        assert cancelled.status == "Cancelled"
        # Patched by version, on a finished task: nothing else moves its version (a
        # Pending one's If-Match would race the worker starting it).
        patched = await tl.update(failed.id, {"description": "x"}, if_match=cancelled.version)
        assert patched.description == "x"
        with pytest.raises(PreconditionFailed):
            await tl.update(failed.id, {"description": "y"}, if_match=cancelled.version)
        pending = await tl.submit("import time; time.sleep(30)", language="python")
        await tl.cancel(pending.id)
        with pytest.raises(Conflict):
            await tl.cancel(pending.id)
        with pytest.raises(NotFound):
            await tl.history(uuid.uuid4())
        with pytest.raises(ValidationError):
            await tl.submit("x", language="cobol")
        events = [event async for event in tl.events() if event.task_id == task.id]
        assert events
        assert events[0].type == "TaskSubmitted"
        head = max([event.position async for event in tl.events()])
        live = await tl.submit(None, language="echo")
        with anyio.fail_after(30):
            async for event in tl.events(after=head, follow=True, timeout=30):
                if event.task_id == live.id and event.type == "AttemptCompleted":
                    break
            else:
                pytest.fail("no AttemptCompleted followed")
    async with AsyncClient(server.url, server.key("acme-read")) as reader:
        with pytest.raises(Forbidden):
            await reader.cancel(task.id)
    async with AsyncClient(server.url, "wrong-key-0123456789") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.get(task.id)


# -- retries, attacked -------------------------------------------------------------------------


@pytest.fixture
def proxy(server: Server) -> Iterator[FaultyProxy]:
    port = int(server.url.rsplit(":", 1)[1])
    faulty = FaultyProxy(port)
    yield faulty
    faulty.close()


def test_a_submit_whose_answer_was_lost_is_retried_into_the_same_task(
    server: Server, proxy: FaultyProxy
) -> None:
    description = unique("lost-answer")
    proxy.once(b"POST /api/tasks ", "drop-response")
    with Client(proxy.url, server.key(), retries=FAST) as tl:
        task = tl.submit(None, language="echo", data="once", description=description)
        assert proxy.matched == [(b"POST /api/tasks ", "drop-response")]  # it was lost
        assert tl.wait(task.id, timeout=30).status == "Completed"
        ids = listed(tl, description)
    assert ids == [str(task.id)]  # one task: the retry found the first one's
    with Client(server.url, server.key()) as direct:
        time.sleep(0.5)  # a second task would have been listed by now
        assert [str(t.id) for t in direct.list(q=description)] == [str(task.id)]
    # The server answered twice: 201 (stored, the answer lost), then 200 (the same task).
    assert submits_of(server, str(task.id)) == [201, 200]


def submits_of(server: Server, task_id: str) -> list[int]:
    """The statuses of the POSTs /api/tasks the server logged for the task."""
    statuses = []
    for line in server.log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        about = (entry.get("msg"), entry.get("method"), entry.get("path"), entry.get("task_id"))
        if about == ("request", "POST", "/api/tasks", task_id):
            statuses.append(entry["status"])
    return statuses


def test_a_503_is_retried_and_a_lost_cancel_is_not(server: Server, proxy: FaultyProxy) -> None:
    with Client(server.url, server.key()) as direct:
        task = direct.submit("import time; time.sleep(30)", language="python")
    proxy.once(b"GET /api/tasks/", "answer-503")
    with Client(proxy.url, server.key(), retries=FAST) as tl:
        assert tl.get(task.id).id == task.id
        assert proxy.matched == [(b"GET /api/tasks/", "answer-503")]
    # A cancel whose answer is lost is not sent again: the caller hears of it.
    proxy.once(b"POST /api/tasks/", "drop-response")
    with Client(proxy.url, server.key(), retries=FAST) as tl:
        with pytest.raises(ConnectionFailed) as lost:
            tl.cancel(task.id)
        assert f"{proxy.url}/api/tasks/{task.id}/cancel" in str(lost.value)
        assert "not retried" in str(lost.value)
        # The server did cancel it: a retry would have been a 409.
        assert tl.get(task.id).status == "Cancelled"
        assert [t for t in tl.history(task.id) if t.type == "TaskCancelled"]


def test_a_server_out_of_reach_is_a_connection_failure_naming_the_url() -> None:
    with Client("http://127.0.0.1:9", "some-key-0123456789", retries=FAST) as tl:
        started = time.monotonic()
        with pytest.raises(ConnectionFailed) as failed:
            tl.get(uuid.uuid4())
    assert "http://127.0.0.1:9/api/tasks/" in str(failed.value)
    assert time.monotonic() - started < 5  # bounded retries


# -- the README's example ----------------------------------------------------------------------


def test_the_readme_python_example_runs(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    example = next(block for block in blocks if "taskledger.client" in block)
    monkeypatch.setenv("TASKLEDGER_URL", server.url)
    monkeypatch.setenv("TASKLEDGER_API_KEY", server.key())
    printed: list[tuple[object, ...]] = []
    namespace = {"print": lambda *args, **_: printed.append(args)}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert printed == [("6\n",)], printed
