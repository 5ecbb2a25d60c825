"""API keys: who is calling, for which tenant, with which role.

Two sources: keys configured at start (`TASKLEDGER_API_KEYS`, kept in memory as SHA-256
digests and compared in constant time), and keys issued with `taskledger keys create`
(events in the ledger). A valid stored key is cached for `cache_seconds`, so a revoked
key stops working within that time. Keys are never logged; the key id is.

A caller presents its key as `Authorization: ApiKey <key>`, `Authorization: Bearer <key>`
or `X-API-Key: <key>`.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.requests import Request

from api.errors import ApiProblem
from ledger.keys import KeyPrincipal, Role

CHALLENGE = {"WWW-Authenticate": "ApiKey"}
# The schemes of `Authorization: <scheme> <key>`, lower case (schemes are case-insensitive).
AUTHORIZATION_SCHEMES = frozenset({"apikey", "bearer"})
_RANK = {Role.READ: 0, Role.SUBMIT: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class ConfiguredKey:
    tenant: str
    role: Role
    key: str

    @property
    def key_id(self) -> str:
        # A stable, non-secret name for logs: a short digest of the key.
        return "cfg-" + hashlib.sha256(self.key.encode()).hexdigest()[:8]


def parse_configured_keys(spec: str) -> list[ConfiguredKey]:
    """`tenant:role:key,…` → keys; raises ValueError naming the bad entry."""
    keys = []
    for index, entry in enumerate(filter(None, (e.strip() for e in spec.split(","))), start=1):
        parts = entry.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"entry {index} is not tenant:role:key")
        tenant, role, key = parts
        try:
            keys.append(ConfiguredKey(tenant, Role(role), key))
        except ValueError:
            raise ValueError(
                f"entry {index} has role {role!r}; use one of {', '.join(Role)}"
            ) from None
        if len(key) < 16:
            raise ValueError(f"entry {index}: keys must be at least 16 characters")
    return keys


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: Role
    key_id: str

    @property
    def scope(self) -> str | None:
        """The tenant whose tasks this caller sees; None = all tenants (admins)."""
        return None if self.role is Role.ADMIN else self.tenant

    def require(self, role: Role) -> None:
        if _RANK[self.role] < _RANK[role]:
            raise ApiProblem(
                403,
                "forbidden",
                f"this key has the {self.role} role; this needs {role} or higher",
            )


class Authenticator:
    def __init__(
        self,
        configured: Sequence[ConfiguredKey],
        lookup: Callable[[str], KeyPrincipal | None],
        *,
        active: Callable[[str], bool] = lambda key_id: False,
        cache_seconds: float = 10.0,
    ) -> None:
        self._configured = [
            (hashlib.sha256(k.key.encode()).digest(), Principal(k.tenant, k.role, k.key_id))
            for k in configured
        ]
        self._lookup = lookup
        self._active = active
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, tuple[float, Principal]] = {}
        self._active_cache: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    @property
    def configured(self) -> list[Principal]:
        """Who the keys configured in settings speak for (not the keys)."""
        return [principal for _, principal in self._configured]

    def session_valid(self, key_id: str) -> bool:
        """Whether the key a dashboard session was opened with still counts: configured
        now, or issued and not revoked (looked up at most every `cache_seconds`, so a
        revoked key's sessions end within that time). May read the ledger."""
        if any(principal.key_id == key_id for _, principal in self._configured):
            return True
        now = time.monotonic()
        with self._lock:
            cached = self._active_cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        valid = self._active(key_id)
        with self._lock:
            if len(self._active_cache) > 10_000:
                self._active_cache.clear()
            self._active_cache[key_id] = (now + self._cache_seconds, valid)
        return valid

    @staticmethod
    def presented_key(request: Request) -> str | None:
        header = request.headers.get("authorization")
        if header:
            scheme, _, value = header.partition(" ")
            # Bearer too: it is what generated clients (openapi-python-client's
            # AuthenticatedClient, say) and most HTTP tools send by default.
            if scheme.lower() in AUTHORIZATION_SCHEMES and value.strip():
                return value.strip()
            return None
        return request.headers.get("x-api-key") or None

    def known(self, key: str) -> Principal | None:
        """The caller, when the key is configured or was looked up less than
        `cache_seconds` ago; None means "look it up" (`authenticate`). No I/O: call it
        on the event loop."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, principal in self._configured:
            if hmac.compare_digest(known, digest):
                found = principal
        if found is not None:
            return found
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return None

    def authenticate(self, key: str) -> Principal | None:
        """The caller a key speaks for, or None. May run a ledger read (call off the loop)."""
        found = self.known(key)
        if found is not None:
            return found
        digest = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        stored = self._lookup(key)
        if stored is None:
            return None
        principal = Principal(stored.tenant, Role(stored.role), stored.key_id)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self._cache_seconds, principal)
        return principal
