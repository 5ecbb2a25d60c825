"""How `python -m bench profile` sums py-spy's collapsed stacks."""

from __future__ import annotations

from bench.profile import frames, summarize

RAW = "\n".join(
    [
        # 6 samples in the views, their innermost known frame in psycopg
        "run (/x/projections/runner.py:10);execute (/s/psycopg/cursor.py:5) 6",
        # 3 in a handler, innermost frame in api/
        "app (/s/starlette/routing.py:1);submit_task (/x/api/tasks.py:9) 3",
        # 1 in C code under a view: passed outward to projections/
        "run (/x/projections/runner.py:10);<native> 1",
    ]
)


def test_frames_are_function_and_file_outermost_first() -> None:
    assert frames("a (/p/x.py:3);b (/q/y.py:7)") == [("a", "/p/x.py"), ("b", "/q/y.py")]


def test_areas_take_self_time_and_functions_inclusive_time() -> None:
    total, areas, functions = summarize(RAW, top=10)
    assert total == 10
    assert areas == [
        ["psycopg", "6", "60.0%"],
        ["api: HTTP handlers, watcher, roles (api/)", "3", "30.0%"],
        ["views (projections/)", "1", "10.0%"],
    ]
    by_name = {row[0]: row[1:] for row in functions}
    assert by_name["run (runner.py)"] == ["70.0%", "0.0%"]
    assert by_name["execute (cursor.py)"] == ["60.0%", "60.0%"]
    assert by_name["submit_task (tasks.py)"] == ["30.0%", "30.0%"]


def test_under_keeps_only_the_samples_with_that_function_on_the_stack() -> None:
    total, areas, functions = summarize(RAW, top=10, under="submit_task")
    assert total == 3
    assert areas == [["api: HTTP handlers, watcher, roles (api/)", "3", "100.0%"]]
    assert {row[0] for row in functions} == {"app (routing.py)", "submit_task (tasks.py)"}
