"""Configuration: read once at start, typed and checked.

Where a value comes from, strongest first: a command-line flag, a TASKLEDGER_* environment
variable, the TOML file (`--config FILE` or TASKLEDGER_CONFIG), the default. A wrong value
stops the process with its origin (`TASKLEDGER_PORT`, `port` in FILE, `--port`) and what is
allowed. Nothing outside the composition root reads the environment.
"""

from __future__ import annotations

import ssl
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from api.auth import parse_configured_keys
from ledger.targets import TargetPolicy

ENV_PREFIX = "TASKLEDGER_"
CONFIG_VARIABLE = f"{ENV_PREFIX}CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SECRET_FIELDS = frozenset({"api_keys", "ledger_signing_key", "ui_secret"})
SECTIONS = ("sandbox",)  # settings that are TOML tables of their own
URL_FIELDS = frozenset({"database_url", "broker_url"})

Source = Literal["default", "file", "env", "flag"]
Shown = str | int | float | None


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names where it came from."""


def _port(value: object) -> object:
    # ASCII digits only: str.isdigit also says yes to "²" (int() refuses it) and "٣٣".
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("must be a port number, 1-65535")
    return value


def _log_level(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in LOG_LEVELS:
        return value.strip().lower()
    raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")


Port = Annotated[int, BeforeValidator(_port)]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_log_level)
]


class SandboxSettings(BaseModel):
    """The `[sandbox]` section: what one run of a program may use, and the opt-in to run
    untrusted code where an isolation layer is missing (docs/sandbox.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mib: int = Field(
        default=512,
        ge=32,
        description="memory of a run, all its processes and tmpfs files together (MiB)",
    )
    pids: int = Field(default=256, ge=16, description="processes and threads of a run at once")
    cpus: float = Field(default=1.0, ge=0.01, le=1024, description="CPUs a run may use")
    tmp_mib: int = Field(
        default=64,
        ge=1,
        description="size of each of /tmp, /var/tmp, /dev/shm and the run's directory (MiB)",
    )
    tmp_files: int = Field(default=16_384, ge=64, description="files in each of those")
    allow_unisolated: bool | None = Field(
        default=None,
        description="run untrusted code even where an isolation layer is missing; "
        "unset = only `taskledger dev` does, with a warning",
    )


# The TOML source of the settings being loaded (set by taskledger.loading.load_settings for
# one construction).
toml_source: ContextVar[TomlConfigSettingsSource | None] = ContextVar(
    "taskledger_toml_source", default=None
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # An empty variable (`TASKLEDGER_METRICS_PORT=` in a compose file) means unset.
        env_ignore_empty=True,
        # TASKLEDGER_SANDBOX__MEMORY_MIB: `memory_mib` of the [sandbox] section.
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    database_url: str | None = Field(
        default=None,
        description="postgresql://user:password@host:port/dbname; unset = embedded PostgreSQL",
    )
    database_schema: str = Field(
        default="public", description="PostgreSQL schema of the event store and views"
    )
    broker_url: str = Field(default="memory://", description="amqp://… or memory://")
    api_keys: SecretStr | None = Field(
        default=None, description="bootstrap keys, tenant:role:key,…"
    )
    data_dir: Path = Field(default=Path(".taskledger"), description="embedded database, keys")
    log_dir: Path = Field(default=Path("logs"), description="log files")
    log_level: LogLevel = Field(default="info", description=", ".join(LOG_LEVELS))
    host: str = Field(default="127.0.0.1", description="interface the API listens on")
    port: Port = Field(default=8000, description="port the API listens on")
    ssl_certfile: Path | None = Field(
        default=None, description="serve HTTPS with this certificate chain (PEM)"
    )
    ssl_keyfile: Path | None = Field(default=None, description="… and this private key (PEM)")
    metrics_port: Port | None = Field(
        default=None, description="a worker serves Prometheus metrics on this port"
    )
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="a worker's lease on a running attempt: this long after its last "
        "heartbeat the attempt is recorded as worker_lost and retried",
    )
    heartbeat_seconds: float = Field(
        default=2.0, gt=0, le=600, description="how often a worker renews its leases"
    )
    shutdown_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="after SIGTERM a process has stopped within this long, even with a "
        "stuck call (it then exits with status 70)",
    )
    ledger_signing_key: SecretStr | None = Field(
        default=None,
        description="HMAC key that signs ledger checkpoints (taskledger ledger checkpoint); "
        "unset = unsigned",
    )
    checkpoint_minutes: float = Field(
        default=60.0,
        ge=0,
        le=10_080,
        description="the api's leader logs a ledger checkpoint this often, for log shipping "
        "to anchor the chain off the host (0 = never)",
    )
    ui_secret: SecretStr | None = Field(
        default=None,
        min_length=32,
        description="signs the dashboard's session cookies (/ui); give every api process "
        "the same one. Unset = random per process: sessions end when it restarts",
    )
    webhook_allow: str | None = Field(
        default=None,
        description="exceptions to the webhooks' SSRF rules: CIDRs and host names, "
        "comma-separated (e.g. 10.20.0.0/16,hooks.internal); unset = only public addresses",
    )
    webhook_retry_hours: float = Field(
        default=24.0,
        gt=0,
        le=720,
        description="a webhook that fails is retried (backoff, then hourly) this long after "
        "the event that triggered it, then given up",
    )
    sandbox: SandboxSettings = Field(
        default_factory=SandboxSettings, description="the [sandbox] section"
    )

    _sources: dict[str, Source] = PrivateAttr(default_factory=dict)

    def signing_key(self) -> bytes | None:
        key = self.ledger_signing_key
        return key.get_secret_value().encode() if key is not None else None

    _config_file: Path | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (passed as init arguments) > environment > TOML file > defaults.
        # No .env file and no secrets directory: one place to look, in that order.
        toml = toml_source.get()
        return (init_settings, env_settings) + ((toml,) if toml is not None else ())

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql://user:password@host:port/dbname URL")
        return value

    @field_validator("database_schema")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not (
            0 < len(value) <= 63
            and value[0] in "abcdefghijklmnopqrstuvwxyz_"
            and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in value)
        ):
            raise ValueError(
                "must be a lower-case PostgreSQL name: a-z, 0-9 and _, not starting with "
                "a digit, at most 63 characters"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("amqp", "amqps", "memory"):
            raise ValueError("must be amqp://user:password@host:port/vhost or memory://")
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_list(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_configured_keys(value.get_secret_value())  # ValueError names the entry
        return value

    @field_validator("webhook_allow")
    @classmethod
    def _webhook_allow(cls, value: str | None) -> str | None:
        if value is not None:
            TargetPolicy.parse(value)  # ValueError names the entry
        return value

    def webhook_targets(self) -> TargetPolicy:
        """Where webhooks may go besides public addresses (`webhook_allow`)."""
        return TargetPolicy.parse(self.webhook_allow or "")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or any(c.isspace() or c in "/:" for c in value):
            raise ValueError("must be a host name or an IPv4 address, e.g. 0.0.0.0")
        return value

    @model_validator(mode="after")
    def _heartbeats_fit_the_lease(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                "TASKLEDGER_HEARTBEAT_SECONDS must be at most half of TASKLEDGER_LEASE_SECONDS "
                f"(got {self.heartbeat_seconds:g} and {self.lease_seconds:g}): one lost "
                "heartbeat must not lose a lease"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            given = "certificate" if self.ssl_keyfile is None else "key"
            raise ValueError(
                "TASKLEDGER_SSL_CERTFILE and TASKLEDGER_SSL_KEYFILE (--ssl-certfile, "
                f"--ssl-keyfile) go together: set both or neither (only the {given} is set)"
            )
        return self

    # -- where the values came from ------------------------------------------------------------

    @property
    def config_file(self) -> Path | None:
        """The TOML file read, if any."""
        return self._config_file

    def source(self, name: str) -> Source:
        """Where the effective value of setting `name` came from."""
        return self._sources.get(name, "default")

    def origin(self, name: str) -> str:
        """The setting as the operator wrote it: `--port`, `TASKLEDGER_PORT`, `port` in FILE."""
        return origin_of(name, self.source(name), self._config_file)

    def masked(self) -> dict[str, Shown]:
        """Every setting by name as an operator may see it: secrets hidden, None when unset.
        A section's settings are named `section.name` (`sandbox.memory_mib`)."""
        shown: dict[str, Shown] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                for key in type(value).model_fields:
                    shown[f"{name}.{key}"] = getattr(value, key)
                continue
            if value is None or isinstance(value, int | float):
                shown[name] = value
            elif name in SECRET_FIELDS:
                shown[name] = "***"
            elif name in URL_FIELDS:
                shown[name] = mask_url(str(value))
            else:
                shown[name] = str(value)
        return shown

    def tls_files(self) -> tuple[Path, Path] | None:
        """The certificate and key to serve HTTPS with, checked to load (None: plain HTTP).

        A missing or unreadable file, or a pair that is not a certificate and its key, is a
        ConfigError naming the setting, so the server never starts half-configured.
        """
        if self.ssl_certfile is None or self.ssl_keyfile is None:
            return None
        for name, path in (("ssl_certfile", self.ssl_certfile), ("ssl_keyfile", self.ssl_keyfile)):
            try:
                path.open("rb").close()
            except OSError as error:
                raise ConfigError(
                    f"{self.origin(name)}: cannot read {path}: {error.strerror or error}"
                ) from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                self.ssl_certfile, self.ssl_keyfile
            )
        except ssl.SSLError as error:
            raise ConfigError(
                f"{self.origin('ssl_certfile')}, {self.origin('ssl_keyfile')}: "
                f"not a PEM certificate chain and its private key ({error.reason or error})"
            ) from None
        return self.ssl_certfile, self.ssl_keyfile


def env_name(name: str) -> str:
    """TASKLEDGER_PORT for `port`; TASKLEDGER_SANDBOX__MEMORY_MIB for `sandbox.memory_mib`."""
    return f"{ENV_PREFIX}{name.replace('.', '__').upper()}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def origin_of(name: str, source: Source, config_file: Path | None) -> str:
    if source == "flag":
        return flag_name(name)
    if source == "file":
        section, _, key = name.rpartition(".")
        return (
            f"`{key}` in [{section}] of {config_file}" if section else f"`{name}` in {config_file}"
        )
    return env_name(name)


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***.

    By hand rather than with urlsplit, which refuses some URLs (a `[` in the password) that
    an operator may still have written, and which must not then be shown as they are. The
    last `@` ends the password: a raw `@`, `/` or `?` in it stays hidden, and a rare `@` in
    the path hides more than needed rather than less.
    """
    scheme, sep, rest = url.partition("://")
    user, colon, _ = rest.rpartition("@")[0].partition(":")
    if not sep or "@" not in rest or not colon:
        return url
    return f"{scheme}://{user}:***@{rest.rpartition('@')[2]}"
