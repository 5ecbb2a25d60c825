"""Operating projections: status (positions and lag) and rebuild without downtime."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import Connection, sql

from ledger.log import head_position
from projections import base, tracking
from projections.base import Projection
from projections.runner import apply_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectionStatus:
    name: str
    generation: int
    position: int
    head: int
    updated_at: datetime

    @property
    def lag(self) -> int:
        """Events in the log not yet applied (an upper bound: positions can have holes)."""
        return max(0, self.head - self.position)


def status(conn: Connection[Any], schema: str) -> list[ProjectionStatus]:
    head = head_position(conn, schema)
    return [
        ProjectionStatus(gen.projection, gen.generation, gen.position, head, at)
        for gen, at in tracking.views(conn, schema)
    ]


@dataclass(frozen=True)
class RebuildReport:
    name: str
    old_generation: int
    new_generation: int
    events: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def rebuild(
    database_url: str, schema: str, projection: Projection, *, batch_size: int = 5_000
) -> RebuildReport:
    """Build a new generation of the view from position 0 beside the live one, then switch.

    1. create generation N+1 (empty, position 0) and fill it batch by batch while the
       live generation N keeps serving reads and following the log;
    2. in one transaction: lock N's tracking row (the live runner pauses), apply the last
       events to N+1, point the view and the catalog at N+1;
    3. drop generation N.
    """
    started = time.perf_counter()
    with psycopg.connect(database_url) as conn:
        conn.autocommit = True
        base.ensure_installed(conn, schema, projection)
        old = tracking.current_generation(conn, schema, projection.name)
        row = conn.execute(
            sql.SQL(
                "SELECT coalesce(max(generation), 0) FROM {}.projection_tracking"
                " WHERE projection = %s"
            ).format(sql.Identifier(schema)),
            (projection.name,),
        ).fetchone()
        new = (int(row[0]) if row else old.generation) + 1
        conn.autocommit = False
        with conn.transaction():
            base.create_generation(conn, schema, projection, new)
        events = 0
        while True:
            gen, applied, full = apply_batch(conn, schema, projection, batch_size, generation=new)
            events += applied
            if not full:
                break
            log.info(
                "rebuilding projection",
                extra={"projection": projection.name, "generation": new, "position": gen.position},
            )
        with conn.transaction():
            tracking.lock_current_generations(conn, schema, [projection.name])
            while True:
                # Nested: each batch is a savepoint inside the switch transaction.
                _, applied, full = apply_batch(conn, schema, projection, batch_size, generation=new)
                events += applied
                if not full:
                    break
            base.switch_to(conn, schema, projection, new)
        with conn.transaction():
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.Identifier(
                        schema, tracking.generation_table(projection.name, old.generation)
                    )
                )
            )
            conn.execute(
                sql.SQL(
                    "DELETE FROM {}.projection_tracking WHERE projection = %s AND generation = %s"
                ).format(sql.Identifier(schema)),
                (projection.name, old.generation),
            )
    report = RebuildReport(
        projection.name, old.generation, new, events, time.perf_counter() - started
    )
    log.info(
        "projection rebuilt",
        extra={
            "projection": projection.name,
            "generation": new,
            "events": events,
            "events_per_second": round(report.events_per_second),
        },
    )
    return report
