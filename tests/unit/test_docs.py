"""The documentation against the code: what docs/*.md and README.md show must be true."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from api.schemas import TaskOut, TaskSummaryOut

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def json_example_after(text: str, marker: str) -> dict[str, Any]:
    """The first ```json block after `marker` in `text`."""
    start = text.index(marker)
    for match in FENCE.finditer(text, start):
        if match.group(1) == "json":
            example: dict[str, Any] = orjson.loads(match.group(2))
            return example
    raise AssertionError(f"no json block after {marker!r}")


def field_names(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_the_documented_task_shapes_are_the_served_ones() -> None:
    text = API_DOC.read_text()
    task = json_example_after(text, "The task representation")
    assert set(task) == field_names(TaskOut)
    item = json_example_after(text, "### List items")
    assert set(item) == field_names(TaskSummaryOut)
