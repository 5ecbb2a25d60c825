"""Every connection to PostgreSQL is bounded: none may wait for ever on a database that is
down, unreachable or stuck.

Without bounds, one outage cost a minute per request (a pooled connection waited 5 s and
the event store's own retry waited ten times), and a dead peer would hold a socket, and a
leader's advisory lock, for the kernel's two hours of TCP keepalive.

Two sets of bounds:
- network, for every connection: a connect timeout, TCP keepalives and a TCP user timeout
  on both ends (the server drops a vanished client's session, and the locks it held, in
  about `dead_peer` seconds; the client notices a vanished server as soon);
- statements, for the pools that serve requests and commands (the ledger's and the API's
  queries): a statement, lock and idle-in-transaction timeout on the server. Long work
  (a projection rebuild) runs without them.

Libpq ignores the TCP parameters on a Unix socket (the embedded default), where a dead
server closes the socket.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ledger.errors import LedgerError


@dataclass(frozen=True)
class Bounds:
    connect_seconds: int = 3  # libpq's connect_timeout (whole seconds, at least 2)
    wait_seconds: float = 2.0  # for a pooled connection, before the call fails
    dead_peer_seconds: int = 10  # keepalive and TCP user timeout, both ends
    statement_seconds: int = 10
    lock_seconds: int = 5
    idle_in_transaction_seconds: int = 10
    # A pool that cannot connect retries every ~1 s (psycopg_pool's first delay) and
    # gives up an attempt after this; a waiting caller starts the next one at once. Its
    # default (5 min, doubling delays) kept a pool away for up to a minute after the
    # server was back.
    reconnect_seconds: float = 2.0
    # A save with no answer for this long has its connection broken (LedgerRecorder.
    # break_stalled), and /readyz says the ledger is stalled. Above the lock timeout: a
    # save waiting its turn for the events table's lock is not stalled.
    stall_seconds: float = 6.0

    def network(self) -> dict[str, str]:
        """libpq parameters: the connect timeout and the dead-peer detection."""
        idle = max(1, self.dead_peer_seconds // 2)
        interval = max(1, self.dead_peer_seconds // 6)
        server = {
            "tcp_keepalives_idle": idle,
            "tcp_keepalives_interval": interval,
            "tcp_keepalives_count": 3,
            "tcp_user_timeout": self.dead_peer_seconds * 1000,
        }
        return {
            "connect_timeout": str(self.connect_seconds),
            "keepalives": "1",
            "keepalives_idle": str(idle),
            "keepalives_interval": str(interval),
            "keepalives_count": "3",
            "tcp_user_timeout": str(self.dead_peer_seconds * 1000),
            "options": _options(server),
        }

    def statements(self) -> dict[str, str]:
        """libpq parameters: the network ones, and the server-side statement bounds."""
        params = self.network()
        params["options"] += " " + self.statement_options()
        return params

    def statement_options(self) -> str:
        """The server-side statement, lock and idle-in-transaction timeouts, as libpq
        `options`."""
        return _options(
            {
                "statement_timeout": f"{self.statement_seconds}s",
                "lock_timeout": f"{self.lock_seconds}s",
                "idle_in_transaction_session_timeout": f"{self.idle_in_transaction_seconds}s",
            }
        )


DEFAULT_BOUNDS = Bounds()


def _options(settings: Mapping[str, object]) -> str:
    return " ".join(f"-c {name}={value}" for name, value in settings.items())


def bounded_url(url: str, params: dict[str, str]) -> str:
    """`url` with `params` added to its query; what the URL already sets wins (an
    operator's own `connect_timeout`), and its own `options` come after ours, so they
    win too."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {name for name, _ in query}
    added = [(name, value) for name, value in params.items() if name not in given]
    merged = []
    for name, value in query:
        if name == "options" and "options" in params:
            value = f"{params['options']} {value}"
        merged.append((name, value))
    # libpq decodes %XX in a URI, not `+`: spaces (between -c options) must be %20.
    return urlunsplit(parts._replace(query=urlencode(added + merged, safe="/", quote_via=quote)))


class InvalidDatabaseURL(LedgerError):
    pass


def postgres_env(
    url: str, *, schema: str = "", pool_size: int = 5, max_overflow: int = 10
) -> dict[str, str]:
    """Translate `postgresql://user:password@host:port/dbname?host=/socket/dir` into the
    `eventsourcing` PostgreSQL settings.

    The library's faster `POSTGRES_ENABLE_DB_FUNCTIONS` insert path is deliberately left
    off: it skips the table lock, so positions commit out of order, and a reader tailing
    `notification_id > last` skips the late ones: with 16 writer threads, 28 of 10,329
    events were never seen by the tail (eventsourcing 9.5.6, 2026-11). Every follower here
    (ledger.log) reads that way.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidDatabaseURL(
            f"database URL must start with postgresql:// (got {parts.scheme or 'no scheme'}://)"
        )
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    dbname = unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0]
    if not host:
        raise InvalidDatabaseURL("database URL names no host (or ?host=/socket/dir)")
    if not dbname:
        raise InvalidDatabaseURL("database URL names no database (postgresql://host/DBNAME)")
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": "ledger.persistence:LedgerRecorder",
        "POSTGRES_DBNAME": dbname,
        "POSTGRES_HOST": host,
        "POSTGRES_PORT": str(parts.port or query.get("port", ["5432"])[0]),
        "POSTGRES_USER": unquote(parts.username or "") or query.get("user", ["postgres"])[0],
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(max_overflow),
        "POSTGRES_PRE_PING": "y",
        "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
    }
