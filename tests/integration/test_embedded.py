"""The no-configuration default: an embedded PostgreSQL in the data directory."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ledger import AttemptResult, Status
from taskledger.bootstrap import bootstrap
from taskledger.settings import Settings


@pytest.mark.slow
def test_without_a_database_url_the_ledger_runs_on_an_embedded_postgres(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with bootstrap(settings) as services:
        assert str(tmp_path) in services.database_url
        task = services.ledger.submit(
            description="d", language="echo", code="", tenant="t", submitted_by="k"
        ).task
        assert services.ledger.get(task.id) == task
        pid = int((tmp_path / "data" / "postgres" / "postmaster.pid").read_text().split()[0])
        assert psutil.pid_exists(pid)
    # Stopped on exit, data kept: the next start finds the same task.
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with bootstrap(settings) as services:
        assert services.ledger.get(task.id) == task


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_output_at_the_cap_is_stored_over_the_unix_socket(tmp_path: Path) -> None:
    """One task's output at the 1 MiB cap, stdout and stderr: it wedged the embedded default
    (psycopg's pipeline mode over a Unix socket; see ledger.persistence.LedgerRecorder)."""
    settings = Settings(data_dir=tmp_path / "data")
    with bootstrap(settings) as services:
        ledger = services.ledger
        task = ledger.submit(
            description="d", language="python", code="", tenant="t", submitted_by="k"
        ).task
        ledger.start_attempt(task.id, 1, "w")
        big = AttemptResult("y" * (1 << 20), "e" * (1 << 20), 0, 1.0, truncated=True)
        assert ledger.complete_attempt(task.id, 1, big).status is Status.COMPLETED
        # And the store still answers: nothing is left half-sent on a pooled connection.
        again = ledger.submit(
            description="d", language="echo", code="", tenant="t", submitted_by="k"
        )
        assert ledger.get(again.task.id).status is Status.PENDING


HOLDER = """
import sys, time
from pathlib import Path
from taskledger.embedded import EmbeddedPostgres
EmbeddedPostgres(Path(sys.argv[1])).start()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_server_left_by_a_killed_process_is_adopted_and_stopped(tmp_path: Path) -> None:
    """SIGKILL leaves the embedded server running (its owner never let go): the next
    start adopts it, and its stop stops it."""
    data = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "ready"
    holder.kill()
    holder.wait(10)
    holder.stdout.close()
    pid = int((data / "postgres" / "postmaster.pid").read_text().split()[0])
    assert psutil.pid_exists(pid), "the killed process left its server running"
    with bootstrap(Settings(data_dir=data)) as services:
        services.ledger.submit(
            description="d", language="echo", code="", tenant="t", submitted_by="k"
        )
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(30)  # pg_ctl stop -w returned: it is going or gone
    assert not psutil.pid_exists(pid), "the adopted server was not stopped"
