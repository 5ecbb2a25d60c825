"""CPU seconds spent during a measurement, consumer by consumer: a process given by pid
with its whole tree (live descendants, and the children it already reaped: a Celery
pool's workers, a sandbox's programs); the PostgreSQL backends connected to the given
database, sampled at each mark, the benchmark's own (named `BENCH_APPLICATION`) left out;
RabbitMQ's ``beam.smp``, whoever it serves; the client (this process); and "other": the
host's busy time less all of those, i.e. noise. On a machine whose 2 cores everything
shares, the sum is what bounds throughput."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import psycopg

BENCH_APPLICATION = "taskledger-bench"  # application_name of the benchmark's connections


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


def host_busy() -> float:
    """CPU seconds the whole host has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8)) / os.sysconf("SC_CLK_TCK")


@dataclass
class Mark:
    processes: dict[str, float]
    postgres: dict[int, float]  # backend pid -> seconds
    rabbitmq: float
    client: float
    host: float


class CpuMeter:
    def __init__(self, processes: dict[str, int], database_url: str) -> None:
        self.processes = processes  # role -> pid
        self.database_url = database_url
        self.brokers = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]

    def mark(self) -> Mark:
        rabbit = 0.0
        for broker in self.brokers:
            with contextlib.suppress(psutil.Error):
                rabbit += _own(broker)
        return Mark(
            processes={role: tree_cpu(pid) for role, pid in self.processes.items()},
            postgres=_backends(self.database_url),
            rabbitmq=rabbit,
            client=time.process_time(),
            host=host_busy(),
        )

    @staticmethod
    def spent(before: Mark, after: Mark) -> dict[str, float]:
        """CPU seconds per consumer between two marks (and "other", not in the total)."""
        spent = {
            role: after.processes[role] - before.processes.get(role, 0.0)
            for role in after.processes
        }
        spent["PostgreSQL"] = sum(
            cpu - before.postgres.get(pid, 0.0) for pid, cpu in after.postgres.items()
        )
        spent["RabbitMQ"] = after.rabbitmq - before.rabbitmq
        spent["client"] = after.client - before.client
        spent = {k: max(0.0, v) for k, v in spent.items()}
        return spent | {"other": max(0.0, after.host - before.host - sum(spent.values()))}


@contextlib.contextmanager
def measured(processes: dict[str, int], database_url: str) -> Iterator[dict[str, float]]:
    """CPU seconds per consumer while the block runs (the dict is filled in at its end)."""
    meter = CpuMeter(processes, database_url)
    spent: dict[str, float] = {}
    before = meter.mark()
    yield spent
    spent.update(CpuMeter.spent(before, meter.mark()))
