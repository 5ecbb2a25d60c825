"""GET /api/events over real HTTP: a `taskledger api` process, clients that follow its
Server-Sent Events stream, drop it, resume it, hold too many, or read too slowly."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import free_port, role_env, start_role, stop, wait_until, wait_until_serving

pytestmark = pytest.mark.postgres

KEYS = {
    "acme": "acme-submit-key-0123456789",
    "globex": "globex-submit-key-0123456789",
    "admin": "acme-admin-key-0123456789",
}
STREAM = {"Accept": "text/event-stream"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"ApiKey {KEYS[who]}"}


@pytest.fixture
def url(database_url: str, schema: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = role_env(
        tmp_path,
        database_url=database_url,
        database_schema=schema,
        broker_url="memory://",
        api_keys=f"acme:submit:{KEYS['acme']},globex:submit:{KEYS['globex']},"
        f"acme:admin:{KEYS['admin']}",
    )
    log = tmp_path / "api.out"
    process = start_role(["api", "--port", str(port)], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, base, log, timeout=60)
        yield base
    finally:
        stop(process)


def submit(url: str, who: str, n: int, data: Any = None) -> str:
    body = {"description": f"task {n}", "language": "echo", "data": data or {"n": n}}
    response = httpx.post(f"{url}/api/tasks", json=body, headers=auth(who), timeout=10)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def pages(url: str, who: str) -> list[dict[str, Any]]:
    """Every event the JSON feed gives `who`, page by page."""
    items: list[dict[str, Any]] = []
    after = 0
    while True:
        response = httpx.get(
            f"{url}/api/events", params={"after": after, "limit": 100}, headers=auth(who)
        )
        assert response.status_code == 200, response.text
        page = response.json()
        if not page["items"]:
            return items
        items += page["items"]
        after = page["next_after"]


class Stream:
    """One SSE connection over a plain socket, read on a thread of its own into `events`.
    `close` shuts the socket down: the server sees the client go (a close from another
    thread while one blocks reading it would send nothing)."""

    def __init__(self, url: str, who: str, last_event_id: int | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        headers = {"Host": host, **STREAM, **auth(who), "Connection": "close"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        request = "GET /api/events HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self.sock.sendall((request + "\r\n").encode())
        self.file = self.sock.makefile("rb")
        self.status = int(self.file.readline().split()[1])
        while self.file.readline() not in (b"\r\n", b""):  # the response's headers
            pass
        self.sock.settimeout(None)
        self.events: list[dict[str, Any]] = []
        self.ids: list[int] = []
        self.paused = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        if self.status == 200:
            self._reader.start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for raw in self.file:  # chunked framing lines are skipped: not SSE fields
                while self.paused.is_set():
                    time.sleep(0.01)
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if "data" in fields:
                        self.ids.append(int(fields["id"]))
                        self.events.append(json.loads(fields["data"]))
                    fields = {}
                elif line.startswith(("id:", "event:", "data:", "retry:")):
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
        except (OSError, ValueError):
            pass  # shut down by the test

    def wait_for(self, count: int, timeout: float = 30) -> None:
        wait_until(lambda: len(self.events) >= count, timeout, f"{count} events on the stream")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.paused.clear()
        if self._reader.is_alive():
            self._reader.join(10)  # it reads the end of the stream and stops
        self.file.close()
        self.sock.close()


def test_a_stream_follows_its_tenants_events_and_resumes_where_it_was_dropped(
    url: str,
) -> None:
    mine = [submit(url, "acme", n) for n in range(3)]
    submit(url, "globex", 0)
    first = Stream(url, "acme")
    try:
        first.wait_for(6)  # each task: TaskSubmitted, AttemptScheduled
    finally:
        first.close()  # dropped: the client goes away mid-stream
    assert {e["task_id"] for e in first.events} == set(mine)
    assert first.ids == sorted(first.ids) == [e["position"] for e in first.events]
    kept = first.ids[3]  # as if only the first four had been processed
    more = [submit(url, "acme", n) for n in range(3, 5)]
    resumed = Stream(url, "acme", last_event_id=kept)
    try:
        resumed.wait_for(2 + 4)
    finally:
        resumed.close()
    everything = pages(url, "acme")  # the JSON feed: the same events, the same hashes
    assert [e["position"] for e in everything] == first.ids[:4] + resumed.ids[:6]
    assert first.events[:4] + resumed.events[:6] == everything
    assert {e["task_id"] for e in everything} == set(mine + more)
    history = httpx.get(f"{url}/api/tasks/{mine[0]}/history", headers=auth("acme")).json()
    by_position = {e["position"]: e["hash"] for e in everything}
    assert all(by_position[item["position"]] == item["hash"] for item in history["items"])
    assert {e["task_id"] for e in pages(url, "admin")} >= set(mine + more)  # and globex's


def test_a_key_may_hold_four_streams_and_a_closed_one_frees_its_place(url: str) -> None:
    streams = [Stream(url, "acme") for _ in range(4)]
    try:
        assert [s.status for s in streams] == [200] * 4
        refused = httpx.get(f"{url}/api/events", headers={**STREAM, **auth("acme")})
        assert refused.status_code == 429
        assert "event streams open" in refused.json()["detail"]
        other = Stream(url, "globex")  # another key is not held back
        assert other.status == 200
        other.close()
        streams.pop().close()

        def opens() -> bool:
            again = Stream(url, "acme")
            if again.status == 200:
                streams.append(again)
                return True
            again.close()
            return False

        wait_until(opens, 10, "the closed stream's place to be free")
    finally:
        for stream in streams:
            stream.close()


def test_a_slow_reader_holds_up_neither_the_service_nor_the_other_streams(url: str) -> None:
    slow, fast = Stream(url, "acme"), Stream(url, "acme")
    slow.paused.set()  # reads nothing while the events pile up
    try:
        big = {"text": "x" * 8_000}
        tasks = [submit(url, "acme", n, big) for n in range(150)]  # ~2.4 MB of events
        fast.wait_for(300, timeout=60)
        # The service answers (a client timeout would raise) while the slow stream's
        # events wait in its socket and its generator, not in a connection of the pool.
        assert httpx.get(f"{url}/api/tasks?limit=1", headers=auth("acme")).status_code == 200
        assert slow.events == []
        slow.paused.clear()
        slow.wait_for(300, timeout=60)
    finally:
        slow.close()
        fast.close()
    assert slow.ids == fast.ids == sorted(fast.ids)
    assert {e["task_id"] for e in slow.events} == set(tasks)
