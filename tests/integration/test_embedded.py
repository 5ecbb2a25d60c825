"""The no-configuration default: an embedded PostgreSQL in the data directory."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

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
