"""Following the event log into a projection: batches, LISTEN/NOTIFY, leader election.

Why not the library's ProjectionRunner: it applies one event per transaction (about 660
events/s measured here) and wakes on a 0.1 s poll. Here, a batch of up to `batch_size`
events is applied in one transaction with one tracking update; the runner sleeps on
LISTEN for the ledger's insert notifications, with a poll every `poll_interval` as a
safety net in case a notification is lost.

Exactly once: each batch locks the projection's tracking row (FOR UPDATE), reads the
events after its position, writes the view rows and the new position, and commits. A
runner killed anywhere in between leaves the old position and no rows; the next batch
(by it or by another process) starts from there.

One reader for all the views: a runner follows a group of projections (the api runs
all of them in one), reading and decoding each batch of events once and applying it to
every projection it leads in one transaction, with one commit. Five runners each reading,
decoding and committing the same events cost the api 44 % of its CPU under the no-op load
(docs/performance.md, "Where the CPU goes"). A projection more than a batch behind the
others (a new one, catching up) is applied on its own, in transactions of its own, so
the rest do not wait for it. A batch that fails in the group is applied again one
projection at a time for a while (`SOLO_SECONDS`), so that a view that cannot apply an
event stalls only itself, and the log names it.

Leader election: any number of processes may run a projection; the one holding the
PostgreSQL advisory lock for it applies batches, the others retry the lock every
`standby_interval` and take over when the leader's session ends. A group runner holds the
lock of each of its projections separately and keeps trying the ones it lacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import Connection, sql

from ledger import log as event_log
from ledger.log import Change, read_changes
from projections import base, leadership, tracking
from projections.base import Projection
from projections.tracking import Generation

log = logging.getLogger(__name__)


def extend_to_transaction_end(
    conn: Connection[Any], schema: str, changes: list[Change]
) -> list[Change]:
    """Grow a full batch so it does not end between events of one task saved together.

    A task's events from one save (TaskSubmitted + AttemptScheduled, AttemptFailed +
    AttemptScheduled) are committed together; stopping a batch between them would show a
    state the task never had (Failed, then Pending again). Events are only ever added to
    the batch, never removed, so positions stay contiguous.
    """
    while changes:
        last = changes[-1]
        following = read_changes(conn, schema, last.position, 8)
        added = 0
        for change in following:
            if change.task_id != last.task_id or change.version != last.version + 1:
                break
            changes.append(change)
            last = change
            added += 1
        if added < len(following) or not following:
            break
    return changes


class Applied(NamedTuple):
    """What applying a batch to one generation came to."""

    generation: Generation  # with its new position
    events: int  # how many events it applied
    # The read was cut short by the batch's size or its bytes: more may follow at once. A
    # batch of fewer than `batch_size` events is not the end of the log when big outputs
    # filled its BATCH_BYTES.
    full: bool


def apply_batch(
    conn: Connection[Any],
    schema: str,
    projection: Projection,
    batch_size: int,
    generation: int | None = None,
) -> Applied:
    """Apply the next batch to the current generation (or `generation`) in one transaction."""
    with conn.transaction():
        if generation is None:
            (gen,) = tracking.lock_current_generations(conn, schema, [projection.name])
        else:
            position = tracking.lock_generation(conn, schema, projection.name, generation)
            gen = Generation(projection.name, generation, position)
        return _apply(conn, schema, [(projection, gen)], batch_size)[0]


def apply_group(
    conn: Connection[Any], schema: str, projections: Sequence[Projection], batch_size: int
) -> tuple[list[Applied], list[Projection]]:
    """Apply the next batch to the current generation of each of `projections` in one
    transaction, the events read and decoded once. Returns what it came to for each
    projection it applied, and the projections left out: those more than a batch behind
    the newest, which the caller applies on their own (apply_batch)."""
    with conn.transaction():
        gens = tracking.lock_current_generations(conn, schema, [p.name for p in projections])
        newest = max(g.position for g in gens)
        front = [
            (p, g)
            for p, g in zip(projections, gens, strict=True)
            if newest - g.position <= batch_size
        ]
        behind = [
            p for p, g in zip(projections, gens, strict=True) if newest - g.position > batch_size
        ]
        return _apply(conn, schema, front, batch_size), behind


def _apply(
    conn: Connection[Any],
    schema: str,
    targets: Sequence[tuple[Projection, Generation]],
    batch_size: int,
) -> list[Applied]:
    """Within the caller's transaction, which holds the targets' tracking rows: read the
    batch after the oldest of their positions and give each target what is past its own."""
    changes = read_changes(conn, schema, min(g.position for _, g in targets), batch_size)
    full = bool(changes) and (
        len(changes) == batch_size or sum(c.size for c in changes) >= event_log.BATCH_BYTES
    )
    if full:
        changes = extend_to_transaction_end(conn, schema, changes)
    results = []
    moves = []
    for projection, gen in targets:
        mine = [c for c in changes if c.position > gen.position]
        if not mine:
            results.append(Applied(gen, 0, full))
            continue
        wanted = [c for c in mine if c.stream in projection.streams]
        if wanted:
            with conn.cursor() as cur:
                projection.apply(cur, schema, sql.Identifier(schema, gen.table), wanted)
        moves.append((gen, mine[-1].position))
        moved = Generation(projection.name, gen.generation, mine[-1].position)
        results.append(Applied(moved, len(mine), full))
    if moves:
        tracking.advance_many(conn, schema, moves)
    return results


# After a batch fails in the group, how long the runner applies each projection alone.
SOLO_SECONDS = 60.0


class ProjectionRunner:
    """Keeps one projection, or a group of them, up to date while this process leads them."""

    def __init__(
        self,
        database_url: str,
        schema: str,
        projections: Projection | Sequence[Projection],
        *,
        batch_size: int = 2_000,
        poll_interval: float = 1.0,
        standby_interval: float = 0.5,
        on_batch: Callable[[Generation, int], None] | None = None,
    ) -> None:
        self.database_url = database_url
        self.schema = schema
        self.projections = (
            (projections,) if isinstance(projections, Projection) else tuple(projections)
        )
        if not self.projections:
            raise ValueError("a projection runner needs at least one projection")
        self.name = "+".join(p.name for p in self.projections)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.on_batch = on_batch
        self.is_leader = threading.Event()  # set while it leads every one of its projections
        self.position = 0  # the lowest position of the projections it leads
        self._positions: dict[str, int] = {}
        self._position_changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def install(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            for projection in self.projections:
                base.ensure_installed(conn, self.schema, projection)

    def start(self) -> None:
        self.install()
        self._thread = threading.Thread(
            target=self.run, name=f"projection-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_for(self, position: int, timeout: float) -> bool:
        """Wait until this runner has applied `position` to every projection it leads
        (only useful in the leader)."""
        deadline = time.monotonic() + timeout
        with self._position_changed:
            while self.position < position:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._position_changed.wait(remaining)
        return True

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Elect, follow, and on any connection failure start over, until stopped."""
        while not self._stop.is_set():
            try:
                self._run_once()
            except psycopg.OperationalError as error:
                self.is_leader.clear()
                log.warning(
                    "projection lost its database connection; reconnecting",
                    extra={"projection": self.name, "error": str(error)},
                )
                self._stop.wait(self.standby_interval)
            except Exception:
                self.is_leader.clear()
                log.exception(
                    "projection failed; retrying. If this repeats, the view may need "
                    "`taskledger projections rebuild`",
                    extra={"projection": self.name},
                )
                self._stop.wait(5 * self.standby_interval)

    def _run_once(self) -> None:
        with (
            psycopg.connect(self.database_url, autocommit=True) as session,
            psycopg.connect(self.database_url) as conn,
        ):
            try:
                self._follow(session, conn)
            finally:
                self.is_leader.clear()

    def _elect(self, session: Connection[Any], held: list[Projection]) -> None:
        """Try the lock of each projection not led yet; `held` keeps the runner's order."""
        for projection in self.projections:
            if projection in held:
                continue
            key = leadership.lock_key("projection", self.schema, projection.name)
            if leadership.try_lead(session, key):
                if not held:  # notified of every insert from now on
                    session.execute(event_log.listen())
                held.append(projection)
                held.sort(key=self.projections.index)
                log.info(
                    "projection leader: following the event log",
                    extra={"projection": projection.name},
                )
        if len(held) == len(self.projections):
            self.is_leader.set()

    def _follow(self, session: Connection[Any], conn: Connection[Any]) -> None:
        held: list[Projection] = []
        next_election = 0.0
        solo_until = 0.0
        resting: dict[str, float] = {}  # a projection that failed alone, until when it rests
        while not self._stop.is_set():
            missing = len(held) < len(self.projections)
            if missing and time.monotonic() >= next_election:
                self._elect(session, held)
                next_election = time.monotonic() + self.standby_interval
            if not held:
                self._stop.wait(self.standby_interval)
                continue
            if len(held) > 1 and time.monotonic() >= solo_until:
                try:
                    results, behind = apply_group(conn, self.schema, held, self.batch_size)
                except (psycopg.OperationalError, tracking.PositionConflict):
                    raise
                except Exception:
                    log.exception(
                        "projections failed to apply a batch together; applying each alone"
                        f" for {SOLO_SECONDS:.0f} s to find which one cannot",
                        extra={"projection": self.name},
                    )
                    solo_until = time.monotonic() + SOLO_SECONDS
                    continue
            else:
                results, behind = [], list(held)
            for projection in behind:
                if resting.get(projection.name, 0.0) > time.monotonic():
                    continue
                try:
                    results.append(apply_batch(conn, self.schema, projection, self.batch_size))
                except (psycopg.OperationalError, tracking.PositionConflict):
                    raise
                except Exception:
                    if len(held) == 1:
                        raise
                    log.exception(
                        "projection failed; the others go on. If this repeats, the view may"
                        " need `taskledger projections rebuild`",
                        extra={"projection": projection.name},
                    )
                    resting[projection.name] = time.monotonic() + 5 * self.standby_interval
            self._publish(held, results)
            if any(applied.full for applied in results):
                continue  # catching up: no waiting
            # Wait for the ledger's NOTIFY; the timeout is the safety-net poll (shorter
            # while some lock is still to be taken).
            timeout = self.standby_interval if missing else self.poll_interval
            for _ in session.notifies(timeout=timeout, stop_after=1):
                pass

    def _publish(self, held: list[Projection], results: list[Applied]) -> None:
        for gen, applied, _ in results:
            self._positions[gen.projection] = gen.position
            if applied and self.on_batch is not None:
                self.on_batch(gen, applied)
        position = min(self._positions.get(p.name, 0) for p in held)
        with self._position_changed:
            if position != self.position:
                self.position = position
                self._position_changed.notify_all()
