from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from taskledger.loading import load_settings
from taskledger.settings import LOG_LEVELS, ConfigError, Settings, mask_url

KEY = "acme:admin:k-0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TASKLEDGER_* variable of the shell running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("TASKLEDGER_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_setup() -> None:
    settings = load_settings()
    assert settings.database_url is None
    assert settings.broker_url == "memory://"
    assert settings.data_dir == Path(".taskledger")
    assert (settings.host, settings.port, settings.log_level) == ("127.0.0.1", 8000, "info")
    assert (settings.ssl_certfile, settings.ssl_keyfile, settings.metrics_port) == (None,) * 3
    assert {settings.source(name) for name in Settings.model_fields} == {"default"}


def test_values_come_from_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEDGER_DATABASE_URL", "postgresql://u:pw@db:5432/ledger")
    monkeypatch.setenv("TASKLEDGER_DATA_DIR", "/var/lib/taskledger")
    monkeypatch.setenv("TASKLEDGER_METRICS_PORT", "9101")
    settings = load_settings()
    assert settings.database_url == "postgresql://u:pw@db:5432/ledger"
    assert settings.data_dir == Path("/var/lib/taskledger")
    assert settings.metrics_port == 9101
    assert settings.source("metrics_port") == "env"


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEDGER_METRICS_PORT", "")
    monkeypatch.setenv("TASKLEDGER_DATABASE_URL", "")
    settings = load_settings()
    assert (settings.metrics_port, settings.database_url) == (None, None)


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("TASKLEDGER_DATABASE_URL", "mysql://db/ledger", "must be a postgresql://"),
        ("TASKLEDGER_BROKER_URL", "redis://localhost", "must be amqp://"),
        ("TASKLEDGER_PORT", "http", "must be a port number, 1-65535"),
        ("TASKLEDGER_METRICS_PORT", "0", "must be a port number, 1-65535"),
        ("TASKLEDGER_LOG_LEVEL", "loud", "must be one of debug, info, warning, error"),
        ("TASKLEDGER_DATABASE_SCHEMA", "Public", "must be a lower-case PostgreSQL name"),
        ("TASKLEDGER_HOST", "http://0.0.0.0", "must be a host name"),
        ("TASKLEDGER_API_KEYS", "acme:boss:k-0123456789abcdef", "entry 1 has role 'boss'"),
    ],
)
def test_a_wrong_value_names_its_variable_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{variable}: {allowed}"):
        load_settings()


def test_every_wrong_value_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEDGER_PORT", "70000")
    monkeypatch.setenv("TASKLEDGER_LOG_LEVEL", "chatty")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "TASKLEDGER_PORT: must be a port number, 1-65535 (got '70000')" in str(raised.value)
    assert "TASKLEDGER_LOG_LEVEL: must be one of" in str(raised.value)


def test_a_wrong_api_key_list_does_not_echo_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEDGER_API_KEYS", "acme:admin:short-secret")
    with pytest.raises(ConfigError, match=r"^TASKLEDGER_API_KEYS: entry 1") as raised:
        load_settings()
    assert "short-secret" not in str(raised.value)


def test_a_wrong_url_is_echoed_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEDGER_BROKER_URL", "redis://app:hunter2@cache/0")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "redis://app:***@cache/0" in str(raised.value)
    assert "hunter2" not in str(raised.value)


# -- ports and log levels, over many inputs ------------------------------------------------------


@given(st.integers().filter(lambda n: not 1 <= n <= 65535))
def test_a_port_outside_1_to_65535_is_refused_naming_the_variable(port: int) -> None:
    for name in ("PORT", "METRICS_PORT"):
        with (
            mock.patch.dict(os.environ, {f"TASKLEDGER_{name}": str(port)}),
            pytest.raises(ConfigError, match=f"^TASKLEDGER_{name}: must be a port number"),
        ):
            load_settings()


@given(st.integers(1, 65535))
def test_every_port_from_1_to_65535_is_accepted(port: int) -> None:
    with mock.patch.dict(
        os.environ, {"TASKLEDGER_PORT": str(port), "TASKLEDGER_METRICS_PORT": f" {port} "}
    ):
        settings = load_settings()
    assert settings.port == settings.metrics_port == port


@given(
    st.text(st.characters(codec="utf-8"), max_size=12).filter(
        lambda s: s.strip().lower() not in LOG_LEVELS
    )
)
def test_an_unknown_log_level_is_refused(level: str) -> None:
    # The environment cannot hold NUL; such a level can still come from the file.
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "taskledger.toml"
        config.write_text(f"log_level = {toml_string(level)}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=f"^`log_level` in {config}: must be one of"):
            load_settings(config_file=config)


@given(st.sampled_from(LOG_LEVELS), st.sampled_from([str.upper, str.title, str.lower]))
def test_log_levels_are_read_in_any_case(level: str, case: object) -> None:
    assert callable(case)
    with mock.patch.dict(os.environ, {"TASKLEDGER_LOG_LEVEL": case(level)}):
        assert load_settings().log_level == level


@given(
    st.one_of(
        st.integers(),
        st.booleans(),
        st.floats(allow_nan=False),
        st.text(st.characters(codec="utf-8"), max_size=8),
    )
)
def test_a_port_in_the_file_is_an_integer_from_1_to_65535(value: object) -> None:
    valid = (
        not isinstance(value, bool | float)
        and str(value).strip().isascii()
        and str(value).strip().isdigit()
        and 1 <= int(str(value)) <= 65535
    )
    literal = toml_string(value) if isinstance(value, str) else str(value).lower()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "taskledger.toml"
        config.write_text(f"port = {literal}\n", encoding="utf-8")
        if valid:
            assert load_settings(config_file=config).port == int(str(value))
        else:
            with pytest.raises(ConfigError, match=f"^`port` in {config}: must be a port number"):
                load_settings(config_file=config)


def toml_string(text: str) -> str:
    escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return f'"{escaped}"'


# -- the TOML file and precedence ------------------------------------------------------------------


def test_a_toml_file_sets_values_by_their_lower_case_names(tmp_path: Path) -> None:
    config = write(
        tmp_path / "taskledger.toml",
        'database_url = "postgresql://app:pw@db/ledger"\n'
        "port = 8443\n"
        f'api_keys = "{KEY}"\n'
        'log_dir = "/var/log/taskledger"\n',
    )
    settings = load_settings(config_file=config)
    assert settings.database_url == "postgresql://app:pw@db/ledger"
    assert settings.port == 8443
    assert settings.log_dir == Path("/var/log/taskledger")
    assert settings.api_keys is not None
    assert settings.api_keys.get_secret_value() == KEY
    assert settings.source("port") == "file"
    assert settings.config_file == config


def test_flags_beat_variables_beat_the_file_beats_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "taskledger.toml",
        'host = "file.example"\nport = 1111\nlog_level = "warning"\n',
    )
    monkeypatch.setenv("TASKLEDGER_PORT", "2222")
    monkeypatch.setenv("TASKLEDGER_HOST", "env.example")
    settings = load_settings({"host": "flag.example", "port": None}, config_file=config)
    assert (settings.host, settings.port, settings.log_level, settings.broker_url) == (
        "flag.example",
        2222,
        "warning",
        "memory://",
    )
    assert [settings.source(n) for n in ("host", "port", "log_level", "broker_url")] == [
        "flag",
        "env",
        "file",
        "default",
    ]
    assert settings.origin("host") == "--host"
    assert settings.origin("port") == "TASKLEDGER_PORT"
    assert settings.origin("log_level") == f"`log_level` in {config}"


def test_taskledger_config_names_the_file_unless_config_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_variable = write(tmp_path / "a.toml", "port = 1111\n")
    from_flag = write(tmp_path / "b.toml", "port = 2222\n")
    monkeypatch.setenv("TASKLEDGER_CONFIG", str(from_variable))
    assert load_settings().port == 1111
    assert load_settings(config_file=from_flag).port == 2222


def test_an_unknown_key_in_the_file_is_an_error_naming_key_and_file(tmp_path: Path) -> None:
    config = write(tmp_path / "taskledger.toml", 'databse_url = "postgresql://db/x"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config_file=config)
    assert str(raised.value) == (
        f"unknown key `databse_url` in {config} (did you mean `database_url`?)"
    )


@pytest.mark.parametrize(
    "text",
    [
        "TASKLEDGER_PORT = 1\n",  # variable names are not keys
        "PORT = 1\n",  # keys are lower case
        '[database]\nurl = "postgresql://db/x"\n',  # flat: no sections
    ],
)
def test_only_the_lower_case_setting_names_are_keys(tmp_path: Path, text: str) -> None:
    config = write(tmp_path / "taskledger.toml", text)
    with pytest.raises(ConfigError, match=f"^unknown key `.*` in {config}"):
        load_settings(config_file=config)


def test_a_wrong_value_in_the_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "taskledger.toml", 'broker_url = "kafka://x"\n')
    with pytest.raises(ConfigError, match=f"^`broker_url` in {config}: must be amqp://"):
        load_settings(config_file=config)


def test_a_wrong_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--port: must be a port number, 1-65535"):
        load_settings({"port": 0})


def test_a_file_that_is_missing_or_not_toml_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=f"^configuration file {missing}: cannot read it"):
        load_settings(config_file=missing)
    broken = write(tmp_path / "broken.toml", "port = \n")
    with pytest.raises(ConfigError, match=f"^configuration file {broken}: not valid TOML"):
        load_settings(config_file=broken)


# -- secrets --------------------------------------------------------------------------------------


def test_secrets_are_masked() -> None:
    settings = Settings(
        database_url="postgresql://app:hunter2@db/ledger",
        broker_url="amqp://mq:s3cr3t-pw@rabbit:5672/",
        api_keys=KEY,  # type: ignore[arg-type]
    )
    shown = " ".join(str(v) for v in settings.masked().values())
    for secret in ("hunter2", "s3cr3t-pw", "k-0123456789abcdef"):
        assert secret not in shown
    assert "postgresql://app:***@db/ledger" in shown
    assert "amqp://mq:***@rabbit:5672/" in shown
    assert settings.masked()["api_keys"] == "***"


@given(st.text(min_size=1), st.sampled_from(["postgresql", "amqp"]))
def test_a_masked_url_never_shows_its_password(password: str, scheme: str) -> None:
    # Even one an operator forgot to percent-encode (`/`, `@`, `[`, ...).
    masked = mask_url(f"{scheme}://app:{password}@db.internal:5432/ledger")
    assert masked == f"{scheme}://app:***@db.internal:5432/ledger"


@pytest.mark.parametrize(
    "url", ["memory://", "amqp://rabbit:5672/", "postgresql://app@db/x", "postgresql:///x"]
)
def test_a_url_without_a_password_is_shown_as_it_is(url: str) -> None:
    assert mask_url(url) == url


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    issued = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def test_a_certificate_without_its_key_is_an_error_naming_both(
    monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]
) -> None:
    monkeypatch.setenv("TASKLEDGER_SSL_CERTFILE", str(certificate[0]))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    for name in ("TASKLEDGER_SSL_CERTFILE", "TASKLEDGER_SSL_KEYFILE", "--ssl-keyfile"):
        assert name in message
    # Together, from different places, they make a pair.
    settings = load_settings({"ssl_keyfile": certificate[1]})
    assert settings.tls_files() == certificate


def test_tls_files_that_do_not_load_are_errors_naming_their_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    monkeypatch.setenv("TASKLEDGER_SSL_KEYFILE", str(key))
    missing = load_settings({"ssl_certfile": tmp_path / "nope.pem"})
    with pytest.raises(
        ConfigError, match=r"^--ssl-certfile: cannot read .*nope\.pem: No such file"
    ):
        missing.tls_files()
    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    mismatched = load_settings({"ssl_certfile": cert, "ssl_keyfile": other_key})
    with pytest.raises(ConfigError, match=r"^--ssl-certfile, --ssl-keyfile: not a PEM"):
        mismatched.tls_files()
    not_pem = write(tmp_path / "junk.pem", "not a certificate\n")
    junk = load_settings({"ssl_certfile": not_pem})
    with pytest.raises(ConfigError, match="TASKLEDGER_SSL_KEYFILE: not a PEM certificate"):
        junk.tls_files()


@pytest.mark.parametrize("text", ["\u00b2", "\u0663\u0663", "\uff18\uff10"])
def test_a_port_of_digits_other_than_ascii_is_refused_as_a_port(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "taskledger.toml"
        config.write_text(f'port = "{text}"\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=f"^`port` in {config}: must be a port number"):
            load_settings(config_file=config)


# -- the [sandbox] section ---------------------------------------------------------------------


def test_sandbox_defaults_and_their_sources() -> None:
    settings = load_settings()
    sandbox = settings.sandbox
    assert (sandbox.memory_mib, sandbox.pids, sandbox.cpus) == (512, 256, 1.0)
    assert (sandbox.tmp_mib, sandbox.tmp_files, sandbox.allow_unisolated) == (64, 16_384, None)
    assert settings.source("sandbox.memory_mib") == "default"
    assert settings.masked()["sandbox.memory_mib"] == 512


def test_sandbox_settings_come_from_the_section_and_nested_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "taskledger.toml",
        "port = 9000\n[sandbox]\nmemory_mib = 1024\ncpus = 0.5\nallow_unisolated = true\n",
    )
    monkeypatch.setenv("TASKLEDGER_SANDBOX__MEMORY_MIB", "2048")
    settings = load_settings(config_file=config)
    assert settings.sandbox.memory_mib == 2048
    assert settings.sandbox.cpus == 0.5
    assert settings.sandbox.allow_unisolated is True
    assert settings.sandbox.pids == 256
    assert settings.source("sandbox.memory_mib") == "env"
    assert settings.source("sandbox.cpus") == "file"
    assert settings.source("sandbox.pids") == "default"
    assert settings.origin("sandbox.memory_mib") == "TASKLEDGER_SANDBOX__MEMORY_MIB"
    assert settings.origin("sandbox.cpus") == f"`cpus` in [sandbox] of {config}"


def test_a_wrong_sandbox_value_names_its_variable_or_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLEDGER_SANDBOX__PIDS", "3")
    with pytest.raises(ConfigError, match=r"^TASKLEDGER_SANDBOX__PIDS: .*16"):
        load_settings()
    monkeypatch.delenv("TASKLEDGER_SANDBOX__PIDS")
    config = write(tmp_path / "taskledger.toml", '[sandbox]\ncpus = "lots"\n')
    with pytest.raises(ConfigError, match=rf"^`cpus` in \[sandbox\] of {config}: "):
        load_settings(config_file=config)


def test_an_unknown_sandbox_key_is_named_with_the_known_ones(tmp_path: Path) -> None:
    config = write(tmp_path / "taskledger.toml", "[sandbox]\nmemory = 1024\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config_file=config)
    message = str(raised.value)
    assert message.startswith(f"`memory` in [sandbox] of {config}: no such setting (known: ")
    assert "memory_mib" in message
