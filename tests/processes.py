"""Helpers for tests that run taskledger as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean shutdown), SIGKILL if it is not over in 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def role_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a taskledger process under test: this one's without its
    TASKLEDGER_* variables, a data and log directory under `tmp_path`, and `settings`
    (`database_url="…"` becomes TASKLEDGER_DATABASE_URL)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TASKLEDGER_")}
    env["TASKLEDGER_DATA_DIR"] = str(tmp_path / "data")
    env["TASKLEDGER_LOG_DIR"] = str(tmp_path / "logs")
    env |= {f"TASKLEDGER_{name.upper()}": value for name, value in settings.items()}
    return env


def start_role(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m taskledger ARGS` in the background, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "taskledger", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def ready(url: str) -> bool:
    """Whether the api at `url` answers /readyz with 200."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_serving(
    process: subprocess.Popen[bytes], url: str, output: Path, timeout: float
) -> None:
    """Until the process answers /healthz; fails, with its output, if it exits first or
    is not serving after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"taskledger exited with {process.returncode}:\n{output.read_text()}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not serving after {timeout} s:\n{output.read_text()}")
        time.sleep(0.1)
