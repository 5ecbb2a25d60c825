"""The payload budget (ledger.domain.TaskLimits): whatever reaches the ledger beyond its
output bound is cut, on a character boundary, and marked truncated."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ledger.values import AttemptError, AttemptResult, TaskLimits, cut

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)


@given(texts, st.integers(min_value=0, max_value=1_300))
def test_cut_keeps_at_most_the_limit_on_a_character_boundary(text: str, limit: int) -> None:
    kept, was_cut = cut(text, limit)
    encoded = text.encode()
    assert len(kept.encode()) <= limit
    assert text.startswith(kept)
    assert was_cut == (len(encoded) > limit)
    if was_cut:  # nothing more of the text fits: the next character would overflow
        assert len(kept.encode()) + len(text[len(kept)].encode()) > limit
    else:
        assert kept == text


@given(texts, texts, st.integers(min_value=0, max_value=600))
def test_a_result_over_budget_is_cut_and_says_so(stdout: str, stderr: str, limit: int) -> None:
    result = AttemptResult(stdout=stdout, stderr=stderr, exit_code=3)
    bounded = result.within(limit)
    assert len(bounded.stdout.encode()) <= limit
    assert len(bounded.stderr.encode()) <= limit
    over = len(stdout.encode()) > limit or len(stderr.encode()) > limit
    assert bounded.truncated == over
    assert bounded.exit_code == 3
    if not over:
        assert bounded is result


def test_an_error_over_budget_is_cut() -> None:
    limits = TaskLimits(output_bytes=10)
    error = AttemptError("program_error", "m" * 20, stderr="é" * 20, exit_code=1)
    bounded = error.within(limits.output_bytes)
    assert bounded.message == "m" * 10
    assert bounded.stderr == "é" * 5
    assert (bounded.kind, bounded.exit_code) == ("program_error", 1)
