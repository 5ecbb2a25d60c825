"""Subprocesses a benchmark starts and must stop: each in its own process group, its
output in files, stopped with SIGTERM (SIGKILL to the whole group after a timeout), and
nothing of its group left behind.

No ``preexec_fn`` (a benchmark may have threads by the time it starts a process): where
util-linux ``setpriv`` exists, the command runs under ``setpriv --pdeathsig TERM`` so it
gets SIGTERM should the benchmark die outright (SIGKILL). The death signal follows the
thread that started the process: start processes from the main thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (cleanup is not cut short)."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class Stopped:
    how: str  # "SIGTERM", "SIGKILL" or "exited before"
    seconds: float
    returncode: int | None
    leftovers_killed: int  # processes of its group still there after it exited


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


class ManagedProcess:
    """One command in its own process group; stdout and stderr go to `<name>.out/.err`
    in `logdir`."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str],
        logdir: Path,
        *,
        cwd: Path | None = None,
        stop_timeout: float = 20.0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = env
        self.cwd = cwd or logdir
        self.stop_timeout = stop_timeout
        logdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = logdir / f"{name}.out"
        self.stderr_path = logdir / f"{name}.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped: Stopped | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                [*prefix, *self.command],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
            )
        self.stopped = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def output_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (self.stderr_path, self.stdout_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path} (last {len(text)} lines):\n" + "\n".join(text))
        return "\n".join(parts) or "(no output)"

    def stop(self) -> Stopped:
        """SIGTERM, SIGKILL to the group after `stop_timeout`; then nothing of the process
        group may remain."""
        if self.stopped is not None:
            return self.stopped
        process = self.process
        if process is None:
            self.stopped = Stopped("never started", 0.0, None, 0)
            return self.stopped
        started = time.monotonic()
        how = "exited before"
        with signals_deferred():
            if process.poll() is None:
                how = "SIGTERM"
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    how = "SIGKILL"
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
            leftovers = _group_members(process.pid)
            if leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        self.stopped = Stopped(how, time.monotonic() - started, process.returncode, len(leftovers))
        return self.stopped
