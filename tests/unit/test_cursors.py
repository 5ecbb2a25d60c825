"""Keyset pagination cursors (projections/queries.py): what the list endpoints hand out as
`next_cursor` and take back as `cursor`.

A cursor is the sort key of the last row of a page, opaque to clients. It must come back
as the same key, travel in a query string untouched, and any other string (a forged, cut
or altered cursor) must be refused as such, never with another error (that would be a 500).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections.queries import InvalidCursor, _decode_cursor, _encode_cursor

# What the queries put in a cursor: ISO times and UUIDs as text, positions as integers.
KEY_PARTS = st.one_of(st.text(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
KEYS = st.lists(KEY_PARTS, min_size=1, max_size=3)
URL_SAFE = re.compile(r"[A-Za-z0-9_-]*")


@given(KEYS)
def test_a_cursor_decodes_to_the_key_it_was_made_of(key: list[Any]) -> None:
    assert _decode_cursor(_encode_cursor(*key), len(key)) == key


@given(KEYS)
def test_a_cursor_needs_no_escaping_in_a_query_string(key: list[Any]) -> None:
    assert URL_SAFE.fullmatch(_encode_cursor(*key))


@given(KEYS, st.integers(1, 4))
def test_a_cursor_of_another_arity_is_refused(key: list[Any], arity: int) -> None:
    if arity == len(key):
        arity += 1
    with pytest.raises(InvalidCursor):
        _decode_cursor(_encode_cursor(*key), arity)


@given(st.text())
def test_any_other_string_is_refused_as_a_cursor_or_decodes_to_a_key(text: str) -> None:
    try:
        key = _decode_cursor(text, 2)
    except InvalidCursor:
        return
    assert isinstance(key, list)
    assert len(key) == 2


@pytest.mark.parametrize(
    "cursor",
    ["", "=", "not base64!", "é", "AAAA", "e30", "bnVsbA", "WzFd", "WzEsMiwzXQ", "IjEi"],
)
def test_these_are_not_cursors_of_two(cursor: str) -> None:
    with pytest.raises(InvalidCursor, match="not one this service issued"):
        _decode_cursor(cursor, 2)
