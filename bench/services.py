"""The PostgreSQL and RabbitMQ a benchmark runs against.

The component benchmarks and the comparison use the machine's servers, with state of
their own: a throwaway database each (`temporary_database`), dropped at the end, also on
failure, Ctrl-C or SIGTERM; queues named after a random schema.

The fault suite starts servers of its own (`PrivatePostgres`, `PrivateRabbitMQ`), in a
directory of its own, on ports of its own, so that it may stop, restart and kill them
while other people's tests use the machine's shared servers:

- PostgreSQL 15 (Debian's binaries): ``initdb`` into the directory, listening on
  127.0.0.1 and a Unix socket in the directory. As root, the server runs as the
  ``postgres`` system user (PostgreSQL refuses root).
- RabbitMQ: a node of its own name (``tlfaults<pid>@localhost``), node and distribution
  ports of its own, its database, logs, configuration and Erlang cookie (``HOME``) in the
  directory, no plugins (the machine's node may have the management plugin on 15672).
  ``consumer_timeout`` is tiny (10 s) and the channels check it every second
  (``channel_tick_interval``; by default once a minute), so that a task longer than it
  shows whether a long run survives it.

Each directory holds ``owner.pid``; a later run stops what a killed run left (`sweep`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psutil
import psycopg
from psycopg import sql

from bench.processes import ManagedProcess, free_port

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_URL_ENV = "TASKLEDGER_BENCH_DATABASE_URL"
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


def default_database_url() -> str:
    return os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


def with_database(url: str, dbname: str) -> str:
    """`url` pointing at database `dbname` instead (path and any ?dbname= replaced)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "dbname"]
    return urlunsplit(parts._replace(path="/" + quote(dbname), query=urlencode(query)))


def dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def reachable(url: str, default_port: int) -> str | None:
    """Why the server of `url` cannot be reached, or None."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), 3):
            return None
    except OSError as error:
        return f"{host}:{port}: {error}"


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` blocks (dropping the database) run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def temporary_database(server_url: str, prefix: str = "taskledger_bench_") -> Iterator[str]:
    """Create a fresh database on the server of `server_url`; yield its URL; drop it after
    (connections still open to it are terminated first)."""
    name = f"{prefix}{secrets.token_hex(4)}"
    with _sigterm_raises():
        with _connect(server_url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_database(server_url, name)
        finally:
            with _connect(server_url) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


async def delete_queues(broker_url: str, namespace: str) -> None:
    """Delete a taskledger deployment's queues and exchange (`taskledger.<schema>.*`)."""
    from workers.rabbitmq import RabbitMQBroker

    broker = RabbitMQBroker(broker_url, namespace)
    try:
        await broker.delete_all()
    finally:
        await broker.close()


# -- the fault suite's own servers --------------------------------------------------------

PG_BIN = Path(os.environ.get("TASKLEDGER_FAULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
RABBITMQ_BIN = Path(os.environ.get("TASKLEDGER_FAULTS_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
PREFIX = "tlfaults-"
CONSUMER_TIMEOUT_MS = 10_000


def _as_postgres() -> list[str]:
    """Prefix that runs a command as the postgres system user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


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
    missing = [str(p) for p in (PG_BIN / "initdb", PG_BIN / "pg_ctl") if not p.exists()]
    missing += [str(p) for p in (RABBITMQ_BIN / "rabbitmq-server",) if not p.exists()]
    if os.geteuid() == 0:
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
            owner = int((path / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(owner):
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
    def __init__(self, base: Path) -> None:
        self.dir = base / "postgres"
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.started = False

    def _pg_ctl(self, *args: str, timeout: float = 90) -> None:
        _run([*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args], timeout)

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
                    f"\n# the fault suite's server\nport = {self.port}\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\n"
                    "max_connections = 300\n"
                )
        self._pg_ctl("start", *self._options())
        self.started = True

    def restart(self, mode: str) -> None:
        """`pg_ctl restart -m fast|immediate`."""
        self._pg_ctl("restart", "-m", mode, *self._options())

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode, "-w", "-t", "60")

    def close(self) -> None:
        if self.started and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def version(self) -> str:
        with psycopg.connect(self.url, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"


class PrivateRabbitMQ:
    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.dir = base / "rabbitmq"
        self.node = f"tlfaults{os.getpid()}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.process: ManagedProcess | None = None
        self._starts = 0
        self.env = {k: v for k, v in env.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        self.env |= {
            "HOME": str(self.dir),  # its own Erlang cookie, not the machine node's
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _write_config(self) -> None:
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

    def start(self) -> None:
        if self.process is None:
            self._write_config()
        self._starts += 1
        self.process = ManagedProcess(
            f"rabbitmq-{self._starts}",
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            self.env,
            self.dir,
            stop_timeout=60,
        )
        self.process.start()
        try:
            self._ctl("wait", "--timeout", "90", str(self.dir / "node.pid"), timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"{error}\n{self.process.output_tail()}") from None

    def stop(self) -> None:
        """Stop the node (`rabbitmqctl stop`, waiting for its process to end)."""
        assert self.process is not None
        self._ctl("stop", str(self.dir / "node.pid"))
        deadline = time.monotonic() + 30
        while self.process.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process.stop()

    def close(self) -> None:
        if self.process is None or not self.process.alive():
            return
        with contextlib.suppress(Exception):
            self._ctl("stop", str(self.dir / "node.pid"), timeout=60)
        self.process.stop()  # and whatever of its process group is left

    @staticmethod
    def version() -> str:
        installed = sorted((RABBITMQ_BIN.parent / "lib").glob("rabbitmq_server-*"))
        return installed[-1].name.removeprefix("rabbitmq_server-") if installed else "unknown"
