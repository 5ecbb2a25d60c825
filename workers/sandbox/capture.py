"""Capturing a sandboxed program's output from a pipe, up to a cap."""

from __future__ import annotations

import asyncio
import os

# After the program's main process ends and its slot is killed, its pipes close at once;
# this only bounds the wait for a pipe held by something the sandbox could not kill.
PIPE_GRACE_SECONDS = 1.0


class OutputCapture(asyncio.Protocol):
    """Reads a pipe to its end, keeping the first `cap` bytes and dropping the rest."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.truncated = False
        self.chunks: list[bytes] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    @classmethod
    async def attach(cls, fd: int, cap: int) -> OutputCapture:
        capture = cls(cap)
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: capture, pipe)
        capture.transport = transport
        return capture

    @staticmethod
    async def drain(*captures: OutputCapture) -> None:
        """Wait for the pipes' ends; a pipe still open after the grace period (held by
        a process the sandbox could not kill) is closed with what it gave so far."""
        waits = [c.closed for c in captures]
        _, pending = await asyncio.wait(waits, timeout=PIPE_GRACE_SECONDS)
        for capture in captures:
            if capture.transport is not None and not capture.closed.done():
                capture.truncated = True
                capture.transport.close()
        if pending:
            await asyncio.wait(pending)

    def data_received(self, data: bytes) -> None:
        room = self.cap - self.size
        if room > 0:
            kept = data[:room]
            self.chunks.append(kept)
            self.size += len(kept)
        if len(data) > room:
            self.truncated = True

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data(self) -> bytes:
        return b"".join(self.chunks)
