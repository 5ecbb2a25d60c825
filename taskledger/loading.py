"""Reading the settings once, at start: a flag over a TASKLEDGER_* variable over the TOML
file over the default, and a wrong value refused with where it came from."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import EnvSettingsSource, TomlConfigSettingsSource

from taskledger.settings import (
    CONFIG_VARIABLE,
    SECRET_FIELDS,
    SECTIONS,
    URL_FIELDS,
    ConfigError,
    Settings,
    Source,
    mask_url,
    origin_of,
    toml_source,
)


def load_settings(
    flags: Mapping[str, object] | None = None, config_file: str | Path | None = None
) -> Settings:
    """Read the configuration once; a bad value fails with where it came from.

    `flags`: values given on the command line, by setting name (None = not given).
    `config_file`: the TOML file of `--config`; without it, TASKLEDGER_CONFIG names one.
    """
    given: dict[str, Any] = {k: v for k, v in (flags or {}).items() if v is not None}
    for name in given:
        if name not in Settings.model_fields:
            raise TypeError(f"no setting {name!r}")
    path = _config_path(config_file)
    toml = _read_toml(path) if path is not None else None
    environment = EnvSettingsSource(Settings)()
    sources: dict[str, Source] = {}
    for name in Settings.model_fields:
        if name in given:
            sources[name] = "flag"
        elif name in environment:
            sources[name] = "env"
        elif toml is not None and name in toml.toml_data:
            sources[name] = "file"
    for section in SECTIONS:  # each setting of a section by itself: env over file
        from_env = environment.get(section)
        from_file = toml.toml_data.get(section) if toml is not None else None
        for key in _section_keys(section):
            if isinstance(from_env, dict) and key in from_env:
                sources[f"{section}.{key}"] = "env"
            elif isinstance(from_file, dict) and key in from_file:
                sources[f"{section}.{key}"] = "file"
    token = toml_source.set(toml)
    try:
        settings = Settings(**given)
    except ValidationError as error:
        problems = [_explain(e, sources, path) for e in error.errors()]
        raise ConfigError("; ".join(problems)) from None
    finally:
        toml_source.reset(token)
    settings._sources = sources
    settings._config_file = path
    return settings


def _config_path(config_file: str | Path | None) -> Path | None:
    if config_file is not None and str(config_file):
        return Path(config_file)
    from_environment = os.environ.get(CONFIG_VARIABLE, "")
    return Path(from_environment) if from_environment else None


def _read_toml(path: Path) -> TomlConfigSettingsSource:
    try:
        path.open("rb").close()  # the source skips a missing file silently; we do not
        toml = TomlConfigSettingsSource(Settings, toml_file=path)
    except OSError as error:
        raise ConfigError(
            f"configuration file {path}: cannot read it: {error.strerror or error}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration file {path}: not valid TOML: {error}") from None
    known = list(Settings.model_fields)
    for key in toml.toml_data:
        if key not in Settings.model_fields:
            close = difflib.get_close_matches(key.lower().removeprefix("taskledger_"), known, 1)
            hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key `{key}` in {path} ({hint})")
    return toml


def _section_keys(section: str) -> list[str]:
    """The settings of a section (a TOML table, TASKLEDGER_<SECTION>__<KEY>)."""
    model = Settings.model_fields[section].annotation
    assert isinstance(model, type)
    assert issubclass(model, BaseModel)
    return list(model.model_fields)


def _explain(error: ErrorDetails, sources: Mapping[str, Source], path: Path | None) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message
    name = str(error["loc"][0])
    if name in SECTIONS and len(error["loc"]) > 1:
        name = f"{name}.{error['loc'][1]}"
        if error["type"] == "extra_forbidden":
            known = ", ".join(_section_keys(name.split(".")[0]))
            message = f"no such setting (known: {known})"
    where = origin_of(name, sources.get(name, sources.get(name.split(".")[0], "default")), path)
    value = error.get("input")
    if name in SECRET_FIELDS or isinstance(value, dict | list):
        return f"{where}: {message}"
    if name in URL_FIELDS and isinstance(value, str):
        value = mask_url(value)
    return f"{where}: {message} (got {value!r})"
