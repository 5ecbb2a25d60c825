"""The processes a benchmark starts and must stop: each in its own process group, its
output in files, stopped with SIGTERM (SIGKILL to the group after a timeout), nothing of
its group left behind; and what a taskledger role needs to start. Where util-linux
``setpriv`` exists, a command runs under ``setpriv --pdeathsig TERM``, so that it gets
SIGTERM should the benchmark be killed outright; the death signal follows the thread that
started the process: start processes from the main thread (no ``preexec_fn`` either: a
benchmark may have threads by then)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

HOST = "127.0.0.1"
REPOSITORY = Path(__file__).resolve().parent.parent  # where `python -m bench…` resolves


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
    how: str  # "SIGTERM", "SIGKILL", "exited before" or "never started"
    seconds: float
    returncode: int | None
    leftovers_killed: int  # processes of its group still there after it exited


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getpgid(process.pid) == pgid:
                members.append(process)
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
        stop_timeout: float = 20.0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = env
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

    def start(self) -> ManagedProcess:
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                [*prefix, *self.command],
                env=self.env,
                cwd=REPOSITORY,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
            )
        self.stopped = None
        return self

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

    def kill(self) -> None:
        """SIGKILL the process alone (not its group), and reap it."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

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


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def tool(name: str) -> str:
    """The command `name` next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed here (pip install -e '.[bench]')")
    return found


def taskledger_env(
    database_url: str, broker_url: str, key: str, workdir: Path, **settings: str
) -> dict[str, str]:
    """The environment of a taskledger process: this one's without any TASKLEDGER_*, then
    the given store, broker, admin key and directories, and `settings`, each name
    prefixed (DATABASE_SCHEMA="x" sets TASKLEDGER_DATABASE_SCHEMA)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLEDGER_")}
    env |= {
        "TASKLEDGER_DATABASE_URL": database_url,
        "TASKLEDGER_BROKER_URL": broker_url,
        "TASKLEDGER_API_KEYS": f"bench:admin:{key}",
        "TASKLEDGER_LOG_DIR": str(workdir / "logs"),
        "TASKLEDGER_DATA_DIR": str(workdir / "data"),
    }
    return env | {f"TASKLEDGER_{name}": value for name, value in settings.items()}


def wait_ready(process: ManagedProcess, base_url: str, timeout: float = 90.0) -> float:
    """Poll `base_url`/readyz until it answers 200; the seconds it took."""
    started = time.monotonic()
    last = "no answer yet"
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while process.alive() and time.monotonic() - started < timeout:
            try:
                response = client.get("/readyz")
                if response.status_code == 200:
                    return time.monotonic() - started
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}: {error}"
            time.sleep(0.1)
    how = f"not ready in {timeout:g} s" if process.alive() else f"exited ({process.returncode()})"
    raise RuntimeError(f"{process.name} {how}; last /readyz: {last}\n{process.output_tail()}")
