"""The soak's verdict (bench/soak.py): a line through the samples after the warm-up;
"grows" only for a rise that is steep, clear of the noise and still there in the second
half, "flat" only for one clearly below the threshold, "unclear" in between. Pure logic
over made-up series: the soak itself runs the real servers."""

from __future__ import annotations

import random

import pytest

from bench.soak import fit, judge

MINUTES = [60.0 + 10 * k for k in range(55)]  # 10-s samples of minutes 2..10


def test_fit_recovers_a_line() -> None:
    result = fit([(t, 3 + 0.5 * t) for t in MINUTES])
    assert result is not None
    assert result[0] == pytest.approx(0.5)
    assert result[1] == pytest.approx(0.0, abs=1e-9)


def test_too_few_points_are_not_judged() -> None:
    assert fit([(0.0, 1.0), (10.0, 2.0)]) is None
    assert judge("x", "MiB", [(0.0, 1.0), (10.0, 2.0)], 10.0).verdict == "too few points"


def test_a_steady_leak_grows() -> None:
    noise = random.Random(1)
    leak = [(t, 80 + 20 * t / 3600 + noise.uniform(-0.2, 0.2)) for t in MINUTES]  # 20 MiB/h
    trend = judge("api RSS", "MiB", leak, 10.0)
    assert trend.verdict == "grows"
    assert trend.slope_h == pytest.approx(20, abs=2)


def test_noise_and_a_flat_line_do_not() -> None:
    noise = random.Random(2)
    flat = [(t, 80 + noise.uniform(-1.0, 1.0)) for t in MINUTES]
    assert judge("api RSS", "MiB", flat, 10.0).verdict == "flat"


def test_a_warm_up_that_levels_off_does_not() -> None:
    # +3 MiB over the first two judged minutes, then flat: the whole line rises faster
    # than the threshold, its second half does not.
    ramp = [(t, 80 + 3 * min(t - 60, 120) / 120) for t in MINUTES]
    trend = judge("api RSS", "MiB", ramp, 10.0)
    assert trend.slope_h is not None
    assert trend.slope_h > 10
    assert trend.verdict == "flat"


def test_a_few_noisy_points_are_unclear() -> None:
    noisy = [(60.0, 40.0), (80.0, 90.0), (100.0, 55.0), (120.0, 95.0)]
    assert judge("round trip p99", "ms", noisy, 100.0).verdict == "unclear"


def test_one_pool_step_is_below_the_connection_threshold() -> None:
    # One more connection halfway: the line rises by about 1.5, the threshold is 2 across
    # the window.
    window_h = (MINUTES[-1] - MINUTES[0]) / 3600
    step = [(t, 30.0 + (t >= MINUTES[27])) for t in MINUTES]
    assert judge("PostgreSQL backends", "conn", step, 2 / window_h).verdict == "flat"
    leak = [(t, 30.0 + (t - 60) // 120) for t in MINUTES]  # one more every 2 minutes
    assert judge("PostgreSQL backends", "conn", leak, 2 / window_h).verdict == "grows"
