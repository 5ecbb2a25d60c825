"""taskledger as the fault suite runs it: two ``taskledger api`` and two ``taskledger
worker --concurrency 4`` over the suite's own PostgreSQL and RabbitMQ
(bench/faults/servers.py), each worker reaching PostgreSQL through a TCP proxy of its own
(bench/faults/proxy.py) that the suite pauses and kills; the apis connect directly."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg

from bench.faults.proxy import TcpProxy
from bench.faults.runs import RunCounter
from bench.faults.servers import PrivatePostgres, PrivateRabbitMQ
from bench.processes import HOST, ManagedProcess, free_port, taskledger_env, tool, wait_ready

DATABASE = "taskledger"
SCHEMA = "public"
LEASE_SECONDS = 10.0  # taskledger's defaults
HEARTBEAT_SECONDS = 2.0
CONCURRENCY = 4
# What one api leads (workers/dispatcher.py, workers/reaper.py, projections/runner.py):
# their advisory lock keys.
LEADER_LOCKS = {
    "reaper": f"taskledger.reaper.{SCHEMA}",
    "dispatcher": f"taskledger.dispatcher.{SCHEMA}",
    "task_status view": f"taskledger.projection.{SCHEMA}.task_status",
    "audit view": f"taskledger.projection.{SCHEMA}.audit",
}


@dataclass
class Role:
    """One taskledger process of the deployment, through its restarts."""

    label: str  # api-1, api-2, worker-1, worker-2
    command: list[str]
    env: dict[str, str]
    port: int | None = None  # an api's
    process: ManagedProcess | None = None
    pids: list[int] = field(default_factory=list)  # of every start

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class Deployment:
    def __init__(self, base: Path, progress: Callable[[str], None]) -> None:
        self.workdir = base / "taskledger"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.postgres = PrivatePostgres(base)
        self.rabbitmq = PrivateRabbitMQ(base, dict(os.environ))
        self.progress = progress
        self.key = secrets.token_hex(16)
        self.database_url = self.postgres.url.rsplit("/", 1)[0] + f"/{DATABASE}"
        upstream = f"{HOST}:{self.postgres.port}"
        self.proxies = {
            label: TcpProxy(free_port(), upstream, self.workdir / label, dict(os.environ))
            for label in ("worker-1", "worker-2")
        }
        env = taskledger_env(
            self.database_url,
            self.rabbitmq.url,
            self.key,
            self.workdir,
            DATABASE_SCHEMA=SCHEMA,
            LEASE_SECONDS=f"{LEASE_SECONDS:g}",
            HEARTBEAT_SECONDS=f"{HEARTBEAT_SECONDS:g}",
        )
        env = {k: v for k, v in env.items() if not k.startswith("PG")}
        taskledger = tool("taskledger")
        self.apis = []
        for n in (1, 2):
            port = free_port()
            command = [taskledger, "api", "--host", HOST, "--port", str(port)]
            self.apis.append(Role(f"api-{n}", command, env, port))
        worker = [taskledger, "worker", "--concurrency", str(CONCURRENCY)]
        self.workers = []
        for label, proxy in self.proxies.items():
            proxied = f"postgresql://postgres@{HOST}:{proxy.listen_port}/{DATABASE}"
            self.workers.append(Role(label, worker, env | {"TASKLEDGER_DATABASE_URL": proxied}))
        self.counter = RunCounter(self.worker_pids)

    def start(self) -> None:
        self.postgres.start()
        self.rabbitmq.start()
        with psycopg.connect(self.postgres.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        for proxy in self.proxies.values():
            proxy.start()
        for api in self.apis:  # api-1 first: it takes the leader locks
            self._start_api(api)
        for worker in self.workers:
            self._start(worker)
        self.counter.start()
        for worker in self.workers:
            self._wait_worker(worker)

    def _start(self, role: Role) -> None:
        if role.process is not None:
            role.process.stop()
        name = f"{role.label}-{len(role.pids) + 1}"
        role.process = ManagedProcess(name, role.command, role.env, self.workdir, stop_timeout=40)
        role.pids.append(role.process.start().pid)

    def _start_api(self, api: Role) -> None:
        self._start(api)
        assert api.process is not None
        ready = wait_ready(api.process, api.url)
        self.progress(f"  {api.label} (pid {api.pid}) ready in {ready:.1f} s")

    def _wait_worker(self, worker: Role, timeout: float = 90.0) -> None:
        """Ready: every slot has a run listener, and its heartbeat is in /api/workers."""
        started = time.monotonic()
        while self.counter.slots(worker.label) < CONCURRENCY or not self._heartbeat(worker):
            assert worker.process is not None
            if not worker.alive() or time.monotonic() - started > timeout:
                raise RuntimeError(
                    f"{worker.label} not ready (exited: {not worker.alive()}; slots with a"
                    f" listener: {self.counter.slots(worker.label)}; {self.counter.errors[-3:]})\n"
                    + worker.process.output_tail()
                )
            time.sleep(0.1)
        took = time.monotonic() - started
        self.progress(f"  {worker.label} (pid {worker.pid}) ready in {took:.1f} s")

    def _heartbeat(self, worker: Role) -> bool:
        for api in self.live_apis():
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(
                    f"{api.url}/api/workers", headers={"Authorization": f"ApiKey {self.key}"}
                )
                if response.status_code == 200:
                    listed = response.json().get("workers", [])
                    return any(w.get("pid") == worker.pid and w["state"] == "alive" for w in listed)
        return False

    def ensure_running(self) -> list[str]:
        """Start again whatever a fault left stopped; what was restarted."""
        restarted = []
        if not self.postgres.ready():
            self.postgres.start()
            restarted.append("postgres")
        if not self.rabbitmq.alive():
            self.rabbitmq.start()
            restarted.append("rabbitmq")
        for label, proxy in self.proxies.items():
            if proxy.paused:
                proxy.resume()
                restarted.append(f"proxy of {label} (resumed)")
            if proxy.process is None or not proxy.process.alive():
                proxy.start()
                restarted.append(f"proxy of {label}")
        for api in self.apis:
            if not api.alive():
                self._start_api(api)
                restarted.append(api.label)
        for worker in self.workers:
            if not worker.alive():
                self._start(worker)
                self._wait_worker(worker)
                restarted.append(worker.label)
        return restarted

    def close(self) -> None:
        self.counter.close()
        for role in [*self.workers, *self.apis]:
            if role.process is not None:
                stopped = role.process.stop()
                if stopped.how not in ("SIGTERM", "exited before") or stopped.leftovers_killed:
                    self.progress(f"  {role.label}: stopped {stopped}")
        for proxy in self.proxies.values():
            proxy.stop()
        self.rabbitmq.close()
        self.postgres.close()

    # -- who is who -------------------------------------------------------------------------

    def live_apis(self) -> list[Role]:
        return [api for api in self.apis if api.alive()]

    def worker_pids(self) -> dict[int, str]:
        return {w.pid: w.label for w in self.workers if w.alive()}

    def worker_label(self, worker_id: str) -> str:
        """The label of a worker id (`<host>-<pid>-<random>`), of any of its starts."""
        for worker in self.workers:
            if any(f"-{pid}-" in f"{worker_id}-" for pid in worker.pids):
                return worker.label
        return worker_id

    def leader(self) -> tuple[Role | None, list[str]]:
        """The api holding the reaper's lock (found by its session's client port), and
        the roles it leads."""
        held: dict[str, int] = {}  # role -> client port of the session holding its lock
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            for role, key in LEADER_LOCKS.items():
                row = conn.execute(
                    "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                    " AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext(%s)::bigint",
                    (key,),
                ).fetchone()
                if row is not None:
                    held[role] = row[0]
        for api in self.live_apis():
            with contextlib.suppress(psutil.Error):
                ports = {c.laddr.port for c in psutil.Process(api.pid).net_connections("tcp")}
                if held.get("reaper") in ports:
                    return api, [role for role, port in held.items() if port in ports]
        return None, []
