"""Helpers for tests that run taskledger as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


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
