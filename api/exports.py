"""Exports of events as NDJSON or CSV (`?format=ndjson|csv` on a task's history and on
the audit): streamed row by row, every matching event, for pandas, jq or a spreadsheet.

NDJSON: one JSON object per line, byte for byte the item the JSON API writes (its
response model's). CSV: a header row of the model's fields, then one row per event; `data`
(the event's own fields) is a JSON string in its cell, other values as in the JSON (times
RFC 3339 in UTC), null an empty cell.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from api.http import param_problem
from api.schemas import dump_json

FORMATS = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def export_format(request: Request) -> str | None:
    """The `format` asked for (None: the JSON API's own pages)."""
    value = request.query_params.get("format")
    if value is None or value == "json":
        return None
    if value not in FORMATS:
        raise param_problem("format", f"{value!r} is not one of json, ndjson, csv")
    return value


def export(
    kind: str,
    model: type[BaseModel],
    batches: AsyncIterator[Iterable[Any]],
    name: str,
) -> Response:
    """Stream `batches` (of items, in order; each validated as `model`) as `kind`, in a
    file named `name`.<kind>."""
    return StreamingResponse(
        _lines(kind, model, batches),
        media_type=FORMATS[kind],
        headers={"Content-Disposition": f'attachment; filename="{name}.{kind}"'},
    )


async def _lines(
    kind: str, model: type[BaseModel], batches: AsyncIterator[Iterable[Any]]
) -> AsyncIterator[bytes]:
    columns = list(model.model_fields)
    if kind == "csv":
        yield _csv_row(columns)
    async for batch in batches:
        chunk = bytearray()
        for item in batch:
            line = dump_json(model.model_validate(item, from_attributes=True))
            if kind == "ndjson":
                chunk += line + b"\n"
            else:
                written = orjson.loads(line)
                chunk += _csv_row([_cell(written[c]) for c in columns])
        yield bytes(chunk)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _csv_row(cells: Sequence[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(cells)
    return out.getvalue().encode()
