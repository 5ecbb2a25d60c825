from __future__ import annotations

from pathlib import Path

import pytest

from taskledger.settings import ConfigError, Settings, load_settings


def test_defaults_are_the_embedded_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "BROKER_URL", "API_KEYS", "DATA_DIR", "LOG_DIR"):
        monkeypatch.delenv(f"TASKLEDGER_{name}", raising=False)
    settings = load_settings()
    assert settings.database_url is None
    assert settings.broker_url == "memory://"
    assert settings.data_dir == Path(".taskledger")


def test_values_come_from_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEDGER_DATABASE_URL", "postgresql://u:pw@db:5432/ledger")
    monkeypatch.setenv("TASKLEDGER_DATA_DIR", "/var/lib/taskledger")
    settings = load_settings()
    assert settings.database_url == "postgresql://u:pw@db:5432/ledger"
    assert settings.data_dir == Path("/var/lib/taskledger")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKLEDGER_DATABASE_URL", "mysql://db/ledger"),
        ("TASKLEDGER_BROKER_URL", "redis://localhost"),
    ],
)
def test_a_wrong_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{variable}: must be"):
        load_settings()


def test_secrets_are_masked() -> None:
    settings = Settings(
        database_url="postgresql://app:hunter2@db/ledger",
        api_keys="acme:admin:k-123",  # type: ignore[arg-type]
    )
    shown = " ".join(settings.masked().values())
    assert "hunter2" not in shown
    assert "k-123" not in shown
    assert "postgresql://app:***@db/ledger" in shown
