"""HTTP to addresses our users name (webhooks), without becoming their way in: SSRF
protection at connect time.

`PinnedBackend` is an httpcore network backend. Asked to connect to a host, it resolves
the name once, checks every address it resolves to against the policy
(ledger.targets.TargetPolicy: no loopback, private, link-local/metadata, CGNAT,
multicast, reserved or unspecified address unless `webhook_allow` opens it), and connects
to a checked address itself: no second resolution that could answer another address
(DNS rebinding). httpcore keeps the URL's host for the Host header and for TLS (SNI and
certificate verification), so HTTPS works as usual. A refused host raises
`TargetRefused`, which says why; no packet is sent to it.

Why not `httpx-secure` (which does the pinning the same way, through the same httpcore
seam): it checks only the one address it selects, after opening plain TCP probes
(happy eyeballs) that may reach a denied address, and its refusals do not say why. We
refuse a name when any of its addresses is refused, and never connect before the check.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable

import httpcore
import httpx

from ledger.targets import IPAddress, TargetPolicy, literal_address


class TargetRefused(Exception):
    """A webhook's host is refused by the SSRF policy; the message says why."""


class PinnedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: TargetPolicy, inner: httpcore.AsyncNetworkBackend) -> None:
        self.policy = policy
        self.inner = inner

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """The addresses to connect to for `host`, each one checked; TargetRefused when
        any is refused (or the name itself is)."""
        literal = literal_address(host)
        if literal is not None:
            candidates = [literal]
        else:
            problem = self.policy.problem(host, None)
            if problem is not None:
                raise TargetRefused(problem)
            try:
                found = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except socket.gaierror as error:
                raise httpcore.ConnectError(f"cannot resolve {host}: {error.strerror}") from None
            candidates = []
            for *_, sockaddr in found:
                address = literal_address(str(sockaddr[0]))
                if address is not None and address not in candidates:
                    candidates.append(address)
            if not candidates:
                raise httpcore.ConnectError(f"{host} resolves to no address")
        for address in candidates:
            problem = self.policy.problem(host, address)
            if problem is not None:
                raise TargetRefused(problem)
        return candidates

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                candidates = await self.addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        last: Exception | None = None
        for address in candidates:
            remaining = (
                None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            )
            try:
                return await self.inner.connect_tcp(
                    str(address),
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise TargetRefused("webhooks are not sent over Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def pinned_transport(
    policy: TargetPolicy, *, max_connections: int = 32
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through `PinnedBackend`: no proxy
    (one would connect for us, unchecked), HTTP/1.1, verified TLS."""
    transport = httpx.AsyncHTTPTransport(trust_env=False, retries=0)
    pool = transport._pool
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=pool._ssl_context,
        max_connections=max_connections,
        max_keepalive_connections=8,
        keepalive_expiry=5.0,
        http1=True,
        http2=False,
        network_backend=PinnedBackend(policy, pool._network_backend),
    )
    return transport
