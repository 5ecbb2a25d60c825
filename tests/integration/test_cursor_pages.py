"""Keyset pages through the HTTP API, on the real views: a cursor answered with the rows
after it, however the list grows meanwhile; and a forged cursor answered 400 naming the
`cursor` field, whatever it holds once decoded (DESIGN: bad input is never a 500)."""

from __future__ import annotations

from typing import Any

import pytest

from ledger import ManualClock
from projections.queries import _encode_cursor
from tests.integration.conftest import Api
from tests.integration.test_api import assert_problem, submit

pytestmark = [pytest.mark.postgres, pytest.mark.asyncio]

CREATED = "2030-01-01T00:00:00+00:00"
TASK_ID = "00000000-0000-0000-0000-000000000001"


async def pages(api: Api, path: str, first: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """Every item from the page after `first` on, following `next_cursor`."""
    items: list[dict[str, Any]] = []
    cursor = first["next_cursor"]
    while cursor is not None:
        response = await api.client.get(
            path, params={"limit": limit, "cursor": cursor}, headers=api.auth("acme-read")
        )
        assert response.status_code == 200, response.text
        items += response.json()["items"]
        cursor = response.json()["next_cursor"]
    return items


async def test_tasks_submitted_while_a_client_pages_neither_shift_nor_repeat_its_pages(
    api: Api, clock: ManualClock
) -> None:
    listed = []
    for n in range(7):
        listed.append((await submit(api, description=f"t{n}"))["id"])
        clock.advance(1)
    await api.catch_up()
    response = await api.client.get(
        "/api/tasks", params={"limit": 3}, headers=api.auth("acme-read")
    )
    first = response.json()
    for n in range(4):  # newer than every listed task: they sort before the cursor
        await submit(api, description=f"new{n}")
    await api.catch_up()
    rest = await pages(api, "/api/tasks", first, limit=3)
    seen = [item["id"] for item in first["items"] + rest]
    assert seen == listed[::-1]  # newest first, each once, none of the new ones


async def test_events_appended_while_a_client_pages_the_audit_neither_shift_nor_repeat(
    api: Api,
) -> None:
    for n in range(3):
        await submit(api, description=f"t{n}")
    await api.catch_up()
    everything = await api.client.get(
        "/api/audit", params={"limit": 100}, headers=api.auth("acme-read")
    )
    before = [item["position"] for item in everything.json()["items"]]
    response = await api.client.get(
        "/api/audit", params={"limit": 2}, headers=api.auth("acme-read")
    )
    first = response.json()
    await submit(api, description="new")
    await api.catch_up()
    rest = await pages(api, "/api/audit", first, limit=2)
    assert [item["position"] for item in first["items"] + rest] == before


@pytest.mark.parametrize(
    "key",
    [
        (CREATED, 5),  # UUID(5) raised AttributeError: a 500
        (CREATED, ["x"]),
        (CREATED, None),
        (CREATED, "not-a-uuid"),
        (5, TASK_ID),
        (None, TASK_ID),
        ("yesterday", TASK_ID),
    ],
    ids=repr,
)
async def test_a_task_list_cursor_holding_anything_but_a_time_and_an_id_is_a_400(
    api: Api, key: tuple[Any, ...]
) -> None:
    response = await api.client.get(
        "/api/tasks", params={"cursor": _encode_cursor(*key)}, headers=api.auth("acme-read")
    )
    assert_problem(response, 400, "cursor")


@pytest.mark.parametrize(
    "position",
    [
        True,  # an int to isinstance: PostgreSQL then failed on bigint < boolean, a 500
        "7",
        1.5,
        None,
        [7],
    ],
    ids=repr,
)
async def test_an_audit_cursor_holding_anything_but_a_position_is_a_400(
    api: Api, position: Any
) -> None:
    response = await api.client.get(
        "/api/audit", params={"cursor": _encode_cursor(position)}, headers=api.auth("acme-read")
    )
    assert_problem(response, 400, "cursor")
