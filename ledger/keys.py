"""API keys: issued and revoked as events, stored as a hash of their secret.

A key reads `tlk_<key id>_<secret>`. The key id names the ApiKey aggregate (uuid5 of the
id), so checking a key is one stream read; the secret is compared by its SHA-256 digest
in constant time. Secrets are 32 random bytes: a fast hash is enough (no password
stretching needed for keys nobody chose).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from eventsourcing.domain import Aggregate

from ledger.clock import Clock
from ledger.errors import InvalidTask, KeyNotFound, LedgerError
from ledger.store import EventStore

KEY_NAMESPACE = uuid.UUID("0d6b1c43-58a4-4f1e-9b2f-7a36b1f0c2d9")
KEY_PREFIX = "tlk_"


class Role(StrEnum):
    READ = "read"  # GET only
    SUBMIT = "submit"  # read, and submit / update / retry / cancel
    ADMIN = "admin"  # everything, across tenants


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_stream_id(key_id: str) -> uuid.UUID:
    return uuid.uuid5(KEY_NAMESPACE, key_id)


def parse_key(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or not secret:
        return None
    return key_id, secret


class KeyAlreadyRevoked(LedgerError):
    pass


class ApiKey(Aggregate):
    class KeyIssued(Aggregate.Created):
        key_id: str
        tenant: str
        role: str
        secret_sha256: str
        issued_by: str
        label: str

        def apply(self, key: ApiKey) -> None:
            key.key_id = self.key_id
            key.tenant = self.tenant
            key.role = Role(self.role)
            key.secret_sha256 = self.secret_sha256
            key.label = self.label
            key.issued_by = self.issued_by

    class KeyRevoked(Aggregate.Event):
        by: str

        def apply(self, key: ApiKey) -> None:
            key.revoked_at = self.timestamp
            key.revoked_by = self.by

    def __init__(self) -> None:
        self.key_id = ""
        self.tenant = ""
        self.role = Role.READ
        self.secret_sha256 = ""
        self.label = ""
        self.issued_by = ""
        self.revoked_at: datetime | None = None
        self.revoked_by: str | None = None

    @classmethod
    def issue(
        cls, *, tenant: str, role: str, issued_by: str, label: str, now: datetime
    ) -> tuple[ApiKey, str]:
        """A new key and its token (shown once; only the digest is stored)."""
        if not tenant or not tenant.replace("-", "").replace("_", "").isalnum():
            raise InvalidTask("tenant", "must be letters, digits, '-' or '_'")
        try:
            checked_role = Role(role)
        except ValueError:
            raise InvalidTask("role", f"must be one of {', '.join(Role)}") from None
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = cls._create(
            cls.KeyIssued,
            id=key_stream_id(key_id),
            timestamp=now,
            key_id=key_id,
            tenant=tenant,
            role=str(checked_role),
            secret_sha256=secret_digest(secret),
            issued_by=issued_by,
            label=label,
        )
        return key, f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, by: str, now: datetime) -> None:
        if self.revoked_at is not None:
            raise KeyAlreadyRevoked(f"key {self.key_id} was already revoked")
        self.trigger_event(self.KeyRevoked, timestamp=now, by=by)

    def accepts(self, secret: str) -> bool:
        return self.revoked_at is None and hmac.compare_digest(
            secret_digest(secret), self.secret_sha256
        )


@dataclass(frozen=True)
class KeyPrincipal:
    """Who a valid API key speaks for."""

    key_id: str
    tenant: str
    role: str


class Keys:
    """Issuing, revoking and checking API keys, over the ledger's store."""

    def __init__(self, store: EventStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def issue(
        self, *, tenant: str, role: str, issued_by: str, label: str = ""
    ) -> tuple[KeyPrincipal, str]:
        """Issue a key; returns who it speaks for and the token (shown this once)."""
        key, token = ApiKey.issue(
            tenant=tenant, role=role, issued_by=issued_by, label=label, now=self.clock.now()
        )
        self.store.record(key)
        return KeyPrincipal(key.key_id, key.tenant, str(key.role)), token

    def revoke(self, key_id: str, *, by: str) -> ApiKey:
        """Revoke the key (again: nothing changes); returns it, revoked."""
        key = self._load(key_id)
        if key is None:
            raise KeyNotFound(f"no API key with id {key_id}")
        with contextlib.suppress(KeyAlreadyRevoked):
            key.revoke(by, self.clock.now())
            self.store.record(key)
        return key

    def authenticate(self, token: str) -> KeyPrincipal | None:
        """Who the token speaks for, or None if it is malformed, unknown or revoked."""
        parsed = parse_key(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        key = self._load(key_id)
        if key is None or not key.accepts(secret):
            return None
        return KeyPrincipal(key.key_id, key.tenant, str(key.role))

    def is_active(self, key_id: str) -> bool:
        """Whether the key was issued and is not revoked (a dashboard session's check)."""
        key = self._load(key_id)
        return key is not None and key.revoked_at is None

    def _load(self, key_id: str) -> ApiKey | None:
        key = self.store.load_aggregate(key_stream_id(key_id))
        return key if isinstance(key, ApiKey) else None
