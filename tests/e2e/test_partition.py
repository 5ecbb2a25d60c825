"""A worker cut off from PostgreSQL while it runs a task: real processes over real
PostgreSQL and RabbitMQ, the worker's database connections going through a TCP proxy
(pproxy, see bench/faults/proxy.py) that the test pauses (SIGSTOP: nothing forwarded, no
connection broken, as behind a silent peer: the worker's requests are never answered) for
longer than the lease. The api reaches PostgreSQL directly.

What must happen (docs/reliability.md, docs/workers.md "Delivery guarantees"):
- the leader (the api's reaper, which reaches PostgreSQL directly) takes the lapsed lease
  and records the attempt as AttemptFailed(worker_lost);
- the partitioned worker kills its run once it has not renewed its lease for a whole
  lease (self-fencing), while the partition lasts;
- whatever the partitioned worker tries to record once the partition heals is refused:
  the attempt keeps exactly one outcome, worker_lost;
- the worker works again once the partition heals.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import psycopg
import pytest
from psycopg import sql

from bench.faults.proxy import TcpProxy
from tests import services
from tests.processes import free_port, ready, start_role, stop, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]

KEY = "e2e-" + secrets.token_hex(16)
LEASE = 3.0  # seconds; heartbeats every HEARTBEAT
HEARTBEAT = 0.5
REAPER_INTERVAL = 0.5  # how often the leader takes lapsed leases (workers/reaper.py)
RUN_SECONDS = 14.0  # the program's own length: longer than the partition
PAUSE = 3 * LEASE  # the partition: longer than the lease, shorter than the program


@dataclass
class Partition:
    """What the test saw of one partition (times in seconds from the pause)."""

    task_id: str
    lost_after: float | None  # the task left InProgress (the leader took the lease)
    fenced_after: float | None  # the worker's program was gone
    worker_alive: bool  # the worker process lived through the partition
    task: dict[str, Any]  # after the program would have ended
    history: list[dict[str, Any]]
    after: dict[str, Any]  # a task submitted once the partition healed
    worker_log: str


def _through(database_url: str, port: int) -> str:
    """`database_url` with its host and port replaced by the proxy's."""
    parts = urlsplit(database_url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _runs(worker: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The programs the worker runs now: the children of its sandbox zygotes."""
    try:
        zygotes = [
            p
            for p in psutil.Process(worker.pid).children(recursive=True)
            if p.name() == "tl-zygote"
        ]
        return [run for zygote in zygotes for run in zygote.children()]
    except psutil.NoSuchProcess:
        return []


def _task(client: httpx.Client, task_id: str) -> dict[str, Any]:
    response = client.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


def _submit(client: httpx.Client, **task: Any) -> str:
    response = client.post("/api/tasks", json=task)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _partition(client: httpx.Client, worker: subprocess.Popen[bytes], proxy: TcpProxy) -> Partition:
    task_id = _submit(
        client,
        language="python",
        code=f"import time\ntime.sleep({RUN_SECONDS})\nprint('late')",
        ttl_seconds=120,
        max_attempts=1,
    )
    wait_until(lambda: _task(client, task_id)["status"] == "InProgress", 60, "the task to start")
    wait_until(lambda: bool(_runs(worker)), 10, "the program to run")
    paused = time.monotonic()
    proxy.pause()
    lost_after: float | None = None
    fenced_after: float | None = None
    try:
        while (elapsed := time.monotonic() - paused) < PAUSE:
            if fenced_after is None and not _runs(worker):
                fenced_after = elapsed
            if lost_after is None and _task(client, task_id)["status"] != "InProgress":
                lost_after = elapsed
            time.sleep(0.05)
        worker_alive = worker.poll() is None
    finally:
        proxy.resume()
    # Whatever the worker does once it reaches the store again, it must record nothing:
    # wait until the program would have ended and the worker had time to try.
    wait_until(
        lambda: time.monotonic() - paused > RUN_SECONDS + 3 and not _runs(worker),
        RUN_SECONDS + 30,
        "the program's end",
    )
    task = _task(client, task_id)
    response = client.get(f"/api/tasks/{task_id}/history")
    assert response.status_code == 200, response.text
    history: list[dict[str, Any]] = response.json()["items"]
    after_id = _submit(client, language="python", code="print(6 * 7)", ttl_seconds=60)
    after = client.get(f"/api/tasks/{after_id}", params={"wait": 30}).json()
    return Partition(task_id, lost_after, fenced_after, worker_alive, task, history, after, "")


@pytest.fixture(scope="module")
def partition(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Partition]:
    """One worker, its PostgreSQL connections through the proxy, partitioned once while
    it runs a task (the api reaches PostgreSQL directly)."""
    problem = services.broker_problem()
    if problem:
        services.unavailable("RabbitMQ", problem)
    tmp_path = tmp_path_factory.mktemp("partition")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(database_url)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TASKLEDGER_")},
        "TASKLEDGER_DATABASE_URL": database_url,
        "TASKLEDGER_DATABASE_SCHEMA": schema,
        "TASKLEDGER_BROKER_URL": services.BROKER_URL,
        "TASKLEDGER_API_KEYS": f"acme:admin:{KEY}",
        "TASKLEDGER_DATA_DIR": str(tmp_path / "data"),
        "TASKLEDGER_LOG_DIR": str(tmp_path / "logs"),
        "TASKLEDGER_LEASE_SECONDS": str(LEASE),
        "TASKLEDGER_HEARTBEAT_SECONDS": str(HEARTBEAT),
    }
    proxy = TcpProxy(
        free_port(), f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}", tmp_path, env
    )
    proxy.start()
    port = free_port()
    api = start_role(["api", "--port", str(port)], env, tmp_path / "api.out")
    worker = start_role(
        ["worker", "--concurrency", "1", "--grace", "2"],
        {**env, "TASKLEDGER_DATABASE_URL": _through(database_url, proxy.listen_port)},
        tmp_path / "worker.out",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url), 60, "the api to be ready")
        with httpx.Client(
            base_url=url, headers={"Authorization": f"ApiKey {KEY}"}, timeout=60
        ) as client:
            seen = _partition(client, worker, proxy)
        logs = sorted((tmp_path / "logs").glob("worker-*.log"))
        seen.worker_log = "".join(p.read_text(errors="replace") for p in logs)
        yield seen
    finally:
        proxy.stop()  # resumes a paused proxy first
        for process in (worker, api):
            stop(process)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_the_leader_records_the_partitioned_attempt_as_worker_lost(partition: Partition) -> None:
    assert partition.lost_after is not None, (
        f"the attempt was not taken during a {PAUSE:g} s partition (lease {LEASE:g} s):"
        f" {partition.task}"
    )
    # One lease after the last renewal, and one look of the reaper.
    assert partition.lost_after <= LEASE + REAPER_INTERVAL + 3, partition.lost_after
    assert partition.task["status"] == "Failed", partition.task
    assert partition.task["error"]["kind"] == "worker_lost", partition.task


def test_the_partitioned_worker_records_nothing_once_it_is_back(partition: Partition) -> None:
    outcomes = [
        (e["type"], (e["data"].get("error") or {}).get("kind"))
        for e in partition.history
        if e["type"] in ("AttemptCompleted", "AttemptFailed", "TaskExpired", "TaskCancelled")
    ]
    assert outcomes == [("AttemptFailed", "worker_lost")], partition.history
    assert partition.task["result"] is None, partition.task


def test_the_worker_works_again_once_the_partition_heals(partition: Partition) -> None:
    assert partition.worker_alive, "the worker exited during the partition"
    assert partition.after["status"] == "Completed", partition.after
    assert partition.after["result"]["stdout"] == "42\n"


def test_the_partitioned_worker_kills_its_run_while_cut_off(partition: Partition) -> None:
    assert partition.fenced_after is not None, (
        f"the partitioned worker's program was still running {PAUSE:g} s into the partition"
        f" (lease {LEASE:g} s): the worker did not fence itself\n{partition.worker_log[-3000:]}"
    )
    # Gone by the time the leader takes the lease (and may hand the attempt to another
    # worker): the worker fences a heartbeat before its lease lapses by its own clock.
    # (0.5 s: how often this test looks at each.)
    assert partition.lost_after is not None
    assert partition.fenced_after <= partition.lost_after + 0.5, (
        partition.fenced_after,
        partition.lost_after,
    )
    assert partition.fenced_after <= LEASE + 2 * HEARTBEAT, partition.fenced_after
