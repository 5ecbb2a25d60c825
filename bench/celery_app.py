"""The Celery side of the comparison, configured as a Celery user would configure it.

RabbitMQ broker, PostgreSQL result backend through SQLAlchemy
(``db+postgresql+psycopg://``), ``task_acks_late=True``, everything else Celery's default
(prefetch multiplier 4, JSON serialisation, no publisher confirms). The worker runs
``celery -A bench.celery_app worker --pool prefork --concurrency 2`` with the settings
taken from the environment (``TASKLEDGER_BENCH_CELERY_*``); the benchmark's client calls
`configure` with the same values. Each run uses a queue of its own.

The tasks are what a Celery user would write for the comparison's scenarios:

- ``bench.noop(x)`` returns its argument;
- ``bench.python(code)`` runs untrusted code the usual way, in a fresh interpreter:
  ``subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=...)``
  (no sandbox: no namespaces, no rlimits, no separate user);
- ``bench.csharp(source)`` compiles with ``mcs`` (once per source: assemblies are cached
  by the SHA-256 of the source, as taskledger does) and runs ``mono``;
- ``bench.loop(marks)`` notes when it started (a file named after its task id in `marks`,
  holding ``time.time()``) and loops forever; the caller sets ``time_limit`` (hard).

Celery is imported through importlib so that this module type-checks where Celery is not
installed (it is a benchmark-only dependency: ``pip install -e .[bench]``).
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

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_BACKEND = "db+postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_QUEUE = "taskledger_bench"


def settings(broker: str, backend: str, queue: str) -> dict[str, Any]:
    return {
        "broker_url": broker,
        "result_backend": backend,
        "task_default_queue": queue,
        "task_acks_late": True,
        "broker_connection_retry_on_startup": True,
    }


celery: Any = importlib.import_module("celery")
app: Any = celery.Celery("taskledger_bench")
app.conf.update(
    settings(
        os.environ.get(BROKER_ENV, DEFAULT_BROKER),
        os.environ.get(BACKEND_ENV, DEFAULT_BACKEND),
        os.environ.get(QUEUE_ENV, DEFAULT_QUEUE),
    )
)


def configure(broker: str, backend: str, queue: str) -> None:
    """Point this process's app (the client) at the run's broker, backend and queue."""
    app.conf.update(settings(broker, backend, queue))


def noop(x: Any) -> Any:
    return x


def run_python(code: str, timeout: float = 60.0) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, timeout=timeout, check=False
    )
    return {
        "run_ms": (time.perf_counter() - started) * 1000,
        "exit_code": done.returncode,
        "stdout": done.stdout.decode(errors="replace"),
        "stderr": done.stderr.decode(errors="replace")[-2000:],
    }


def _cache_dir() -> Path:
    path = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir(), "taskledger-bench-cs"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_csharp(source: str, timeout: float = 60.0) -> dict[str, Any]:
    started = time.perf_counter()
    cache = _cache_dir()
    assembly = cache / f"{hashlib.sha256(source.encode()).hexdigest()}.exe"
    compiled = False
    if not assembly.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            program = Path(tmp, "program.cs")
            program.write_text(source)
            output = Path(tmp, "program.exe")
            done = subprocess.run(
                ["mcs", f"-out:{output}", str(program)],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            if done.returncode != 0:
                return {
                    "exit_code": done.returncode,
                    "stdout": "",
                    "stderr": done.stdout.decode(errors="replace")[-2000:],
                    "compiled": True,
                    "run_ms": None,
                    "task_ms": (time.perf_counter() - started) * 1000,
                }
            os.replace(output, assembly)  # atomic: same file system
            compiled = True
    run_started = time.perf_counter()
    done = subprocess.run(
        ["mono", str(assembly)], capture_output=True, timeout=timeout, check=False
    )
    ended = time.perf_counter()
    return {
        "exit_code": done.returncode,
        "stdout": done.stdout.decode(errors="replace"),
        "stderr": done.stderr.decode(errors="replace")[-2000:],
        "compiled": compiled,
        "run_ms": (ended - run_started) * 1000,
        "task_ms": (ended - started) * 1000,
    }


def loop_forever(task: Any, marks: str) -> None:
    Path(marks, str(task.request.id)).write_text(repr(time.time()))
    while True:
        pass


# Registered without decorator syntax: `app` is untyped (Any) here.
noop_task: Any = app.task(name="bench.noop")(noop)
python_task: Any = app.task(name="bench.python")(run_python)
csharp_task: Any = app.task(name="bench.csharp")(run_csharp)
loop_task: Any = app.task(name="bench.loop", bind=True, time_limit=1)(loop_forever)
