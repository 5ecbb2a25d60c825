"""API keys (api/auth.py): which header carries the key, who a key speaks for, how long a
stored key is trusted after a lookup, and what each role may do.

The ledger's key lookup is a stand-in that counts its calls; time is the module's clock,
replaced so that a cache entry's age is set by the test.
"""

from __future__ import annotations

import types

import pytest
from starlette.requests import Request

from api import auth
from api.auth import Authenticator, ConfiguredKey, Principal
from api.errors import ApiProblem
from ledger.keys import KeyPrincipal, Role

CONFIGURED = ConfiguredKey("acme", Role.SUBMIT, "configured-key-0123456789")
STORED_KEY = "stored-key-0123456789"


class Keys:
    """The ledger's stored keys, as `Authenticator` looks them up."""

    def __init__(self) -> None:
        self.stored: dict[str, KeyPrincipal] = {}
        self.lookups: list[str] = []

    def __call__(self, key: str) -> KeyPrincipal | None:
        self.lookups.append(key)
        return self.stored.get(key)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


@pytest.fixture
def keys() -> Keys:
    keys = Keys()
    keys.stored[STORED_KEY] = KeyPrincipal(key_id="key-1", tenant="globex", role="read")
    return keys


def request(*headers: tuple[str, str]) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw})


# -- which header carries the key ---------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "ApiKey k-123")],
        [("Authorization", "Bearer k-123")],
        [("Authorization", "apikey k-123")],  # schemes are case-insensitive
        [("Authorization", "BEARER   k-123  ")],
        [("X-API-Key", "k-123")],
    ],
)
def test_the_key_is_read_from_the_documented_headers(headers: list[tuple[str, str]]) -> None:
    assert Authenticator.presented_key(request(*headers)) == "k-123"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "ApiKey")],
        [("Authorization", "ApiKey    ")],
        [("Authorization", "k-123")],
        [("X-API-Key", "")],
    ],
)
def test_no_key_is_presented_without_a_documented_header_and_a_value(
    headers: list[tuple[str, str]],
) -> None:
    assert Authenticator.presented_key(request(*headers)) is None


# -- who a key speaks for -----------------------------------------------------------------------


def test_a_configured_key_is_known_without_a_lookup(keys: Keys) -> None:
    authenticator = Authenticator([CONFIGURED], keys)
    principal = authenticator.authenticate(CONFIGURED.key)
    assert principal == Principal("acme", Role.SUBMIT, CONFIGURED.key_id)
    assert authenticator.known(CONFIGURED.key) == principal
    assert keys.lookups == []


def test_a_configured_key_s_id_names_it_without_revealing_it() -> None:
    assert CONFIGURED.key_id.startswith("cfg-")
    assert CONFIGURED.key not in CONFIGURED.key_id
    other = ConfiguredKey("acme", Role.SUBMIT, "another-key-0123456789")
    assert other.key_id != CONFIGURED.key_id


def test_a_stored_key_is_looked_up_and_speaks_for_its_tenant_and_role(
    keys: Keys, clock: Clock
) -> None:
    authenticator = Authenticator([CONFIGURED], keys)
    assert authenticator.authenticate(STORED_KEY) == Principal("globex", Role.READ, "key-1")
    assert keys.lookups == [STORED_KEY]


def test_an_unknown_key_speaks_for_no_one_and_is_looked_up_every_time(
    keys: Keys, clock: Clock
) -> None:
    """Not remembered as unknown: a key issued a moment later works at once."""
    authenticator = Authenticator([CONFIGURED], keys)
    assert authenticator.authenticate("issued-later-0123456789") is None
    keys.stored["issued-later-0123456789"] = KeyPrincipal("key-2", "acme", "admin")
    assert authenticator.authenticate("issued-later-0123456789") == Principal(
        "acme", Role.ADMIN, "key-2"
    )
    assert keys.lookups == ["issued-later-0123456789"] * 2


def test_a_stored_key_is_trusted_for_cache_seconds_then_looked_up_again(
    keys: Keys, clock: Clock
) -> None:
    authenticator = Authenticator([], keys, cache_seconds=10)
    expected = Principal("globex", Role.READ, "key-1")
    assert authenticator.known(STORED_KEY) is None  # never looked up: known() does no I/O
    assert authenticator.authenticate(STORED_KEY) == expected
    clock.now += 9.9
    assert authenticator.known(STORED_KEY) == expected
    assert authenticator.authenticate(STORED_KEY) == expected
    assert keys.lookups == [STORED_KEY]
    del keys.stored[STORED_KEY]  # revoked
    clock.now += 0.2
    assert authenticator.known(STORED_KEY) is None
    assert authenticator.authenticate(STORED_KEY) is None
    assert keys.lookups == [STORED_KEY] * 2


def test_a_key_that_differs_from_a_configured_one_is_not_it(keys: Keys) -> None:
    authenticator = Authenticator([CONFIGURED], keys)
    for near in (CONFIGURED.key[:-1], CONFIGURED.key + "x", CONFIGURED.key.upper(), ""):
        assert authenticator.known(near) is None
        assert authenticator.authenticate(near) is None


# -- what each role may do ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.READ, {Role.READ}),
        (Role.SUBMIT, {Role.READ, Role.SUBMIT}),
        (Role.ADMIN, {Role.READ, Role.SUBMIT, Role.ADMIN}),
    ],
)
def test_a_role_allows_what_it_ranks_at_or_above(role: Role, allowed: set[Role]) -> None:
    principal = Principal("acme", role, "key-1")
    for needed in Role:
        if needed in allowed:
            principal.require(needed)
        else:
            with pytest.raises(ApiProblem) as refused:
                principal.require(needed)
            assert refused.value.status == 403
            assert f"needs {needed}" in str(refused.value.detail)


def test_only_an_admin_sees_every_tenant() -> None:
    assert Principal("acme", Role.READ, "k").scope == "acme"
    assert Principal("acme", Role.SUBMIT, "k").scope == "acme"
    assert Principal("acme", Role.ADMIN, "k").scope is None
