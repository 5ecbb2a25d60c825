"""JSON values as tasks carry them: strict checks and RFC 7396 merge patch.

Task data is stored in events and must round-trip exactly, so anything JSON (or orjson)
cannot represent faithfully is refused at the door: non-string keys, NaN and infinities
(orjson would write them as null), integers beyond 64 bits (orjson refuses them), and
nesting deeper than orjson serialises.
"""

from __future__ import annotations

import math
from typing import Any

JSONValue = Any  # None | bool | int | float | str | list[JSONValue] | dict[str, JSONValue]

MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
MAX_DEPTH = 128
# PostgreSQL text and jsonb cannot hold U+0000; a task carrying one could not be projected.
NUL_PROBLEM = "contains a NUL character (U+0000), which cannot be stored"


def without_nul(text: str) -> str:
    """Program output may contain NUL bytes; they are stored as U+FFFD."""
    return text.replace("\x00", "\ufffd")


def json_problem(value: object, path: str = "$", depth: int = 0) -> str | None:
    """Return why `value` is not a JSON value we can store exactly, or None if it is."""
    if depth > MAX_DEPTH:
        return f"{path}: nested deeper than {MAX_DEPTH} levels"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return f"{path}: {NUL_PROBLEM}" if "\x00" in value else None
    if isinstance(value, int):
        if MIN_INT <= value <= MAX_INT:
            return None
        return f"{path}: integer {value} is outside the 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: {value} is not a finite number"
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = json_problem(item, f"{path}[{index}]", depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}: key {key!r} is not a string"
            if "\x00" in key:
                return f"{path}: key {key!r}: {NUL_PROBLEM}"
            problem = json_problem(item, f"{path}.{key}", depth + 1)
            if problem:
                return problem
        return None
    return f"{path}: {type(value).__name__} is not a JSON type"


def merge_patch(target: JSONValue, patch: JSONValue) -> JSONValue:
    """Apply an RFC 7396 JSON merge patch to `target` and return the result.

    Neither argument is modified.
    """
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
