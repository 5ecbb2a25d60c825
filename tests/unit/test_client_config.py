"""Where the client finds its URL and key (taskledger/client/config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from taskledger.client import ConfigurationError, config_file, resolve_config


def write_profiles(home: Path, text: str) -> Path:
    path = home / "taskledger" / "client.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


PROFILES = """
[profiles.default]
url = "http://default.example:8000/"
api_key = "default-key"

[profiles.prod]
url = "https://prod.example"
api_key = "prod-key"
"""


def test_arguments_beat_everything(tmp_path: Path) -> None:
    write_profiles(tmp_path, PROFILES)
    env = {
        "XDG_CONFIG_HOME": str(tmp_path),
        "TASKLEDGER_URL": "http://env",
        "TASKLEDGER_API_KEY": "k",
    }
    config = resolve_config("http://arg:1", "arg-key", environ=env)
    assert (config.url, config.api_key, config.url_source) == (
        "http://arg:1",
        "arg-key",
        "argument",
    )


def test_the_environment_beats_the_default_profile(tmp_path: Path) -> None:
    write_profiles(tmp_path, PROFILES)
    env = {"XDG_CONFIG_HOME": str(tmp_path), "TASKLEDGER_URL": "http://env:2"}
    config = resolve_config(environ=env)
    # Each value on its own: the URL from the environment, the key from the profile.
    assert (config.url, config.api_key) == ("http://env:2", "default-key")
    assert config.url_source == "TASKLEDGER_URL"
    assert config.key_source.startswith("profile 'default' of ")


def test_the_default_profile_without_a_trailing_slash(tmp_path: Path) -> None:
    write_profiles(tmp_path, PROFILES)
    config = resolve_config(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert (config.url, config.api_key) == ("http://default.example:8000", "default-key")


def test_a_profile_named_by_the_caller_beats_the_environment(tmp_path: Path) -> None:
    write_profiles(tmp_path, PROFILES)
    env = {
        "XDG_CONFIG_HOME": str(tmp_path),
        "TASKLEDGER_URL": "http://dev",
        "TASKLEDGER_API_KEY": "k",
    }
    config = resolve_config(profile="prod", environ=env)
    assert (config.url, config.api_key) == ("https://prod.example", "prod-key")


def test_taskledger_profile_names_the_profile(tmp_path: Path) -> None:
    write_profiles(tmp_path, PROFILES)
    env = {"XDG_CONFIG_HOME": str(tmp_path), "TASKLEDGER_PROFILE": "prod"}
    assert resolve_config(environ=env).url == "https://prod.example"


def test_a_named_profile_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    path = write_profiles(tmp_path, PROFILES)
    with pytest.raises(
        ConfigurationError, match=r"has no \[profiles.staging\] \(it has: default, prod\)"
    ):
        resolve_config(profile="staging", environ={"XDG_CONFIG_HOME": str(tmp_path)})
    path.unlink()
    with pytest.raises(ConfigurationError, match="does not exist"):
        resolve_config(environ={"XDG_CONFIG_HOME": str(tmp_path), "TASKLEDGER_PROFILE": "prod"})


def test_nothing_configured_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as missing:
        resolve_config(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    message = str(missing.value)
    assert message.startswith("no url and no api_key configured")
    for place in ("--url", "TASKLEDGER_URL", "TASKLEDGER_API_KEY", "'default'", "(no such file)"):
        assert place in message
    assert str(tmp_path / "taskledger" / "client.toml") in message


def test_a_missing_key_alone_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^no api_key configured"):
        resolve_config("http://x", environ={"XDG_CONFIG_HOME": str(tmp_path)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[profiles.default\n", "cannot read it"),
        ('[profiles.default]\nurl = 1\napi_key = "k"\n', "url must be a string"),
        ('[profiles.default]\nurl = "http://x"\ntoken = "k"\n', "unknown keys ['token']"),
        ('profiles = "x"\n', "no url and no api_key"),
    ],
)
def test_a_broken_client_toml_is_named(tmp_path: Path, text: str, message: str) -> None:
    write_profiles(tmp_path, text)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        resolve_config(environ={"XDG_CONFIG_HOME": str(tmp_path)})


def test_a_url_must_be_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="TASKLEDGER_URL: the URL must start with http"):
        resolve_config(environ={"TASKLEDGER_URL": "127.0.0.1:8000", "TASKLEDGER_API_KEY": "k"})


def test_the_file_is_under_xdg_config_home_or_home(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_file({"XDG_CONFIG_HOME": "/x"}) == Path("/x/taskledger/client.toml")
    monkeypatch.setenv("HOME", "/home/someone")
    assert config_file({}) == Path("/home/someone/.config/taskledger/client.toml")


def test_the_key_is_not_in_the_repr() -> None:
    config = resolve_config("http://x", "secret-key-value", environ={})
    assert "secret-key-value" not in repr(config)
