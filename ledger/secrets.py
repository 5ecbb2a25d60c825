"""The webhook signing secrets: a table beside the event store, never events.

Events are kept for ever and are in every backup and every export of the log; a signing
secret must be replaceable and forgettable. So `webhook_secrets` holds them (one row per
secret of a tenant), and the tenant's settings stream records only that a secret was
rotated, its id and by whom (`WebhookSecretRotated`).

A tenant has at most one current secret (`retired_at` NULL, a unique index says so). A
rotation retires it (`retired_at` = then) and adds a new one; a retired secret still
signs for `GRACE` after it was retired, beside the new one (Standard Webhooks sends
several signatures, space-separated), so receivers can switch without losing a webhook.
"""

from __future__ import annotations

import base64
import secrets as random
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import Connection, sql

GRACE = timedelta(hours=24)
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
TABLE = "webhook_secrets"


def new_secret() -> tuple[str, str]:
    """(secret id, secret): 32 random bytes as Standard Webhooks writes them."""
    return "whs_" + random.token_hex(6), SECRET_PREFIX + base64.b64encode(
        random.token_bytes(32)
    ).decode("ascii")


def ddl(schema: str) -> list[sql.Composed]:
    s = sql.Identifier(schema)
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.{} ("
            " tenant text NOT NULL,"
            " secret_id text NOT NULL,"
            " secret text NOT NULL,"
            " created_at timestamptz NOT NULL,"
            " retired_at timestamptz,"
            " PRIMARY KEY (tenant, secret_id))"
        ).format(s, sql.Identifier(TABLE)),
        sql.SQL(
            "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {}.{} (tenant) WHERE retired_at IS NULL"
        ).format(sql.Identifier(f"{TABLE}_current"), s, sql.Identifier(TABLE)),
    ]


@dataclass(frozen=True)
class SigningSecret:
    tenant: str
    secret_id: str
    secret: str
    created_at: datetime
    retired_at: datetime | None

    def signs_at(self, now: datetime) -> bool:
        return self.retired_at is None or now < self.retired_at + GRACE


class SecretBook:
    """The secrets of every tenant: in PostgreSQL (`connect` gives a connection of the
    ledger's pool), or in memory for a ledger without one (unit tests)."""

    def __init__(self, connect: Any | None, schema: str) -> None:
        self._connect = connect
        self._schema = schema
        self._memory: list[SigningSecret] = []
        self._lock = threading.Lock()

    def _table(self) -> sql.Identifier:
        return sql.Identifier(self._schema, TABLE)

    def _rows(self, conn: Connection[Any], tenant: str) -> list[SigningSecret]:
        rows = conn.execute(
            sql.SQL(
                "SELECT tenant, secret_id, secret, created_at, retired_at FROM {}"
                " WHERE tenant = %s ORDER BY created_at DESC"
            ).format(self._table()),
            (tenant,),
        ).fetchall()
        return [_secret(row) for row in rows]

    def of(self, tenant: str) -> list[SigningSecret]:
        """The tenant's secrets, newest first (retired ones too)."""
        if self._connect is None:
            with self._lock:
                found = [s for s in self._memory if s.tenant == tenant]
            return sorted(found, key=lambda s: s.created_at, reverse=True)
        with self._connect() as conn:
            return self._rows(conn, tenant)

    def create_if_none(self, tenant: str, now: datetime) -> SigningSecret | None:
        """A first secret for the tenant, unless it has a current one: the new secret, or
        None when there was one already (another process may have just made it)."""
        secret_id, secret = new_secret()
        made = SigningSecret(tenant, secret_id, secret, now, None)
        if self._connect is None:
            with self._lock:
                if any(s.tenant == tenant and s.retired_at is None for s in self._memory):
                    return None
                self._memory.append(made)
            return made
        with self._connect() as conn:
            cur = conn.execute(
                sql.SQL(
                    "INSERT INTO {} (tenant, secret_id, secret, created_at) VALUES"
                    " (%s, %s, %s, %s) ON CONFLICT (tenant) WHERE retired_at IS NULL DO NOTHING"
                ).format(self._table()),
                (tenant, secret_id, secret, now),
            )
            conn.commit()
            return made if cur.rowcount == 1 else None

    def rotate(self, tenant: str, now: datetime) -> SigningSecret:
        """Retire the current secret (it signs for GRACE more) and add a new one; a secret
        retired before stops signing now: at most two sign at once."""
        secret_id, secret = new_secret()
        made = SigningSecret(tenant, secret_id, secret, now, None)
        if self._connect is None:
            with self._lock:
                kept = []
                for s in self._memory:
                    if s.tenant == tenant and s.retired_at is None:
                        s = SigningSecret(s.tenant, s.secret_id, s.secret, s.created_at, now)
                    elif s.tenant == tenant and s.retired_at is not None and s.signs_at(now):
                        s = SigningSecret(
                            s.tenant, s.secret_id, s.secret, s.created_at, now - GRACE
                        )
                    kept.append(s)
                self._memory = [*kept, made]
            return made
        with self._connect() as conn, conn.transaction():
            conn.execute(
                sql.SQL(
                    "SELECT pg_advisory_xact_lock(hashtext('taskledger.webhook-secret.' || %s))"
                ),
                (tenant,),
            )
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET retired_at = %s WHERE tenant = %s"
                    " AND retired_at IS NOT NULL AND retired_at > %s"
                ).format(self._table()),
                (now - GRACE, tenant, now - GRACE),
            )
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET retired_at = %s WHERE tenant = %s AND retired_at IS NULL"
                ).format(self._table()),
                (now, tenant),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (tenant, secret_id, secret, created_at) VALUES (%s, %s, %s, %s)"
                ).format(self._table()),
                (tenant, secret_id, secret, now),
            )
        return made


def _secret(row: Any) -> SigningSecret:
    if isinstance(row, dict):
        return SigningSecret(
            row["tenant"], row["secret_id"], row["secret"], row["created_at"], row["retired_at"]
        )
    return SigningSecret(*row)
