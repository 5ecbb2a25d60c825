"""With RabbitMQ out of reach the API still accepts tasks: they wait in the ledger, and the
dispatcher sends them once the broker is back (issue 12). RabbitMQ is reached through a
TCP proxy (pproxy, bench/faults/proxy.py) that the test starts only after submitting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from bench.faults.proxy import TcpProxy
from taskledger.bootstrap import bootstrap
from taskledger.settings import Settings
from tests import services
from tests.integration.test_outages import HEADERS, KEY, Instant
from tests.processes import free_port

pytestmark = [pytest.mark.rabbitmq]


@pytest.mark.asyncio
async def test_tasks_submitted_while_rabbitmq_is_unreachable_run_once_it_is_back(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    upstream = services.broker_problem()
    if upstream:
        services.unavailable("RabbitMQ", upstream)
    port = free_port()
    broker = services.BROKER_URL.replace(
        f"@{httpx.URL(services.BROKER_URL).host}:{httpx.URL(services.BROKER_URL).port or 5672}",
        f"@127.0.0.1:{port}",
    )
    assert broker != services.BROKER_URL
    settings = Settings(
        database_url=database_url,
        database_schema=schema,
        broker_url=broker,
        data_dir=tmp_path / "data",
        api_keys=f"acme:admin:{KEY}",  # type: ignore[arg-type]
    )
    target = httpx.URL(services.BROKER_URL)
    proxy = TcpProxy(port, f"{target.host}:{target.port or 5672}", tmp_path, env={})
    with bootstrap(settings, executors={"python": Instant()}) as service:
        roles = [*service.singleton_roles(), service.worker(concurrency=2).run]
        service.start_projections(poll_interval=0.1)
        stop = asyncio.Event()
        running = [asyncio.create_task(role(stop)) for role in roles]
        transport = httpx.ASGITransport(app=service.api_app(), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://broker-outage.test", headers=HEADERS
            ) as client:
                accepted = []
                for _ in range(3):
                    response = await client.post(
                        "/api/tasks", json={"language": "python", "code": "1", "ttl_seconds": 120}
                    )
                    assert response.status_code == 201, response.text
                    accepted.append(response.json()["id"])
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text  # still takes traffic
                assert ready.json()["status"] == "degraded"
                assert ready.json()["checks"]["broker"] != "ok"
                for task_id in accepted:
                    task = (await client.get(f"/api/tasks/{task_id}")).json()
                    assert task["status"] == "Pending", task

                proxy.start()
                deadline = time.monotonic() + 60
                statuses: list[str] = []
                while time.monotonic() < deadline:
                    statuses = [
                        (await client.get(f"/api/tasks/{task_id}")).json()["status"]
                        for task_id in accepted
                    ]
                    if statuses == ["Completed"] * 3:
                        break
                    await asyncio.sleep(0.1)
                assert statuses == ["Completed"] * 3, statuses
                assert (await client.get("/readyz")).json()["status"] == "ok"
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 30)
            await service.broker.close()
            proxy.stop()
