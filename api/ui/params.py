"""The pages' filters, read by the API's own parsers (same checks, same messages)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from urllib.parse import urlencode

from starlette.requests import Request

# Fields the pages take as times. A browser's date-time field has no offset: the pages
# read such a time as UTC (and say so by the field) before the API's parser sees it.
TIME_FIELDS = frozenset({"created_after", "created_before", "since", "until"})


def _as_utc(value: str) -> str:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value  # the API's parser names what is wrong with it
    return value + "Z" if parsed.tzinfo is None else value


def as_query(request: Request, pairs: Iterable[tuple[str, str]]) -> Request:
    """`request` with `pairs` as its query, less the empty values.

    A GET form sends its empty fields (`task_id=`) and a POST form sends the filters in
    its body; the API's parsers read a request's query, where absent means "any". So the
    pages hand them a request whose query is the form's filled fields.
    """
    kept = [
        (name, _as_utc(value.strip()) if name in TIME_FIELDS else value)
        for name, value in pairs
        if value.strip() != ""
    ]
    return Request({**request.scope, "query_string": urlencode(kept).encode()}, request.receive)


def filled(request: Request) -> list[tuple[str, str]]:
    """The request's query, less its empty values (for links to the same view)."""
    return [(k, v) for k, v in request.query_params.multi_items() if v.strip() != ""]
