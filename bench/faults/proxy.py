"""A TCP proxy between one process and PostgreSQL, which the fault suite and the partition
test pause (SIGSTOP: nothing forwarded, nothing broken, as a silent peer) and kill
(SIGKILL: every connection reset, new ones refused): ``python -m bench.faults.proxy
LISTEN_PORT UPSTREAM_HOST:PORT``. pproxy's raw TCP tunnel, through its library API (its
command line installs uvloop, and fails with the one in this project's venv)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

from bench.processes import HOST, ManagedProcess


async def serve(listen_port: int, upstream: str) -> None:
    import pproxy  # type: ignore[import-untyped]  # the bench and dev extras install it

    server = pproxy.Server(f"tunnel{{{upstream}}}://{HOST}:{listen_port}")
    await server.start_server({"rserver": [], "verbose": lambda *_: None})
    print(f"forwarding {HOST}:{listen_port} to {upstream}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.faults.proxy LISTEN_PORT UPSTREAM_HOST:PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(int(args[0]), args[1]))
    return 0


class TcpProxy:
    """The proxy as a process of its own (see the module docstring)."""

    def __init__(self, listen_port: int, upstream: str, workdir: Path, env: dict[str, str]):
        self.listen_port = listen_port
        self.upstream = upstream
        self.workdir = workdir
        self.env = env
        self.paused = False
        self._starts = 0
        self.process: ManagedProcess | None = None

    def start(self, timeout: float = 20.0) -> None:
        self._starts += 1
        command = [sys.executable, "-m", "bench.faults.proxy", str(self.listen_port), self.upstream]
        self.process = ManagedProcess(f"proxy-{self._starts}", command, self.env, self.workdir)
        self.process.start()
        self.paused = False
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((HOST, self.listen_port), timeout=1):
                    return
            except OSError:
                if not self.process.alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the proxy on port {self.listen_port} did not start\n"
                        + self.process.output_tail()
                    ) from None
                time.sleep(0.05)

    def _signal(self, signum: signal.Signals) -> None:
        if self.process is None or not self.process.alive():
            raise RuntimeError(f"the proxy on port {self.listen_port} is not running")
        os.kill(self.process.pid, signum)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.paused = False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.paused and self.process.alive():
            os.kill(self.process.pid, signal.SIGCONT)  # a stopped process cannot take SIGTERM
            self.paused = False
        self.process.stop()


if __name__ == "__main__":
    sys.exit(main())
