"""Attempt leases and worker heartbeats: rows in PostgreSQL beside the event store (not
events: they change every few seconds and say nothing a task's history needs).

Once AttemptStarted is stored, the ledger owns the running attempt; its worker holds a
lease on it, renewed by heartbeats. The store keeps the lease in step with the events, in
the same transaction as them (see `LeaseBook`, called by the ledger's recorder):

- AttemptStarted grants the lease (`lease_seconds` from the transaction's time);
- an outcome the worker records (AttemptCompleted, AttemptFailed, TaskExpired detected by
  the worker) is stored only while the lease is held and not lapsed, and settles it: a
  worker whose lease lapsed cannot record over the retry (`LeaseLostError`);
- AttemptFailed(worker_lost), TaskExpired by the reaper and TaskCancelled settle it.

The leader (the reaper) takes lapsed leases (`Leases.take_lapsed`): it marks them lost
(which refuses the worker's late outcome from then on) and appends
AttemptFailed(worker_lost), after which the normal retry rule applies. The lease row's
lock orders the two: whichever of the worker's outcome and the leader's take comes first
wins, the other changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from eventsourcing.persistence import IntegrityError, StoredEvent
from psycopg import sql

log = logging.getLogger(__name__)

LEASES_TABLE = "attempt_leases"
WORKERS_TABLE = "workers"
SETTLE_FUNCTION = "taskledger_lease"
LEASE_LOST_SQLSTATE = "23TL1"  # integrity class: the store refused the write
_TOPIC = "ledger.domain:Task."


class LeaseLostError(IntegrityError):
    """An outcome of a worker whose lease on the attempt is lost or lapsed: not stored.

    An IntegrityError, so that a group commit that carried it retries its other writes."""


def ddl(schema: str) -> list[sql.Composed]:
    """The tables and the settling function (idempotent)."""
    leases = sql.Identifier(schema, LEASES_TABLE)
    workers = sql.Identifier(schema, WORKERS_TABLE)
    function = sql.Identifier(schema, SETTLE_FUNCTION)
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " task_id uuid NOT NULL, attempt integer NOT NULL, worker_id text NOT NULL,"
            " granted_at timestamptz NOT NULL DEFAULT now(), expires_at timestamptz NOT NULL,"
            " state text NOT NULL DEFAULT 'held' CHECK (state IN ('held', 'lost')),"
            " PRIMARY KEY (task_id, attempt))"
        ).format(leases),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (expires_at) WHERE state = 'held'").format(
            sql.Identifier(f"{LEASES_TABLE}_expiry"), leases
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (worker_id)").format(
            sql.Identifier(f"{LEASES_TABLE}_worker"), leases
        ),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " worker_id text PRIMARY KEY, host text NOT NULL, pid integer NOT NULL,"
            " version text NOT NULL, slots integer NOT NULL, busy integer NOT NULL,"
            " running jsonb NOT NULL DEFAULT '[]', started_at timestamptz NOT NULL,"
            " last_seen timestamptz NOT NULL, stopped_at timestamptz)"
        ).format(workers),
        # grant: AttemptStarted. hold: the worker's own outcome (the lease must be held
        # and not lapsed; an attempt from before leases has no row and passes). settle:
        # the end of the attempt recorded by anyone else.
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {function}("
            " op text, task uuid, n integer, worker text, seconds double precision)"
            " RETURNS void LANGUAGE plpgsql AS $body$"
            " DECLARE found_state text; found_expiry timestamptz;"
            " BEGIN"
            "  IF op = 'grant' THEN"
            "   INSERT INTO {leases} (task_id, attempt, worker_id, expires_at)"
            "   VALUES (task, n, worker, now() + seconds * interval '1 second')"
            "   ON CONFLICT (task_id, attempt) DO NOTHING;"
            "   RETURN;"
            "  END IF;"
            "  IF op = 'hold' THEN"
            "   SELECT state, expires_at INTO found_state, found_expiry FROM {leases}"
            "   WHERE task_id = task AND attempt = n FOR UPDATE;"
            "   IF FOUND AND (found_state <> 'held' OR found_expiry < clock_timestamp()) THEN"
            "    RAISE EXCEPTION 'the lease on attempt % of task % is %', n, task,"
            "     CASE WHEN found_state = 'lost' THEN 'lost' ELSE 'lapsed' END"
            "     USING ERRCODE = '{sqlstate}';"
            "   END IF;"
            "  END IF;"
            "  DELETE FROM {leases} WHERE task_id = task AND attempt = n;"
            " END $body$"
        ).format(function=function, leases=leases, sqlstate=sql.SQL(LEASE_LOST_SQLSTATE)),
    ]


class LeaseBook:
    """What the events of one transaction do to the leases; run in that transaction."""

    def __init__(self, schema: str, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._call = sql.SQL("SELECT {}(%s, %s, %s, %s, %s)").format(
            sql.Identifier(schema, SETTLE_FUNCTION)
        )

    def write(self, cursor: psycopg.Cursor[Any], events: Sequence[StoredEvent]) -> None:
        for event in events:
            step = _lease_step(event)
            if step is not None:
                op, attempt, worker = step
                cursor.execute(
                    self._call, (op, event.originator_id, attempt, worker, self.lease_seconds)
                )

    @staticmethod
    def translate(error: IntegrityError) -> IntegrityError:
        """The store's refusal of a lost lease, as LeaseLostError; others as they are."""
        cause = error.__cause__
        if isinstance(cause, psycopg.Error) and cause.sqlstate == LEASE_LOST_SQLSTATE:
            message = cause.diag.message_primary or str(cause)
            return LeaseLostError(message)
        return error


def _lease_step(event: StoredEvent) -> tuple[str, int, str] | None:
    """(op, attempt, worker) for an event that concerns a lease, else None."""
    topic = event.topic
    if not topic.startswith(_TOPIC):
        return None
    name = topic[len(_TOPIC) :]
    if name not in ("AttemptStarted", "AttemptCompleted", "AttemptFailed", "TaskExpired"):
        if name == "TaskCancelled":
            return ("settle", orjson.loads(event.state)["attempt"], "")
        return None
    state = orjson.loads(event.state)
    attempt = int(state["attempt"])
    if name == "AttemptStarted":
        return ("grant", attempt, str(state["worker_id"]))
    if name == "AttemptFailed" and state["error"].get("kind") == "worker_lost":
        return ("settle", attempt, "")
    if name == "TaskExpired" and state["detected_by"] != "worker":
        return ("settle", attempt, "")
    return ("hold", attempt, "")


@dataclass(frozen=True)
class LapsedLease:
    task_id: UUID
    attempt: int
    worker_id: str
    expires_at: datetime


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says of itself with each heartbeat."""

    worker_id: str
    host: str
    pid: int
    version: str
    slots: int
    busy: int
    running: list[dict[str, Any]]  # task_id, attempt, language, started_at (ISO)
    started_at: datetime


class Leases:
    """The lease and heartbeat queries, over the ledger's connection pool."""

    def __init__(self, connections: Any, schema: str, lease_seconds: float) -> None:
        self._connections = connections  # eventsourcing's PostgresDatastore
        self.lease_seconds = lease_seconds
        leases = sql.Identifier(schema, LEASES_TABLE)
        workers = sql.Identifier(schema, WORKERS_TABLE)
        self._renew = sql.SQL(
            "UPDATE {} SET expires_at = now() + %(seconds)s * interval '1 second'"
            " WHERE worker_id = %(worker)s AND state = 'held'"
            " AND (task_id, attempt) IN"
            " (SELECT * FROM unnest(%(tasks)s::uuid[], %(attempts)s::int[]))"
            " RETURNING task_id, attempt"
        ).format(leases)
        self._beat = sql.SQL(
            "INSERT INTO {} (worker_id, host, pid, version, slots, busy, running, started_at,"
            " last_seen, stopped_at) VALUES (%(worker_id)s, %(host)s, %(pid)s, %(version)s,"
            " %(slots)s, %(busy)s, %(running)s, %(started_at)s, now(), %(stopped_at)s)"
            " ON CONFLICT (worker_id) DO UPDATE SET busy = EXCLUDED.busy,"
            " running = EXCLUDED.running, last_seen = now(), stopped_at = EXCLUDED.stopped_at"
        ).format(workers)
        self._take = sql.SQL(
            "UPDATE {} SET state = 'lost' WHERE state = 'lost'"
            " OR (state = 'held' AND expires_at < now())"
            " RETURNING task_id, attempt, worker_id, expires_at"
        ).format(leases)
        self._drop = sql.SQL("DELETE FROM {} WHERE task_id = %s AND attempt = %s").format(leases)
        self._list = sql.SQL(
            "SELECT worker_id, host, pid, version, slots, busy, running, started_at, last_seen,"
            " stopped_at, now() - last_seen AS silence FROM {}"
            " WHERE last_seen > now() - %s * interval '1 second' ORDER BY worker_id"
        ).format(workers)
        self._held = sql.SQL(
            "SELECT worker_id, state, expires_at FROM {} WHERE task_id = %s AND attempt = %s"
        ).format(leases)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._connections.get_connection() as conn:
            yield conn

    def heartbeat(
        self, info: WorkerInfo, *, stopped: datetime | None = None
    ) -> set[tuple[UUID, int]]:
        """Renew the worker's leases on its running attempts and record that it is alive;
        the attempts whose lease it still holds (the others are lost: kill them)."""
        running = [(UUID(str(r["task_id"])), int(r["attempt"])) for r in info.running]
        with self._connection() as conn, conn.transaction():
            held = {
                (row["task_id"], row["attempt"])
                for row in conn.execute(
                    self._renew,
                    {
                        "seconds": self.lease_seconds,
                        "worker": info.worker_id,
                        "tasks": [t for t, _ in running],
                        "attempts": [a for _, a in running],
                    },
                ).fetchall()
            }
            conn.execute(
                self._beat,
                {
                    "worker_id": info.worker_id,
                    "host": info.host,
                    "pid": info.pid,
                    "version": info.version,
                    "slots": info.slots,
                    "busy": info.busy,
                    "running": orjson.dumps(info.running).decode(),
                    "started_at": info.started_at,
                    "stopped_at": stopped,
                },
            )
        return held

    def take_lapsed(self) -> list[LapsedLease]:
        """Mark lapsed leases lost (the worker can no longer record an outcome) and return
        them, with those marked before whose attempt is not settled yet."""
        with self._connection() as conn:
            rows = conn.execute(self._take).fetchall()
        return [
            LapsedLease(row["task_id"], row["attempt"], row["worker_id"], row["expires_at"])
            for row in rows
        ]

    def drop(self, task_id: UUID, attempt: int) -> None:
        """Forget a lease whose attempt ended some other way."""
        with self._connection() as conn:
            conn.execute(self._drop, (task_id, attempt))

    def held(self, task_id: UUID, attempt: int) -> tuple[str, str, datetime] | None:
        """(worker, state, expires_at) of an attempt's lease, if it has one."""
        with self._connection() as conn:
            row = conn.execute(self._held, (task_id, attempt)).fetchone()
        return None if row is None else (row["worker_id"], row["state"], row["expires_at"])

    def workers(self, seen_within_seconds: float) -> list[dict[str, Any]]:
        """The workers that sent a heartbeat within the last `seen_within_seconds`."""
        with self._connection() as conn:
            rows = conn.execute(self._list, (seen_within_seconds,)).fetchall()
        return [dict(row) for row in rows]
