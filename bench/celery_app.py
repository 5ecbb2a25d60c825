"""The Celery side of the comparison, configured as a Celery user would: RabbitMQ broker,
PostgreSQL result backend through SQLAlchemy, ``task_acks_late=True``, everything else
Celery's default (prefetch multiplier 4, JSON, no publisher confirms). The worker
(``celery -A bench.celery_app worker``) reads the run's settings from the environment
(``TASKLEDGER_BENCH_CELERY_*``); the client calls `configure` with the same values. The
tasks are what a Celery user would write: ``subprocess.run([sys.executable, "-I", "-c",
code])`` for untrusted code (no sandbox), ``mcs`` once per source (assemblies cached by
SHA-256, as taskledger does) then ``mono``, and a loop with a hard ``time_limit`` that
first notes when it started. Celery is imported through importlib so that this module
type-checks where Celery is not installed (a bench-only dependency).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BROKER_ENV = "TASKLEDGER_BENCH_CELERY_BROKER"
BACKEND_ENV = "TASKLEDGER_BENCH_CELERY_BACKEND"
QUEUE_ENV = "TASKLEDGER_BENCH_CELERY_QUEUE"
CACHE_ENV = "TASKLEDGER_BENCH_CELERY_CSHARP_CACHE"


def configure(broker: str, backend: str, queue: str) -> None:
    """Point this process's app at the run's broker, backend and queue."""
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        task_default_queue=queue,
        task_acks_late=True,
        broker_connection_retry_on_startup=True,
    )


app: Any = importlib.import_module("celery").Celery("taskledger_bench")
configure(
    os.environ.get(BROKER_ENV, "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get(BACKEND_ENV, "db+postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    os.environ.get(QUEUE_ENV, "taskledger_bench"),
)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def _output(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    return {
        "exit_code": done.returncode,
        "stdout": done.stdout.decode(errors="replace"),
        "stderr": done.stderr.decode(errors="replace")[-2000:],
    }


def noop(x: Any) -> Any:
    return x


def run_python(code: str, timeout: float = 60.0) -> dict[str, Any]:
    started = time.perf_counter()
    command = [sys.executable, "-I", "-c", code]
    done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    return {"run_ms": _ms(started), **_output(done)}


def run_csharp(source: str, timeout: float = 60.0) -> dict[str, Any]:
    started = time.perf_counter()
    cache = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir(), "taskledger-bench-cs"))
    cache.mkdir(parents=True, exist_ok=True)
    assembly = cache / f"{hashlib.sha256(source.encode()).hexdigest()}.exe"
    compiled = not assembly.exists()
    if compiled:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            program, output = Path(tmp, "program.cs"), Path(tmp, "program.exe")
            program.write_text(source)
            command = ["mcs", f"-out:{output}", str(program)]
            done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
            if done.returncode != 0:
                return {"run_ms": None, "task_ms": _ms(started), **_output(done)}
            os.replace(output, assembly)  # atomic: same file system
    run_started = time.perf_counter()
    done = subprocess.run(
        ["mono", str(assembly)], capture_output=True, timeout=timeout, check=False
    )
    run_ms = _ms(run_started)
    return {"compiled": compiled, "run_ms": run_ms, "task_ms": _ms(started), **_output(done)}


def loop_forever(task: Any, marks: str) -> None:
    Path(marks, str(task.request.id)).write_text(repr(time.time()))
    while True:
        pass


# Registered without decorator syntax: `app` is untyped (Any) here.
noop_task: Any = app.task(name="bench.noop")(noop)
python_task: Any = app.task(name="bench.python")(run_python)
csharp_task: Any = app.task(name="bench.csharp")(run_csharp)
loop_task: Any = app.task(name="bench.loop", bind=True, time_limit=1)(loop_forever)
