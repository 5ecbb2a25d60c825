"""Where webhooks may go: the SSRF address classifier against Python's `ipaddress`, the
allow list, and the checks on a callback URL (ledger/targets.py)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.errors import InvalidTask
from ledger.targets import (
    TargetPolicy,
    address_problem,
    check_callback_events,
    check_callback_url,
    name_problem,
)

CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def refused_by_ipaddress(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """What Python's own properties say must be refused: anything not global, and the
    special ranges `is_global` lets through (multicast; CGNAT on old Pythons)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and refused_by_ipaddress(embedded):
            return True
    return (
        not address.is_global
        or address.is_multicast
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv4Address) and address in CGNAT)
    )


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
# Whole-range IPv6, plus the ranges that embed an IPv4 address, drawn often enough.
ipv6 = st.one_of(
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    ipv4.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")),
    ipv4.map(lambda a: ipaddress.IPv6Address(int(NAT64.network_address) | int(a))),
    ipv4.map(lambda a: ipaddress.IPv6Address((0x2002 << 112) | (int(a) << 80))),
    st.sampled_from(["::1", "::", "fe80::1", "fc00::1", "fd12::1", "ff02::1", "2001:db8::1"]).map(
        ipaddress.IPv6Address
    ),
)


@given(st.one_of(ipv4, ipv6))
def test_the_classifier_refuses_exactly_what_ipaddress_says_is_not_public(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    problem = address_problem(address)
    assert (problem is not None) == refused_by_ipaddress(address), (address, problem)
    if problem is not None:
        assert problem.startswith("is ")


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "is a loopback address"),
        ("127.8.9.10", "is a loopback address"),
        ("10.0.0.1", "is a private address"),
        ("172.16.5.4", "is a private address"),
        ("192.168.1.1", "is a private address"),
        ("169.254.169.254", "is a link-local address (where cloud metadata services answer)"),
        ("100.64.0.1", "is a shared (carrier-grade NAT) address"),
        ("224.0.0.1", "is a multicast address"),
        ("240.0.0.1", "is a reserved address"),
        ("0.0.0.0", "is an unspecified address"),  # noqa: S104 - an address to refuse
        ("::1", "is a loopback address"),
        ("::", "is an unspecified address"),
        ("fe80::1", "is a link-local address (where cloud metadata services answer)"),
        ("fd00::1", "is a private address"),
        ("ff02::1", "is a multicast address"),
        ("::ffff:127.0.0.1", "is a loopback address (127.0.0.1 inside an IPv6 address)"),
        ("::ffff:169.254.169.254", "is a link-local address"),
        ("64:ff9b::a00:1", "is a private address (10.0.0.1 inside an IPv6 address)"),
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_what_each_kind_of_address_is_called(address: str, why: str | None) -> None:
    problem = address_problem(ipaddress.ip_address(address))
    if why is None:
        assert problem is None
    else:
        assert problem is not None
        assert problem.startswith(why)


@pytest.mark.parametrize(
    "name", ["localhost", "LOCALHOST.", "api.localhost", "metadata.google.internal", "metadata"]
)
def test_names_of_this_host_and_of_metadata_services_are_refused(name: str) -> None:
    assert name_problem(name) is not None
    assert TargetPolicy().problem(name, None) is not None


def test_the_allow_list_opens_networks_and_names() -> None:
    policy = TargetPolicy.parse(" 127.0.0.1, 10.20.0.0/16 ,hooks.internal, [::1]")
    assert policy.problem("127.0.0.1", ipaddress.ip_address("127.0.0.1")) is None
    assert policy.problem("x", ipaddress.ip_address("10.20.3.4")) is None
    assert policy.problem("::1", ipaddress.ip_address("::1")) is None
    assert policy.problem("HOOKS.internal.", None) is None
    assert policy.problem("hooks.internal", ipaddress.ip_address("10.9.9.9")) is None
    refused = policy.problem("10.21.0.1", ipaddress.ip_address("10.21.0.1"))
    assert refused == ("10.21.0.1 is a private address; set TASKLEDGER_WEBHOOK_ALLOW to allow it")
    resolved = policy.problem("evil.example", ipaddress.ip_address("169.254.169.254"))
    assert resolved is not None
    assert resolved.startswith("evil.example resolves to 169.254.169.254, which is a link-local")
    with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
        TargetPolicy.parse("10.0.0.0/8, http://x")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://hooks.example.com/x", "http:// or https://"),
        ("hooks.example.com/x", "http:// or https://"),
        ("https:///x", "must name a host"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("https://user@hooks.example.com/x", "credentials"),
        ("https://hooks.example.com:99999/x", "not a valid URL"),
        ("https://hooks.example.com/a b", "spaces"),
        ("https://hooks.example.com/" + "a" * 2_000, "at most 2000"),
        ("http://127.0.0.1:8080/x", "127.0.0.1 is a loopback address; set TASKLEDGER_WEBHOOK"),
        ("http://10.0.0.1/x", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local"),
        ("http://[::1]/x", "::1 is a loopback address"),
        ("http://[::ffff:10.0.0.1]/x", "inside an IPv6 address"),
        ("http://localhost:8000/x", "localhost names this host"),
        ("http://metadata.google.internal/x", "cloud metadata"),
    ],
)
def test_bad_callback_urls_are_refused_naming_the_field(url: str, message: str) -> None:
    with pytest.raises(InvalidTask, match="callback_url") as refused:
        check_callback_url(url, TargetPolicy())
    assert message in refused.value.message


def test_good_callback_urls_and_allowed_exceptions_pass() -> None:
    for url in ("https://hooks.example.com/t?x=1", "http://93.184.216.34:8080/", "HTTPS://H.io"):
        check_callback_url(url, TargetPolicy())
    check_callback_url("http://127.0.0.1:9/x", TargetPolicy.parse("127.0.0.1"))
    check_callback_url("http://localhost:9/x", TargetPolicy.parse("localhost"))


def test_callback_events_are_null_or_known_transitions_once() -> None:
    check_callback_events(None)
    check_callback_events(["AttemptCompleted", "AttemptStarted"])
    for bad, message in (
        ([], "non-empty"),
        (["TaskSubmitted"], "is not one of"),
        (["TaskExpired", "TaskExpired"], "twice"),
        ("TaskExpired", "non-empty list"),
    ):
        with pytest.raises(InvalidTask, match=message):
            check_callback_events(bad)
