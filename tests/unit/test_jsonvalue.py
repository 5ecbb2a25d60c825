from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.jsonvalue import json_problem, merge_patch

from .test_persistence import json_values


# The examples of RFC 7396, appendix A.
@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_rfc_7396_examples(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(target, patch) == result


@given(json_values, json_values)
def test_merge_patch_leaves_its_arguments_alone(target: Any, patch: Any) -> None:
    import copy

    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    merge_patch(target, patch)
    assert (target, patch) == (target_before, patch_before)


@given(json_values, json_values)
def test_applying_a_patch_twice_is_applying_it_once(target: Any, patch: Any) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


@given(json_values)
def test_every_generated_json_value_is_acceptable(value: Any) -> None:
    assert json_problem(value) is None


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"a": [1, float("nan")]}, "$.a[1]"),
        ({"a": {"b": -(2**63) - 1}}, "$.a.b"),
        ([{3: 1}], "$[0]"),
        ({"a": b"bytes"}, "$.a"),
        ({"a": (1, 2)}, "$.a"),
        ({"a": ["ok", "nul\x00"]}, "$.a[1]"),
        ({"a": {"k\x00": 1}}, "$.a"),
    ],
)
def test_json_problems_name_the_path(value: Any, where: str) -> None:
    problem = json_problem(value)
    assert problem is not None
    assert problem.startswith(where + ":")


def test_nesting_is_bounded() -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    assert "nested deeper" in (json_problem(deep) or "")


@given(st.integers())
def test_integers_are_accepted_exactly_within_64_bits(n: int) -> None:
    assert (json_problem(n) is None) == (-(2**63) <= n <= 2**64 - 1)
