"""Every long-running role logs JSON lines to stdout and to `<log_dir>/<role>-YYYY-MM-DD.log`;
lines about a task carry its id and attempt."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests import services
from tests.processes import free_port, role_env, stop

pytestmark = [pytest.mark.postgres]

KEY = "logs-" + secrets.token_hex(16)


def lines_of(path: Path) -> list[dict[str, Any]]:
    """The file's lines, each parsed as JSON (a line that is not fails the test)."""
    return [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_line(
    process: subprocess.Popen[bytes], path: Path, message: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not any(line["msg"] == message for line in lines_of(path)):
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before logging {message!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {message!r} in {path} after {timeout} s")
        time.sleep(0.1)


ROLES = [
    pytest.param(
        "projections", ["projections", "run"], "projection leader: following the event log"
    ),
    pytest.param("dev", ["dev", "--port", "{port}"], "serving the API"),
    pytest.param("worker", ["worker"], "worker started", marks=pytest.mark.rabbitmq),
]


@pytest.mark.parametrize(("role", "args", "message"), ROLES)
def test_a_role_logs_json_lines_to_stdout_and_its_daily_file(
    role: str, args: list[str], message: str, database_url: str, schema: str, tmp_path: Path
) -> None:
    port = free_port()
    env = role_env(
        tmp_path,
        database_url=database_url,
        database_schema=schema,
        broker_url=services.broker_for(role),
        api_keys=f"acme:admin:{KEY}",
    )
    stdout = tmp_path / "stdout"
    log_file = tmp_path / "logs" / f"{role}-{datetime.now(UTC):%Y-%m-%d}.log"
    with stdout.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskledger", *(a.format(port=port) for a in args)],
            env=env,
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        wait_for_line(process, log_file, message)
        if role == "dev":
            run_a_task(f"http://127.0.0.1:{port}")
    finally:
        stop(process)
    assert process.returncode == 0  # stopped cleanly, its services closed
    in_file, on_stdout = lines_of(log_file), lines_of(stdout)
    assert any(line["msg"] == message for line in on_stdout)
    assert [line["msg"] for line in in_file] == [line["msg"] for line in on_stdout]
    about_tasks = [line for line in in_file if "task_id" in line and line["msg"] != "request"]
    assert all("attempt" in line for line in about_tasks), about_tasks
    if role == "dev":
        assert {"task transition", "attempt finished"} <= {line["msg"] for line in about_tasks}
        # docs/api.md: under `taskledger dev` the request lines go to the dev-… file.
        requests = [line for line in in_file if line["msg"] == "request"]
        assert any(line["path"] == "/api/tasks" and line["status"] == 201 for line in requests)


def run_a_task(url: str) -> None:
    headers = {"Authorization": f"ApiKey {KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        submitted = client.post(
            "/api/tasks", json={"description": "d", "language": "echo", "code": "", "data": 1}
        )
        assert submitted.status_code == 201, submitted.text
        task = client.get(submitted.headers["Location"], params={"wait": 20}).json()
        assert task["status"] == "Completed", task
