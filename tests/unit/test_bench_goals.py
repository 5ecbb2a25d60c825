"""The comparison's goals (bench/goals.py, issue 18) judged on made-up records: each kind
of bound, met and not met, and the ratio taken within each round."""

from __future__ import annotations

import pytest

from bench.goals import CELERY, METRICS, TASKLEDGER, Goal, Record, celerys, judge, own, table


def record(**figures: dict[str, list[float]]) -> Record:
    """`noop_rate={"taskledger": [1, 2]}`: metric noop.rate, one figure per round."""
    made = Record(rounds=max(len(v) for by in figures.values() for v in by.values()))
    for name, by in figures.items():
        for system, values in by.items():
            for round_, value in enumerate(values, start=1):
                made.put(name.replace("_", ".", 1), system, round_, value)
    return made


def goal_of(key: str) -> Goal:
    goal = next(m.goal for m in METRICS if m.key == key)
    assert goal is not None
    return goal


@pytest.mark.parametrize(
    ("key", "ours", "theirs", "verdict"),
    [
        ("noop.rate", 800.0, 400.0, "yes (x2.00)"),
        ("noop.rate", 500.0, 400.0, "NO: x1.25, needs 1.60x more"),
        ("noop.rate", 0.0, 400.0, "NO: x0.00"),
        ("rtt.p50", 11.0, 11.0, "yes (x1.00)"),
        ("rtt.p50", 19.8, 11.0, "NO: x1.80, 1.80x over"),
        ("noop.cpu_ms", 2.0, 4.0, "yes (x0.50)"),
        ("noop.cpu_ms", 3.6, 4.0, "NO: x0.90, 1.80x over"),
    ],
)
def test_relative_to_celerys_figure(key: str, ours: float, theirs: float, verdict: str) -> None:
    made = Record(1)
    made.put(key, TASKLEDGER, 1, ours)
    made.put(key, CELERY, 1, theirs)
    assert goal_of(key).verdict(key, made) == verdict


def test_relative_to_a_baseline_of_the_machine() -> None:
    met = record(python_overhead_p50={TASKLEDGER: [3.5]}, python_bare_p50={TASKLEDGER: [7.5]})
    missed = record(python_overhead_p50={TASKLEDGER: [6.6]}, python_bare_p50={TASKLEDGER: [7.5]})
    goal = goal_of("python.overhead_p50")
    assert goal.verdict("python.overhead_p50", met) == "yes (x0.47)"
    assert goal.verdict("python.overhead_p50", missed) == "NO: x0.88, 1.76x over"
    mono = record(csharp_warm_worker_p50={TASKLEDGER: [28.2]}, csharp_bare_p50={TASKLEDGER: [16.2]})
    assert goal_of("csharp.warm_worker_p50").verdict("csharp.warm_worker_p50", mono) == (
        "NO: x1.74, 1.34x over"
    )


def test_relative_to_another_metric_of_the_same_run() -> None:
    """The live lag against taskledger's own round trip p50; the reaper against 5x it.
    Celery's round trip plays no part."""
    made = record(
        noop_lag_task_status_p99={TASKLEDGER: [18.0]},
        ttl_reaper_p99={TASKLEDGER: [134.0]},
        rtt_p50={TASKLEDGER: [20.0], CELERY: [1.0]},
    )
    assert judge(next(m for m in METRICS if m.key == "noop.lag_task_status_p99"), made) == (
        "yes (x0.90)"
    )
    assert goal_of("ttl.reaper_p99").verdict("ttl.reaper_p99", made) == "NO: x6.70, 1.34x over"


def test_the_ratio_is_taken_within_each_round() -> None:
    """The machine ran twice as fast in round 2: both figures halved, the ratio the same.
    The ratio of the medians would be 1.5; the median of the rounds' ratios is 1.0."""
    made = record(rtt_p50={TASKLEDGER: [20.0, 10.0, 30.0], CELERY: [20.0, 10.0, 10.0]})
    assert goal_of("rtt.p50").ratios("rtt.p50", made) == [1.0, 1.0, 3.0]
    assert goal_of("rtt.p50").verdict("rtt.p50", made) == "yes (x1.00)"


def test_a_round_without_the_reference_is_left_out_and_none_at_all_is_said() -> None:
    partial = record(rtt_p50={TASKLEDGER: [20.0, 10.0]}, ttl_reaper_p99={TASKLEDGER: [50, 500]})
    partial.values["rtt.p50"][TASKLEDGER].pop(2)  # round 2's round trips failed
    assert goal_of("ttl.reaper_p99").verdict("ttl.reaper_p99", partial) == "yes (x2.50)"
    alone = record(ttl_reaper_p99={TASKLEDGER: [50.0]})
    verdict = goal_of("ttl.reaper_p99").verdict("ttl.reaper_p99", alone)
    assert verdict == "no figure of the reference (round trip p50) in the same round"
    assert goal_of("rtt.p50").verdict("rtt.p50", Record(1)) == "no figure"


def test_goal_texts_say_what_they_are_relative_to() -> None:
    texts = {m.key: m.goal.text() for m in METRICS if m.goal}
    assert texts == {
        "noop.rate": ">= 2x Celery",
        "noop.cpu_ms": "<= 0.5x Celery's",
        "noop.lag_task_status_p99": "<= 1x round trip p50",
        "noop.lag_audit_p99": "<= 1x round trip p50",
        "rtt.p50": "<= 1x Celery's",
        "python.overhead_p50": "<= 0.5x bare python3",
        "csharp.warm_worker_p50": "<= 1.3x bare mono",
        "ttl.reaper_p99": "<= 5x round trip p50",
    }


def test_a_bound_of_another_kind_built_by_hand() -> None:
    faster = Goal(25, "eventsourcing's runner", "rebuild.baseline", TASKLEDGER, at_least=True)
    made = record(
        rebuild_task_status={TASKLEDGER: [30_000.0]}, rebuild_baseline={TASKLEDGER: [1_000.0]}
    )
    assert faster.verdict("rebuild.task_status", made) == "yes (x30.00)"
    assert own(0.5, "python.bare_p50", "bare python3").of == TASKLEDGER
    assert celerys(2, at_least=True).text() == ">= 2x Celery"


def test_the_table_shows_the_goal_and_the_verdict() -> None:
    made = record(
        noop_rate={TASKLEDGER: [500.0], CELERY: [400.0]},
        rtt_p50={TASKLEDGER: [10.0], CELERY: [11.0]},
    )
    _, rows = table(made, ["noop", "rtt"])
    by_label = {(r[0], r[1]): r for r in rows}
    assert by_label[("1. no-op", "throughput, tasks/s")][5:] == [
        ">= 2x Celery",
        "NO: x1.25, needs 1.60x more",
    ]
    assert by_label[("2. round trip", "p50, ms")][4:] == ["0.91", "<= 1x Celery's", "yes (x0.91)"]
    assert by_label[("2. round trip", "p90, ms")][5:] == ["", ""]
