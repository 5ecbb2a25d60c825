"""The checks on a task's fields, shared by submit and update: each names the field and
what is wrong with it (InvalidTask), which the API answers as a 422 problem."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from ledger.errors import InvalidTask
from ledger.jsonvalue import NUL_PROBLEM, json_problem
from ledger.values import TaskLimits


def submission_fingerprint(fields: dict[str, Any]) -> str:
    """A stable digest of what a client asked for, to tell a retried request from a new one."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_text(field: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidTask(field, NUL_PROBLEM)


def check_description(value: object, limits: TaskLimits) -> None:
    if not isinstance(value, str):
        raise InvalidTask("description", "must be a string")
    check_text("description", value)
    if len(value) > limits.description_chars:
        raise InvalidTask(
            "description", f"is {len(value)} characters; at most {limits.description_chars}"
        )


def check_language(value: object) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise InvalidTask("language", "must be a language name such as 'python' or 'csharp'")


def check_code(value: object, limits: TaskLimits) -> None:
    if not isinstance(value, str):
        raise InvalidTask("code", "must be a string")
    check_text("code", value)
    size = len(value.encode())
    if size > limits.code_bytes:
        raise InvalidTask("code", f"is {size} bytes; at most {limits.code_bytes}")


def check_data(value: object, limits: TaskLimits) -> None:
    problem = json_problem(value)
    if problem:
        raise InvalidTask("data", problem)
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limits.data_bytes:
        raise InvalidTask("data", f"is {size} bytes as JSON; at most {limits.data_bytes}")


def check_ttl(value: object, limits: TaskLimits) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidTask("ttl_seconds", "must be a number of seconds")
    if not 0 < value <= limits.max_ttl_seconds:
        raise InvalidTask(
            "ttl_seconds", f"is {value}; must be more than 0 and at most {limits.max_ttl_seconds}"
        )


def check_max_attempts(value: object, limits: TaskLimits) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTask("max_attempts", "must be an integer")
    if not 1 <= value <= limits.max_attempts:
        raise InvalidTask("max_attempts", f"is {value}; must be 1 to {limits.max_attempts}")


def check_fields(changes: dict[str, Any], limits: TaskLimits) -> None:
    checks = {
        "description": lambda v: check_description(v, limits),
        "code": lambda v: check_code(v, limits),
        "data": lambda v: check_data(v, limits),
        "ttl_seconds": lambda v: check_ttl(v, limits),
        "max_attempts": lambda v: check_max_attempts(v, limits),
    }
    for name, value in changes.items():
        checks[name](value)
