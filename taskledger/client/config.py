"""Where a client finds its server and its key.

Strongest first: the arguments (`url=`, `api_key=`); a profile named by the caller
(`profile=`, the CLI's `--profile`); the environment (TASKLEDGER_URL, TASKLEDGER_API_KEY);
the profile named by TASKLEDGER_PROFILE, else `default`. Profiles are tables of
`$XDG_CONFIG_HOME/taskledger/client.toml` (`~/.config/…` without it):

    [profiles.default]
    url = "http://127.0.0.1:8000"
    api_key = "tlk_…"

A profile the caller names explicitly beats the environment: `--profile prod` in a shell
that exports a development TASKLEDGER_URL must not quietly talk to development.

Nothing here reads the server's settings (taskledger/settings.py): a client needs no
database URL.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskledger.client.errors import ConfigurationError

URL_VARIABLE = "TASKLEDGER_URL"
KEY_VARIABLE = "TASKLEDGER_API_KEY"
PROFILE_VARIABLE = "TASKLEDGER_PROFILE"
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str = field(repr=False)
    # Where each came from, for error messages: "argument", "TASKLEDGER_URL", "profile …".
    url_source: str = "argument"
    key_source: str = "argument"


def config_file(environ: Mapping[str, str] | None = None) -> Path:
    """The client's TOML file: $XDG_CONFIG_HOME/taskledger/client.toml, or ~/.config/…"""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "taskledger" / "client.toml"


def resolve_config(
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> ClientConfig:
    """The URL and key to use; a `ConfigurationError` saying where it looked when one is
    missing."""
    env = os.environ if environ is None else environ
    path = config_file(env)
    named = profile is not None
    name = profile or env.get(PROFILE_VARIABLE) or DEFAULT_PROFILE
    # The default profile may be absent; one the caller or TASKLEDGER_PROFILE named may not.
    table = _profile(path, name, required=named or PROFILE_VARIABLE in env)
    where = f"profile {name!r} of {path}"
    sources: list[tuple[str, dict[str, Any]]] = [("argument", {"url": url, "api_key": api_key})]
    environment = {"url": env.get(URL_VARIABLE), "api_key": env.get(KEY_VARIABLE)}
    if named:
        sources += [(where, table), ("environment", environment)]
    else:
        sources += [("environment", environment), (where, table)]
    found: dict[str, tuple[str, str]] = {}
    for source, values in sources:
        for key in ("url", "api_key"):
            value = values.get(key)
            if key not in found and value:
                if not isinstance(value, str):
                    raise ConfigurationError(f"{where}: {key} must be a string")
                variable = URL_VARIABLE if key == "url" else KEY_VARIABLE
                found[key] = (value, variable if source == "environment" else source)
    missing = [key for key in ("url", "api_key") if key not in found]
    if missing:
        looked = (
            f"looked at the arguments (--url, --api-key), {URL_VARIABLE} and {KEY_VARIABLE}, "
            f"and {where}" + ("" if path.exists() else " (no such file)")
        )
        raise ConfigurationError(f"no {' and no '.join(missing)} configured: {looked}")
    base = found["url"][0].rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigurationError(
            f"{found['url'][1]}: the URL must start with http:// or https:// (got {base!r})"
        )
    return ClientConfig(base, found["api_key"][0], found["url"][1], found["api_key"][1])


def _profile(path: Path, name: str, *, required: bool) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ConfigurationError(f"profile {name!r}: {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigurationError(f"{path}: cannot read it: {error}") from None
    profiles = document.get("profiles", {})
    table = profiles.get(name) if isinstance(profiles, dict) else None
    if table is None:
        if required:
            known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) else ""
            raise ConfigurationError(
                f"{path} has no [profiles.{name}]" + (f" (it has: {known})" if known else "")
            )
        return {}
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: profiles.{name} must be a table")
    unknown = set(table) - {"url", "api_key"}
    if unknown:
        raise ConfigurationError(
            f"{path}: [profiles.{name}] has unknown keys {sorted(unknown)} (url, api_key)"
        )
    return table
