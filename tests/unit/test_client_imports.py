"""Importing taskledger.client brings nothing of the server: no settings, database driver,
web framework, event store, projections or workers (pyproject's import-linter contract
says the same of the code; this checks what Python actually loads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SERVER_ONLY = (
    "starlette",
    "psycopg",
    "psycopg_pool",
    "eventsourcing",
    "aio_pika",
    "uvicorn",
    "ledger",
    "projections",
    "workers",
    "taskledger.settings",
    "taskledger.bootstrap",
)


def test_importing_the_client_loads_no_server_module() -> None:
    script = "import json, sys\nimport taskledger.client\nprint(json.dumps(sorted(sys.modules)))\n"
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    modules = json.loads(loaded.stdout)
    server = [
        m for m in modules if m in SERVER_ONLY or m.startswith(tuple(f"{s}." for s in SERVER_ONLY))
    ]
    assert server == []
    assert "httpx" in modules
    assert "api.schemas" in modules  # the one definition of each shape
