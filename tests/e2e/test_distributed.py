"""taskledger as an operator runs it: an api process and two worker processes over real
PostgreSQL and RabbitMQ, driven over HTTP. Workers are killed and RabbitMQ is restarted
for real."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import services
from tests.processes import free_port, ready, start_role, stop, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]

KEY = "e2e-" + secrets.token_hex(16)


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]]
    logs: Path

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"ApiKey {KEY}"}, timeout=90
        )


@pytest.fixture
def deployment(database_url: str, schema: str, tmp_path: Path) -> Iterator[Deployment]:
    problem = services.broker_problem()
    if problem:
        services.unavailable("RabbitMQ", problem)
    port = free_port()
    env = {
        **os.environ,
        "TASKLEDGER_DATABASE_URL": database_url,
        "TASKLEDGER_DATABASE_SCHEMA": schema,
        "TASKLEDGER_BROKER_URL": services.BROKER_URL,
        "TASKLEDGER_API_KEYS": f"acme:admin:{KEY}",
        "TASKLEDGER_DATA_DIR": str(tmp_path / "data"),
        "TASKLEDGER_LOG_DIR": str(tmp_path / "logs"),
        # A killed worker's attempt is taken two seconds after its last heartbeat.
        "TASKLEDGER_LEASE_SECONDS": "2",
        "TASKLEDGER_HEARTBEAT_SECONDS": "0.4",
    }
    api = start_role(["api", "--port", str(port)], env, tmp_path / "api.out")
    workers = [
        start_role(
            ["worker", "--concurrency", "3", "--grace", "5"], env, tmp_path / f"worker{i}.out"
        )
        for i in range(2)
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url), 60, "the api to be ready")
        yield Deployment(url, env, workers, tmp_path)
    finally:
        for process in [*workers, api]:
            stop(process)


def submit(client: httpx.Client, **task: Any) -> str:
    response = client.post("/api/tasks", json=task)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def finished(client: httpx.Client, task_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = client.get(f"/api/tasks/{task_id}", params={"wait": 10}).json()
        if task["status"] not in ("Pending", "InProgress"):
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {task['status']} after {timeout} s")


def history(client: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.get(f"/api/tasks/{task_id}/history").json()["items"]
    return items


MIX = {
    "succeeds": (
        {"language": "python", "code": "print(sum(data))", "data": [1, 2, 3]},
        "Completed",
    ),
    "raises": (
        {"language": "python", "code": "raise ValueError('no')", "max_attempts": 2},
        "Failed",
    ),
    "loops": ({"language": "python", "code": "while True: pass", "ttl_seconds": 1.5}, "Expired"),
    "csharp": (
        {
            "language": "csharp",
            "code": "class P { static void Main() { System.Console.WriteLine("
            "System.Console.In.ReadToEnd().Length); } }",
            "data": {"x": 1},
        },
        "Completed",
    ),
}


def test_two_hundred_mixed_tasks_reach_their_expected_ends_on_both_workers(
    deployment: Deployment,
) -> None:
    plan = ["succeeds"] * 130 + ["raises"] * 30 + ["loops"] * 20 + ["csharp"] * 20
    with deployment.client() as client:
        ids = {submit(client, description=kind, **MIX[kind][0]): kind for kind in plan}
        results = {task_id: finished(client, task_id, timeout=180) for task_id in ids}
    wrong = {
        (ids[t], r["status"], (r["error"] or {}).get("message"))
        for t, r in results.items()
        if r["status"] != MIX[ids[t]][1]
    }
    assert not wrong, wrong
    succeeded = [r for t, r in results.items() if ids[t] == "succeeds"]
    assert {r["result"]["stdout"] for r in succeeded} == {"6\n"}
    csharp = [r for t, r in results.items() if ids[t] == "csharp"]
    assert {r["result"]["stdout"] for r in csharp} == {"7\n"}
    raised = [r for t, r in results.items() if ids[t] == "raises"]
    assert {(r["attempt"], r["error"]["kind"]) for r in raised} == {(2, "program_error")}
    workers = Counter(r["worker_id"] for r in results.values() if r["worker_id"])
    assert len(workers) == 2, f"the work should spread over both workers: {workers}"


def test_a_worker_killed_mid_task_loses_the_attempt_and_the_other_worker_completes_it(
    deployment: Deployment,
) -> None:
    with deployment.client() as client:
        task_id = submit(
            client,
            language="python",
            code="import time; time.sleep(3); print('done')",
            ttl_seconds=60,
            max_attempts=3,
        )
        wait_until(
            lambda: client.get(f"/api/tasks/{task_id}").json()["status"] == "InProgress",
            30,
            "the task to start",
        )
        worker_id = client.get(f"/api/tasks/{task_id}").json()["worker_id"]
        # Worker ids are host-pid-random (workers.worker.default_worker_id).
        victim = next(p for p in deployment.workers if f"-{p.pid}-" in worker_id)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        task = finished(client, task_id, timeout=90)
        events = history(client, task_id)
    assert task["status"] == "Completed"
    assert task["result"]["stdout"] == "done\n"
    assert task["worker_id"] != worker_id
    failures = [e["data"]["error"]["kind"] for e in events if e["type"] == "AttemptFailed"]
    assert failures == ["worker_lost"]
    starts = [e["data"]["worker_id"] for e in events if e["type"] == "AttemptStarted"]
    assert starts == [worker_id, task["worker_id"]]


def test_restarting_rabbitmq_loses_nothing_and_runs_nothing_twice(deployment: Deployment) -> None:
    if not _can_restart_rabbitmq():
        services.unavailable("rabbitmqctl", "cannot restart the local RabbitMQ from this test")
    with deployment.client() as client:
        # Running while the broker stops: their commands were acknowledged at the start,
        # and a broker restart must mark none of them lost (it used to: worker_lost).
        ids = [
            submit(
                client,
                language="python",
                code="import time; time.sleep(6); print(1)",
                data=n,
                max_attempts=3,
            )
            for n in range(12)
        ]
        wait_until(
            lambda: client.get(f"/api/tasks/{ids[0]}").json()["status"] != "Pending",
            30,
            "the first task to start",
        )
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        try:
            ids += [
                submit(client, language="python", code="print(2)", data=n, max_attempts=3)
                for n in range(30)
            ]
        finally:
            subprocess.run(
                ["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120
            )
        ids += [
            submit(client, language="python", code="print(3)", max_attempts=3) for _ in range(30)
        ]
        results = [finished(client, task_id, timeout=180) for task_id in ids]
        histories = [history(client, task_id) for task_id in ids]
    completions = [sum(e["type"] == "AttemptCompleted" for e in h) for h in histories]
    failures = [e["data"]["error"] for h in histories for e in h if e["type"] == "AttemptFailed"]
    assert {r["status"] for r in results} == {"Completed"}
    assert completions == [1] * len(ids), "each task completed exactly once"
    assert failures == [], "no attempt was marked lost"


def _can_restart_rabbitmq() -> bool:
    try:
        return (
            subprocess.run(
                ["rabbitmqctl", "status"], capture_output=True, timeout=60, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
