"""The fault suite's own PostgreSQL 15 and RabbitMQ, in a directory of its own
(``/tmp/tlfaults-*``) on free ports, so that it may stop, restart and kill them while
others use the machine's servers (docs/reliability.md, "What it runs"). Each directory
holds ``owner.pid``; a later run stops what a killed run left (`sweep`)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import psycopg

from bench.processes import ManagedProcess, free_port

PG_BIN = Path(os.environ.get("TASKLEDGER_FAULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
RABBITMQ_BIN = Path(os.environ.get("TASKLEDGER_FAULTS_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
PREFIX = "tlfaults-"
CONSUMER_TIMEOUT_MS = 10_000  # shorter than the load's 25 s program (bench/faults/load.py)


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the postgres user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def missing_tools() -> list[str]:
    """What this machine lacks to run the suite's servers."""
    needed = (PG_BIN / "initdb", PG_BIN / "pg_ctl", RABBITMQ_BIN / "rabbitmq-server")
    missing = [str(p) for p in needed if not p.exists()]
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing.append("the postgres system user")
    return missing


def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    path.chmod(0o711)  # the postgres user reaches its own directory inside
    (path / "owner.pid").write_text(str(os.getpid()))
    return path


def sweep(progress: Callable[[str], None]) -> None:
    """Stop the servers of suite runs that died without cleaning up, remove their dirs."""
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            if psutil.pid_exists(int((path / "owner.pid").read_text())):
                continue
        except (OSError, ValueError):
            continue
        pgdata = path / "postgres" / "data"
        if (pgdata / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                _run([*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-m",
                      "immediate", "-w", "stop"], 60)  # fmt: skip
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(path) in part for part in process.info["cmdline"] or []):
                    process.kill()
        shutil.rmtree(path, ignore_errors=True)
        progress(f"  removed what a killed run left in {path}")


class PrivatePostgres:
    """``initdb`` into the directory; listens on 127.0.0.1 and a socket in the directory."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "postgres"
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        _run([*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args], 90)

    def _options(self) -> list[str]:
        return ["-l", str(self.dir / "server.log"), "-w", "-t", "60"]

    def start(self) -> None:
        if not self.data.exists():
            self.dir.mkdir(parents=True)
            if os.geteuid() == 0:
                shutil.chown(self.dir, "postgres", "postgres")
            _run([*_as_postgres(), str(PG_BIN / "initdb"), "-D", str(self.data), "-U",
                  "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"], 120)  # fmt: skip
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\nmax_connections = 300\n"
                )
        self._pg_ctl("start", *self._options())

    def restart(self, mode: str) -> None:
        """`pg_ctl restart -m fast|immediate`."""
        self._pg_ctl("restart", "-m", mode, *self._options())

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode, "-w", "-t", "60")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True


class PrivateRabbitMQ:
    """A node of its own name, ports, database, logs, config and Erlang cookie (``HOME``),
    no plugins; ``consumer_timeout`` 10 s, checked every second (``channel_tick_interval``,
    by default once a minute) so that the load's 25 s program outlives it."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.dir = base / "rabbitmq"
        self.node = f"tlfaults{os.getpid()}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.process: ManagedProcess | None = None
        self._starts = 0
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        self.env = {k: v for k, v in env.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        self.env |= {
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ERL_ARGS": loopback,
            "RABBITMQ_CTL_ERL_ARGS": loopback,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
        )
        (self.dir / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")

    def _ctl(self, *args: str, timeout: float = 90) -> str:
        return _run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args], timeout, self.env)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self) -> None:
        self._starts += 1
        command = [str(RABBITMQ_BIN / "rabbitmq-server")]
        self.process = ManagedProcess(
            f"rabbitmq-{self._starts}", command, self.env, self.dir, stop_timeout=60
        )
        self.process.start()
        try:
            self._ctl("wait", "--timeout", "90", str(self.dir / "node.pid"), timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"{error}\n{self.process.output_tail()}") from None

    def stop(self) -> None:
        """`rabbitmqctl stop`, then wait for the node's process to end."""
        assert self.process is not None
        self._ctl("stop", str(self.dir / "node.pid"))
        deadline = time.monotonic() + 30
        while self.process.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process.stop()

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.stop()
        if self.process is not None:
            self.process.stop()  # and whatever of its process group is left

    @staticmethod
    def version() -> str:
        installed = sorted((RABBITMQ_BIN.parent / "lib").glob("rabbitmq_server-*"))
        return installed[-1].name.removeprefix("rabbitmq_server-") if installed else "unknown"
