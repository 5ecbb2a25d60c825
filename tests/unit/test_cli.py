from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from taskledger.cli import main


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TASKLEDGER_* variable of the shell running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("TASKLEDGER_"):
            monkeypatch.delenv(name)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`taskledger ARGS` in a process of its own, with only `env` configured."""
    return subprocess.run(
        [sys.executable, "-m", "taskledger", *args],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("dev", "config", "--config"):
        assert command in out


def test_config_prints_the_effective_configuration_masked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLEDGER_DATABASE_URL", "postgresql://app:hunter2@db/ledger")
    monkeypatch.setenv("TASKLEDGER_API_KEYS", "acme:admin:k-0123456789abcdef")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert 'database_url = "postgresql://app:***@db/ledger"  # env' in out
    assert 'api_keys = "***"  # env' in out
    assert "port = 8000  # default" in out
    assert "# metrics_port is unset" in out
    assert "hunter2" not in out
    assert "k-0123456789abcdef" not in out


def test_config_output_is_a_toml_file_of_the_effective_values(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "taskledger.toml"
    config.write_text('log_level = "debug"\nport = 9000\ndata_dir = "/srv/taskledger"\n')
    monkeypatch.setenv("TASKLEDGER_PORT", "9001")
    assert main(["--config", str(config), "config"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out) == {
        "database_schema": "public",
        "broker_url": "memory://",
        "data_dir": "/srv/taskledger",
        "log_dir": "logs",
        "log_level": "debug",
        "host": "127.0.0.1",
        "port": 9001,
        "lease_seconds": 10.0,
        "heartbeat_seconds": 2.0,
        "shutdown_seconds": 10.0,
        "checkpoint_minutes": 60.0,
        "webhook_retry_hours": 24.0,
        "sandbox": {"memory_mib": 512, "pids": 256, "cpus": 1.0, "tmp_mib": 64, "tmp_files": 16384},
    }
    assert f"file ({config})" in out.splitlines()[0]
    assert 'log_level = "debug"  # file' in out
    assert "port = 9001  # env" in out


def test_config_json_gives_value_source_and_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLEDGER_BROKER_URL", "amqp://mq:s3cret@rabbit/")
    assert main(["config", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config_file"] is None
    assert shown["settings"]["broker_url"] == {
        "value": "amqp://mq:***@rabbit/",
        "source": "env",
        "variable": "TASKLEDGER_BROKER_URL",
    }
    assert shown["settings"]["metrics_port"]["value"] is None


def test_config_is_accepted_before_and_after_any_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "taskledger.toml"
    config.write_text("port = 1234\n")
    for argv in (["--config", str(config), "config"], ["config", "--config", str(config)]):
        assert main(argv) == 0
        assert "port = 1234  # file" in capsys.readouterr().out


def test_the_config_variable_names_the_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "taskledger.toml"
    config.write_text("metrics_port = 9101\n")
    monkeypatch.setenv("TASKLEDGER_CONFIG", str(config))
    assert main(["config"]) == 0
    assert "metrics_port = 9101  # file" in capsys.readouterr().out


def test_a_bad_variable_fails_at_start_naming_it() -> None:
    result = run("config", env={"TASKLEDGER_BROKER_URL": "kafka://x"})
    assert result.returncode == 2
    assert "TASKLEDGER_BROKER_URL" in result.stderr


def test_an_unknown_key_in_the_config_file_fails_at_start(tmp_path: Path) -> None:
    config = tmp_path / "taskledger.toml"
    config.write_text("prot = 8000\n")
    result = run("api", "--config", str(config))
    assert result.returncode == 2
    assert f"unknown key `prot` in {config} (did you mean `port`?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_with_a_certificate_and_no_key_fails_naming_both(tmp_path: Path) -> None:
    result = run("api", "--ssl-certfile", str(tmp_path / "cert.pem"))
    assert result.returncode == 2
    for name in ("TASKLEDGER_SSL_CERTFILE", "TASKLEDGER_SSL_KEYFILE", "--ssl-keyfile"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_api_with_a_missing_certificate_fails_before_starting_anything(tmp_path: Path) -> None:
    missing = tmp_path / "cert.pem"
    result = run(
        "api",
        env={
            "TASKLEDGER_SSL_CERTFILE": str(missing),
            "TASKLEDGER_SSL_KEYFILE": str(tmp_path / "key.pem"),
            "TASKLEDGER_DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert result.returncode == 2
    assert f"TASKLEDGER_SSL_CERTFILE: cannot read {missing}: No such file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "no embedded database was started"


def test_a_log_dir_that_cannot_be_created_fails_at_start_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run("api", env={"TASKLEDGER_LOG_DIR": str(blocker / "logs")})
    assert result.returncode == 2
    assert f"TASKLEDGER_LOG_DIR: cannot create {blocker / 'logs'}: Not a directory" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["worker", "--concurrency", "0"], "--concurrency: must be 1 or more (got 0)"),
        (["worker", "--prefetch", "-3"], "--prefetch: must be 1 or more (got -3)"),
        (["dev", "--concurrency", "two"], "--concurrency: must be a whole number (got 'two')"),
    ],
)
def test_counts_below_one_are_refused_naming_the_option(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_the_parser_names_every_view_and_only_them() -> None:
    from projections import all_projections
    from taskledger.cli import PROJECTIONS

    assert tuple(sorted(all_projections())) == PROJECTIONS
