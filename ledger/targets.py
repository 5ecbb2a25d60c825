"""Where a webhook may be sent: the checks on a callback URL, and the classifier of the
addresses a delivery must never reach (SSRF protection).

By default no loopback, private, link-local (cloud metadata at 169.254.169.254), shared
(CGNAT), multicast, reserved or unspecified address, nor one of those inside an IPv6
address (IPv4-mapped, NAT64, 6to4), nor a name such as `localhost` or
`metadata.google.internal`. `TargetPolicy.allow` (the `webhook_allow` setting: CIDRs and
host names) opens exceptions.

A literal address in the URL is refused when the task is submitted; a name is resolved,
and every address it resolves to checked, when the webhook is sent (the deliverer
connects to the address it checked: a second lookup could answer another one).
Pure: no I/O here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ledger.errors import InvalidTask

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2_000
ALLOW_SETTING = "TASKLEDGER_WEBHOOK_ALLOW"

# The transitions a task's callback may name (`callback_events`); None means the default:
# the terminal ones (AttemptFailed only when no automatic retry follows it).
CALLBACK_EVENTS = (
    "AttemptScheduled",
    "AttemptStarted",
    "AttemptCompleted",
    "AttemptFailed",
    "TaskExpired",
    "TaskCancelled",
)
TERMINAL_EVENTS = ("AttemptCompleted", "AttemptFailed", "TaskExpired", "TaskCancelled")

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Names that lead to the host itself or to a cloud's metadata service.
_BLOCKED_NAMES = frozenset({"localhost", "metadata", "instance-data"})
_BLOCKED_SUFFIXES = (".localhost", ".internal", ".local")


def address_problem(address: IPAddress) -> str | None:
    """Why a delivery may not connect to `address` ("is a loopback address"), or None
    when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded)
            if inner is not None:
                return f"{inner} ({embedded} inside an IPv6 address)"
    if address.is_unspecified:
        return "is an unspecified address"
    if address.is_loopback:
        return "is a loopback address"
    if address.is_link_local:
        return "is a link-local address (where cloud metadata services answer)"
    if address.is_multicast:
        return "is a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "is a shared (carrier-grade NAT) address"
    if address.is_reserved:
        return "is a reserved address"
    if address.is_private:
        return "is a private address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "is a site-local address"
    if not address.is_global:
        return "is not a public address"
    return None


def name_problem(host: str) -> str | None:
    """Why a host name is refused before it is even resolved, or None."""
    name = host.lower().rstrip(".")
    if name in _BLOCKED_NAMES or name.endswith(_BLOCKED_SUFFIXES):
        return "names this host or a cloud metadata service"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host is, when it is one (IPv6 without brackets), else None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class TargetPolicy:
    """The exceptions an operator opened (`webhook_allow`): networks and host names."""

    networks: tuple[IPNetwork, ...] = ()
    names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, spec: str | Iterable[str]) -> TargetPolicy:
        """From "10.1.0.0/16, hooks.internal, 127.0.0.1"; ValueError naming a bad entry."""
        entries = spec.split(",") if isinstance(spec, str) else list(spec)
        networks: list[IPNetwork] = []
        names: set[str] = set()
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not name or any(c in name for c in "/:@ ") or not name.isascii():
                raise ValueError(f"{entry!r} is neither a CIDR nor a host name")
            names.add(name)
        return cls(tuple(networks), frozenset(names))

    def allows_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def problem(self, host: str, address: IPAddress | None) -> str | None:
        """Why a delivery to `host` (at `address`, once resolved) is refused, as the
        operator reads it, or None when it may go."""
        if self.allows_name(host):
            return None
        if address is None:
            why = name_problem(host)
            return None if why is None else f"{host} {why}; {_ALLOW_HINT}"
        if any(address in network for network in self.networks):
            return None
        why = address_problem(address)
        if why is None:
            return None
        if literal_address(host) is not None:
            return f"{address} {why}; {_ALLOW_HINT}"
        return f"{host} resolves to {address}, which {why}; {_ALLOW_HINT}"


_ALLOW_HINT = f"set {ALLOW_SETTING} to allow it"


def check_callback_url(
    value: object, policy: TargetPolicy, field_name: str = "callback_url"
) -> None:
    """A callback URL a task (or a tenant's default) may carry: http or https, a host, at
    most MAX_URL_CHARS, no credentials, and not an address or name refused by `policy`
    (the names a host resolves to are checked when the webhook is sent)."""
    if not isinstance(value, str):
        raise InvalidTask(field_name, "must be a URL (a string) or null")
    if len(value) > MAX_URL_CHARS:
        raise InvalidTask(field_name, f"is {len(value)} characters; at most {MAX_URL_CHARS}")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidTask(field_name, "must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as error:
        raise InvalidTask(field_name, f"is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidTask(field_name, "must be an http:// or https:// URL")
    host = parts.hostname
    if not host:
        raise InvalidTask(field_name, "must name a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidTask(
            field_name, "must not carry credentials (user:password@); the webhook is signed"
        )
    if port == 0:
        raise InvalidTask(field_name, "port 0 is not a port to send to")
    problem = policy.problem(host, literal_address(host))
    if problem is not None:
        raise InvalidTask(field_name, problem)


def check_callback_events(value: object, field_name: str = "callback_events") -> None:
    """None (the terminal transitions), or a non-empty list of CALLBACK_EVENTS, each once."""
    if value is None:
        return
    if not isinstance(value, list) or not value:
        raise InvalidTask(field_name, "must be a non-empty list of event types, or null")
    for item in value:
        if item not in CALLBACK_EVENTS:
            raise InvalidTask(field_name, f"{item!r} is not one of {', '.join(CALLBACK_EVENTS)}")
    if len(set(value)) != len(value):
        raise InvalidTask(field_name, "names an event type twice")
