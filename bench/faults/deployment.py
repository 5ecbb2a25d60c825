"""taskledger as the fault suite runs it: two ``taskledger api`` processes and two
``taskledger worker`` processes over the suite's own PostgreSQL and RabbitMQ
(bench/services.py). Each worker reaches PostgreSQL through a TCP proxy of its
own (bench/faults/proxy.py), which the suite pauses and kills to partition that worker;
the api processes connect directly.

The api holding the leader locks is found in ``pg_locks``: the session holding the
reaper's advisory lock, whose client port (``pg_stat_activity``) is one of that api's TCP
connections. Each process also gets ``PGAPPNAME`` (libpq's default application_name),
for a look at ``pg_stat_activity`` by hand.
"""

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
from bench.processes import HOST, ManagedProcess, free_port, taskledger_env, tool, wait_ready
from bench.services import PrivatePostgres, PrivateRabbitMQ

DATABASE = "taskledger"
SCHEMA = "public"
# The roles one api process leads (workers/dispatcher.py, workers/reaper.py,
# projections/runner.py): their advisory lock keys.
LEADER_LOCKS = {
    "reaper": f"taskledger.reaper.{SCHEMA}",
    "dispatcher": f"taskledger.dispatcher.{SCHEMA}",
    "task_status view": f"taskledger.projection.{SCHEMA}.task_status",
    "audit view": f"taskledger.projection.{SCHEMA}.audit",
}


@dataclass
class Role:
    """One taskledger process of the deployment and its restarts."""

    label: str  # api-1, api-2, worker-1, worker-2
    command: list[str]
    env: dict[str, str]
    port: int | None = None  # an api's
    process: ManagedProcess | None = None
    starts: int = 0
    pids: list[int] = field(default_factory=list)  # of every start

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class Deployment:
    def __init__(
        self,
        workdir: Path,
        postgres: PrivatePostgres,
        rabbitmq: PrivateRabbitMQ,
        progress: Callable[[str], None],
        *,
        concurrency: int,
        lease_seconds: float,
        heartbeat_seconds: float,
    ) -> None:
        self.workdir = workdir / "taskledger"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.postgres = postgres
        self.rabbitmq = rabbitmq
        self.progress = progress
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.key = secrets.token_hex(16)
        self.database_url = postgres.url.rsplit("/", 1)[0] + f"/{DATABASE}"
        upstream = f"{HOST}:{postgres.port}"
        self.proxies = {
            label: TcpProxy(free_port(), upstream, self.workdir / label, dict(os.environ))
            for label in ("worker-1", "worker-2")
        }
        base = taskledger_env(
            self.database_url,
            rabbitmq.url,
            self.key,
            self.workdir,
            DATABASE_SCHEMA=SCHEMA,
            LEASE_SECONDS=f"{lease_seconds:g}",
            HEARTBEAT_SECONDS=f"{heartbeat_seconds:g}",
        )
        base = {k: v for k, v in base.items() if not k.startswith("PG")}
        taskledger = tool("taskledger")
        self.apis = []
        for n in (1, 2):
            port = free_port()
            command = [taskledger, "api", "--host", HOST, "--port", str(port)]
            env = base | {"PGAPPNAME": f"tlfaults-api-{n}"}
            self.apis.append(Role(f"api-{n}", command, env, port))
        worker = [taskledger, "worker", "--concurrency", str(concurrency)]
        self.workers = [
            Role(
                label,
                worker,
                base
                | {
                    "PGAPPNAME": f"tlfaults-{label}",
                    "TASKLEDGER_DATABASE_URL": f"postgresql://postgres@{HOST}:"
                    f"{proxy.listen_port}/{DATABASE}",
                },
            )
            for label, proxy in self.proxies.items()
        ]
        self.counter = RunCounter(self.worker_pids)

    # -- processes --------------------------------------------------------------------------

    def create_database(self) -> None:
        with psycopg.connect(self.postgres.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def start(self) -> None:
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
        role.starts += 1
        role.process = ManagedProcess(
            f"{role.label}-{role.starts}", role.command, role.env, self.workdir, stop_timeout=40
        )
        role.process.start()
        role.pids.append(role.process.pid)

    def _start_api(self, api: Role) -> None:
        self._start(api)
        assert api.process is not None
        ready = wait_ready(api.process, api.url)
        self.progress(f"  {api.label} (pid {api.pid}) ready in {ready:.1f} s")

    def _wait_worker(self, worker: Role, timeout: float = 90.0) -> None:
        """Ready: every slot has a run listener, and its heartbeat is in /api/workers."""
        started = time.monotonic()
        while True:
            if not worker.alive():
                assert worker.process is not None
                raise RuntimeError(f"{worker.label} exited\n{worker.process.output_tail()}")
            if self.counter.slots(worker.label) >= self.concurrency and self._heartbeat(worker):
                break
            if time.monotonic() - started > timeout:
                assert worker.process is not None
                raise TimeoutError(
                    f"{worker.label} not ready in {timeout:g} s (slots with a listener:"
                    f" {self.counter.slots(worker.label)}; {self.counter.errors[-3:]})\n"
                    + worker.process.output_tail()
                )
            time.sleep(0.1)
        self.progress(
            f"  {worker.label} (pid {worker.pid}, concurrency {self.concurrency}"
            f", PostgreSQL through port {self.proxies[worker.label].listen_port})"
            f" ready in {time.monotonic() - started:.1f} s"
        )

    def _heartbeat(self, worker: Role) -> bool:
        for api in self.live_apis():
            try:
                response = httpx.get(f"{api.url}/api/workers", headers=self.headers(), timeout=5)
            except httpx.HTTPError:
                continue
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
        if self.rabbitmq.process is None or not self.rabbitmq.process.alive():
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

    def kill(self, role: Role) -> None:
        """SIGKILL the process (alone: its sandbox zygotes see its socket close)."""
        assert role.process is not None
        role.process.kill()

    def close(self) -> None:
        self.counter.close()
        for role in [*self.workers, *self.apis]:
            if role.process is not None:
                stopped = role.process.stop()
                if stopped.how not in ("SIGTERM", "exited before") or stopped.leftovers_killed:
                    self.progress(f"  {role.label}: stopped {stopped}")
        for proxy in self.proxies.values():
            proxy.stop()

    # -- who is who -------------------------------------------------------------------------

    def live_apis(self) -> list[Role]:
        return [api for api in self.apis if api.alive()]

    def worker_pids(self) -> dict[int, str]:
        return {w.pid: w.label for w in self.workers if w.alive()}

    def worker_label(self, worker_id: str) -> str:
        """The label of a worker id (`<host>-<pid>-<random>`; `<host>-<pid>` before), of
        this process or an earlier one."""
        for worker in self.workers:
            if any(f"-{pid}-" in f"{worker_id}-" for pid in worker.pids):
                return worker.label
        return worker_id

    def leader(self) -> tuple[Role | None, list[str]]:
        """The api holding the reaper's lock, and the roles it leads."""
        held: dict[str, str] = {}  # role -> label of the api holding its lock
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            for role, key in LEADER_LOCKS.items():
                row = conn.execute(
                    "SELECT a.client_port, a.application_name FROM pg_locks l"
                    " JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                    " AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext(%s)::bigint",
                    (key,),
                ).fetchone()
                if row is not None:
                    held[role] = self._api_of(row[0], str(row[1]))
        reaper = held.get("reaper", "")
        leader = next((a for a in self.apis if a.label == reaper), None)
        return leader, [role for role, label in held.items() if label == reaper]

    def _api_of(self, client_port: int | None, application_name: str) -> str:
        """The api whose session this is: by the session's TCP port on our side, else by
        the application_name PGAPPNAME gave it (if taskledger set none of its own)."""
        for api in self.live_apis():
            with contextlib.suppress(psutil.Error):
                ports = {c.laddr.port for c in psutil.Process(api.pid).net_connections("tcp")}
                if client_port in ports:
                    return api.label
        return application_name.removeprefix("tlfaults-")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"ApiKey {self.key}"}
