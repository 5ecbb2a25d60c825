"""Configuration: read once from TASKLEDGER_* environment variables, typed and checked.

Nothing outside the composition root reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "TASKLEDGER_"


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str | None = Field(
        default=None,
        description="postgresql://user:password@host:port/dbname; unset = embedded PostgreSQL",
    )
    database_schema: str = Field(
        default="public",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema of the event store and views",
    )
    broker_url: str = Field(default="memory://", description="amqp://… or memory://")
    api_keys: SecretStr | None = Field(default=None, description="tenant:role:key,…")
    data_dir: Path = Field(default=Path(".taskledger"), description="embedded database, keys")
    log_dir: Path = Field(default=Path("logs"), description="log files")

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql://user:password@host:port/dbname URL")
        return value or None

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("amqp", "amqps", "memory"):
            raise ValueError("must be amqp://user:password@host:port/vhost or memory://")
        return value

    def masked(self) -> dict[str, str]:
        """The effective configuration, as an operator may see it (secrets hidden)."""
        return {
            f"{ENV_PREFIX}DATABASE_URL": _mask_url(self.database_url)
            if self.database_url
            else f"(unset: embedded PostgreSQL in {self.data_dir / 'postgres'})",
            f"{ENV_PREFIX}DATABASE_SCHEMA": self.database_schema,
            f"{ENV_PREFIX}BROKER_URL": _mask_url(self.broker_url),
            f"{ENV_PREFIX}API_KEYS": "(set, hidden)" if self.api_keys else "(unset)",
            f"{ENV_PREFIX}DATA_DIR": str(self.data_dir),
            f"{ENV_PREFIX}LOG_DIR": str(self.log_dir),
        }


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings() -> Settings:
    """Read the environment once; a bad value fails with the variable's name."""
    try:
        return Settings()
    except ValidationError as error:
        problems = [
            f"{ENV_PREFIX}{str(e['loc'][0]).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        ]
        raise ConfigError("; ".join(problems)) from None
