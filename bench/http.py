"""A minimal HTTP/1.1 client on asyncio streams: hand-written request bytes, one
keep-alive connection per `RawConnection`, one request at a time, Content-Length responses
(the API streams none). About the least CPU a Python client can spend per request, so
that the server is what a benchmark measures."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bench.processes import HOST


class ProtocolError(Exception):
    """The server's response is not HTTP/1.1 this client understands."""


def request(method: str, path: str, *, key: str | None = None, body: bytes | None = None) -> bytes:
    """The whole request as it goes on the wire."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    if key is not None:
        lines.append(f"Authorization: ApiKey {key}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


def _parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """Status, Content-Length and close after? of a response head."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    length: int | None = None
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = b"close" in value.lower()
    return int(rest[:3]), length, close


class RawConnection:
    """One keep-alive HTTP/1.1 connection, one request at a time; reconnects when needed."""

    def __init__(self, port: int, host: str = HOST) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, wire: bytes) -> tuple[int, bytes]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        try:
            writer.write(wire)
            status, length, close = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            if length is None:
                raise ProtocolError("a response without Content-Length")
            body = await reader.readexactly(length) if length else b""
        except BaseException:
            self.drop()  # a half-read response leaves the connection unusable
            raise
        if close:
            self.drop()
        return status, body

    async def call(
        self, method: str, path: str, key: str, body: Any = None, timeout: float = 60.0
    ) -> tuple[int, Any]:
        """One JSON request; its status and decoded JSON body."""
        raw = None if body is None else orjson.dumps(body)
        status, answer = await asyncio.wait_for(
            self.send(request(method, path, key=key, body=raw)), timeout
        )
        return status, orjson.loads(answer) if answer else None

    def drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
