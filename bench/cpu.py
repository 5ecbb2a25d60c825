"""CPU seconds spent by one system during a scenario, process by process.

A system's processes are counted with their whole trees (live descendants, and the
children they already reaped: a Celery pool's forked workers, a sandbox's programs).
PostgreSQL is counted as the backends connected to the system's own database (sampled
before and after; a backend that ends in between loses what it spent since the first
sample, which pooled, long-lived connections rarely do; the benchmark's own connections are
left out); RabbitMQ as its `beam.smp`
processes, whoever they serve (other work on the host adds to it); the client as this
process. The sum divided by the tasks is the machine's CPU per task, on a machine whose
2 cores everything shares.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psutil
import psycopg

# The application_name of the benchmark's own database connections (its polls, the lag
# monitor): their backends are not counted as the system's.
BENCH_APPLICATION = "taskledger-bench"


def _own(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid`, its reaped children and its live descendants."""
    try:
        root = psutil.Process(pid)
        total = _own(root)
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += _own(child)  # a live child's reaped children are no one else's
        return total
    except psutil.Error:
        return 0.0


def _backends(database_url: str) -> dict[int, float]:
    with psycopg.connect(
        database_url, autocommit=True, connect_timeout=5, application_name=BENCH_APPLICATION
    ) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name IS DISTINCT FROM %s",
            (BENCH_APPLICATION,),
        ).fetchall()
    result = {}
    for (pid,) in rows:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(int(pid)).cpu_times()
            result[int(pid)] = float(times.user + times.system)
    return result


def _brokers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]


@dataclass
class Mark:
    at: float
    processes: dict[str, float]
    postgres: dict[int, float]
    rabbitmq: float
    client: float


class CpuMeter:
    def __init__(self, processes: dict[str, int], database_url: str) -> None:
        self.processes = processes  # role -> pid
        self.database_url = database_url
        self.brokers = _brokers()

    def mark(self) -> Mark:
        rabbit = 0.0
        for broker in self.brokers:
            with contextlib.suppress(psutil.Error):
                rabbit += _own(broker)
        return Mark(
            at=time.perf_counter(),
            processes={role: tree_cpu(pid) for role, pid in self.processes.items()},
            postgres=_backends(self.database_url),
            rabbitmq=rabbit,
            client=time.process_time(),
        )

    @staticmethod
    def spent(before: Mark, after: Mark) -> dict[str, float]:
        """CPU seconds per consumer between two marks."""
        spent = {
            role: after.processes[role] - before.processes.get(role, 0.0)
            for role in after.processes
        }
        spent["PostgreSQL"] = sum(
            cpu - before.postgres.get(pid, 0.0) for pid, cpu in after.postgres.items()
        )
        spent["RabbitMQ"] = after.rabbitmq - before.rabbitmq
        spent["client"] = after.client - before.client
        return {k: max(0.0, v) for k, v in spent.items()}
