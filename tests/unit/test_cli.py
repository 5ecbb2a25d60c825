from __future__ import annotations

import subprocess
import sys

import pytest

from taskledger.cli import main


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("dev", "config"):
        assert command in out


def test_config_prints_the_effective_configuration_masked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLEDGER_DATABASE_URL", "postgresql://app:hunter2@db/ledger")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "TASKLEDGER_DATABASE_URL=postgresql://app:***@db/ledger" in out
    assert "hunter2" not in out


def test_a_bad_variable_fails_at_start_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskledger", "config"],
        env={"TASKLEDGER_BROKER_URL": "kafka://x", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "TASKLEDGER_BROKER_URL" in result.stderr
