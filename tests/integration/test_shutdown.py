"""SIGTERM ends every role within TASKLEDGER_SHUTDOWN_SECONDS, even when a call is stuck
(issue 12). The stuck call: the role's PostgreSQL is frozen (SIGSTOP, every one of its
processes) just before the signal, so every database call in flight or begun during the
stop waits for an answer that does not come."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from taskledger.shutdown import EXIT_STUCK, LAST_WORDS_SECONDS
from tests import services
from tests.integration.test_role_logs import lines_of, wait_for_line
from tests.private_postgres import PrivatePostgres
from tests.processes import free_port, role_env

BOUND = 3.0
KEY = "shutdown-admin-key-0123456789"


def server_processes(pgdata: Path) -> list[int]:
    """The postmaster of this data directory and all its children."""
    postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
    return [postmaster.pid, *(child.pid for child in postmaster.children(recursive=True))]


ROLES = [
    pytest.param("api", ["api", "--port", "{port}"], "serving the API", id="api"),
    pytest.param("worker", ["worker"], "worker started", id="worker", marks=pytest.mark.rabbitmq),
    pytest.param(
        "projections",
        ["projections", "run"],
        "projection leader: following the event log",
        id="projections",
    ),
    pytest.param("dev", ["dev", "--port", "{port}"], "serving the API", id="dev-embedded"),
]


@pytest.mark.parametrize(("role", "args", "ready"), ROLES)
def test_sigterm_ends_the_role_within_the_bound_with_its_database_frozen(
    role: str, args: list[str], ready: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = role_env(
        tmp_path,
        broker_url=services.broker_for(role),
        api_keys=f"acme:admin:{KEY}",
        shutdown_seconds=str(BOUND),
        database_schema=f"shutdown_{role}",
    )
    if role == "dev":
        pgdata = tmp_path / "data" / "postgres"
    else:
        postgres = request.getfixturevalue("postgres")
        env["TASKLEDGER_DATABASE_URL"] = postgres.url
        pgdata = postgres.pgdata
    log_file = tmp_path / "logs" / f"{role}-{datetime.now(UTC):%Y-%m-%d}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "taskledger", *(a.format(port=free_port()) for a in args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    frozen: list[int] = []
    try:
        wait_for_line(process, log_file, ready)
        time.sleep(0.5)  # its background loops are in their database calls by now
        frozen = server_processes(pgdata)
        PrivatePostgres.freeze(frozen)
        began = time.monotonic()
        process.terminate()
        try:
            process.wait(BOUND + LAST_WORDS_SECONDS + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise AssertionError(f"{role} did not stop within {BOUND} s of SIGTERM") from None
        took = time.monotonic() - began
    finally:
        PrivatePostgres.thaw(frozen)
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, EXIT_STUCK), process.returncode
    assert took < BOUND + LAST_WORDS_SECONDS + 2, f"{role} took {took:.1f} s to stop"
    if process.returncode == EXIT_STUCK:
        said = [line["msg"] for line in lines_of(log_file) if line["level"] == "error"]
        assert any("did not stop within" in msg for msg in said), said
    if role == "dev":
        # Its embedded server was told to stop (frozen, it could not yet): thawed, it
        # stops, and nothing of it is left running.
        deadline = time.monotonic() + 30
        while any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
            for pid in frozen[:1]
        ):
            assert time.monotonic() < deadline, "the embedded PostgreSQL is still running"
            time.sleep(0.2)
