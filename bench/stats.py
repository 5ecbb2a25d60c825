"""Percentiles and the summary of values measured over rounds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from bench.report import num


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile of `values` (nearest rank); None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def quantiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max."""
    return {f"p{round(q * 100)}": percentile(values, q) for q in (0.5, 0.9, 0.99)} | {
        "max": max(values, default=None)
    }


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def over_rounds(values: Sequence[float], digits: int | None = None) -> str:
    """`median [min-max]` of one figure per round ("-" without any)."""
    if not values:
        return "-"
    text = num(statistics.median(values), digits)
    if len(values) > 1:
        text += f" [{num(min(values), digits)}–{num(max(values), digits)}]"  # noqa: RUF001
    return text


def ms(seconds: float) -> float:
    return seconds * 1000.0
