"""Checking the log against its hash chain (ledger.chain), and checkpoints to anchor it.

`verify` walks the events in position order and recomputes every digest and link; the
first thing wrong is named by its position, its task and what it means. A checkpoint
(`checkpoint`) is a position and the chain there, signed with HMAC-SHA256 when a signing
key is configured: kept somewhere else, it proves later that the log still holds that
prefix (a deleted tail, or a chain recomputed from some point on, no longer matches).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from psycopg import Connection, sql
from psycopg.rows import tuple_row

from ledger.chain import GENESIS, digest, link
from ledger.log import EVENTS_TABLE

FETCH_ROWS = 2_000  # rows per round trip of the walk's server-side cursor


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or whose signature does not hold."""


@dataclass(frozen=True)
class Problem:
    """The first thing wrong in the log."""

    position: int  # where the walk found it
    task_id: UUID | None  # the task of the event there (None: past the end of the log)
    version: int | None
    kind: str  # changed, unlinked, version_gap, out_of_order, unchained, truncated, rewritten
    detail: str  # what it means, for the operator

    def describe(self) -> str:
        where = f"position {self.position}"
        if self.task_id is not None:
            where += f" (task {self.task_id}, version {self.version})"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class Checkpoint:
    position: int
    chain: bytes
    at: datetime
    hmac: str | None = None  # hex HMAC-SHA256 of `signed_text` under the signing key

    def signed_text(self) -> bytes:
        return f"{self.position}:{self.chain.hex()}:{self.at.isoformat()}".encode()

    def as_json(self) -> bytes:
        """One JSON line: what the operator keeps elsewhere."""
        return orjson.dumps(
            {
                "position": self.position,
                "chain": self.chain.hex(),
                "at": self.at.isoformat(),
                "hmac": self.hmac,
            }
        )

    @classmethod
    def parse(cls, text: str | bytes) -> Checkpoint:
        try:
            data = orjson.loads(text)
            return cls(
                position=int(data["position"]),
                chain=bytes.fromhex(data["chain"]),
                at=datetime.fromisoformat(data["at"]),
                hmac=data.get("hmac"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"not a checkpoint line (want a JSON object with position, chain, at): {error}"
            ) from None

    def signed(self, key: bytes) -> Checkpoint:
        mac = hmac.new(key, self.signed_text(), hashlib.sha256).hexdigest()
        return Checkpoint(self.position, self.chain, self.at, mac)

    def check_signature(self, key: bytes | None) -> str | None:
        """None when the signature holds; otherwise why the checkpoint is not to be trusted
        (unsigned while a key is configured; signed with another key, or edited)."""
        if key is None:
            return None
        if self.hmac is None:
            return "the checkpoint is not signed, but a signing key is configured"
        expected = hmac.new(key, self.signed_text(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.hmac):
            return "the checkpoint's HMAC does not hold: it was edited, or signed with another key"
        return None


@dataclass
class Report:
    events: int = 0  # events checked
    streams: int = 0  # tasks and API keys: each has its own stream of events
    head_position: int = 0  # the last one checked
    head_chain: bytes = GENESIS
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problem(self) -> Problem | None:
        """The first problem in position order."""
        return self.problems[0] if self.problems else None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """Counts, positions and hashes: nothing of any task's content or id."""
        problem = self.problem
        return {
            "status": "ok" if problem is None else "broken",
            "events": self.events,
            "head": {"position": self.head_position, "chain": self.head_chain.hex()},
            "problem": None
            if problem is None
            else {"position": problem.position, "kind": problem.kind},
            "seconds": round(self.seconds, 3),
        }


def _rows(
    conn: Connection[Any], schema: str, task: UUID | None
) -> Iterator[tuple[int, UUID, int, str, bytes, bytes | None, bytes | None, bytes | None]]:
    """(position, task, version, topic, state, digest, chain, the chain before) in order."""
    table = sql.Identifier(schema, EVENTS_TABLE)
    if task is None:
        query = sql.SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state, digest,"
            " chain, NULL FROM {} ORDER BY notification_id"
        ).format(table)
        params: tuple[Any, ...] = ()
    else:
        query = sql.SQL(
            "SELECT e.notification_id, e.originator_id, e.originator_version, e.topic, e.state,"
            " e.digest, e.chain, (SELECT p.chain FROM {t} p"
            "  WHERE p.notification_id < e.notification_id"
            "  ORDER BY p.notification_id DESC LIMIT 1)"
            " FROM {t} e WHERE e.originator_id = %s ORDER BY e.originator_version"
        ).format(t=table)
        params = (task,)
    with conn.transaction(), conn.cursor("taskledger_verify", row_factory=tuple_row) as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(query, params)
        for row in cur:
            yield (
                row[0],
                row[1],
                row[2],
                row[3],
                bytes(row[4]),
                _maybe(row[5]),
                _maybe(row[6]),
                _maybe(row[7]),
            )


def _maybe(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


MAX_PROBLEMS = 10  # the walk goes on after the first, to explain it (whose event is gone)


def verify(
    conn: Connection[Any],
    schema: str,
    *,
    task: UUID | None = None,
    checkpoint: Checkpoint | None = None,
    expected_versions: Mapping[UUID, int] | None = None,
) -> Report:
    """Walk the log (or one task's events) and recompute its chain.

    Per event: its digest matches its bytes (else it was `changed`); its chain follows
    from the event before it (else one was deleted or inserted there, or events were
    swapped: `unlinked`); its task's versions go 1, 2, 3 in position order (else
    `version_gap` or `out_of_order`). With a checkpoint, the log still holds its position
    with its chain (else `truncated`, or `rewritten`). With `expected_versions` (each
    task's version as a view last saw it), no task's log ends before that version
    (else `tail_deleted`: its newest events, or the whole task, were deleted).

    The walk goes on after a problem (relinking from the stored chain) to find what
    explains it, up to MAX_PROBLEMS; `problems[0]` is the first in position order."""
    started = time.perf_counter()
    report = Report()
    versions: dict[UUID, int] = {}
    previous, linked_at = GENESIS, 0
    for position, task_id, version, topic, state, stored_digest, stored_chain, before in _rows(
        conn, schema, task
    ):
        report.events += 1
        found = _check(
            position,
            task_id,
            version,
            topic,
            state,
            stored_digest,
            stored_chain,
            previous if task is None else (before or GENESIS),
            versions.get(task_id, 0),
            linked_at,
        )
        if found is not None:
            report.problems.append(found)
            if len(report.problems) >= MAX_PROBLEMS:
                break
        previous = stored_chain or GENESIS
        linked_at = position
        versions[task_id] = max(version, versions.get(task_id, 0))
        report.head_position, report.head_chain = position, previous
        if (
            checkpoint is not None
            and position == checkpoint.position
            and previous != checkpoint.chain
        ):
            report.problems.append(
                Problem(
                    position,
                    task_id,
                    version,
                    "rewritten",
                    f"the chain here is {previous.hex()[:16]}…, the checkpoint of "
                    f"{checkpoint.at.isoformat()} says {checkpoint.chain.hex()[:16]}…: "
                    "the log was rewritten from this position or before",
                )
            )
    if checkpoint is not None and task is None and report.head_position < checkpoint.position:
        report.problems.append(
            Problem(
                checkpoint.position,
                None,
                None,
                "truncated",
                f"the log ends at position {report.head_position}, before the checkpoint's "
                f"position {checkpoint.position} (of {checkpoint.at.isoformat()}): events were "
                "deleted from its end, or that position was deleted",
            )
        )
    if expected_versions is not None and task is None:
        for task_id, expected in sorted(expected_versions.items(), key=lambda kv: str(kv[0])):
            have = versions.get(task_id, 0)
            if have < expected:
                report.problems.append(
                    Problem(
                        report.head_position,
                        task_id,
                        have or None,
                        "tail_deleted",
                        f"the task's events end at version {have} in the log, but it had "
                        f"reached version {expected}: "
                        + (
                            "the whole task was deleted"
                            if not have
                            else "its newest events were deleted"
                        ),
                    )
                )
    report.problems.sort(key=lambda found: found.position)
    report.streams = len(versions)
    report.seconds = time.perf_counter() - started
    return report


def _check(
    position: int,
    task_id: UUID,
    version: int,
    topic: str,
    state: bytes,
    stored_digest: bytes | None,
    stored_chain: bytes | None,
    previous: bytes,
    last_version: int,
    linked_at: int,
) -> Problem | None:
    def problem(kind: str, detail: str) -> Problem:
        return Problem(position, task_id, version, kind, detail)

    if stored_digest is None or stored_chain is None:
        return problem(
            "unchained",
            "the event has no digest or chain: written around the store (not by taskledger), "
            "or by a version before the chain while a newer one ran",
        )
    if digest(task_id, version, topic, state) != stored_digest:
        return problem(
            "changed",
            "the event's bytes do not match its digest: its payload, task, version or type "
            "was changed after it was stored",
        )
    if version != last_version + 1:
        if version <= last_version:
            return problem(
                "out_of_order",
                f"version {version} comes after version {last_version} of the same task in "
                "the log: events were moved or swapped",
            )
        return problem(
            "version_gap",
            f"the task's version {version} follows version {last_version}: versions "
            f"{last_version + 1}..{version - 1} were deleted",
        )
    if link(previous, stored_digest) != stored_chain:
        return problem(
            "unlinked",
            f"the event's chain does not follow from the event before it in the log (position "
            f"{linked_at}): events between them were deleted, or inserted, or changed with "
            "their digest, or events were swapped",
        )
    return None


def head(conn: Connection[Any], schema: str) -> tuple[int, bytes]:
    """The last position and the chain there ((0, GENESIS) for an empty log)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            sql.SQL(
                "SELECT notification_id, chain FROM {} ORDER BY notification_id DESC LIMIT 1"
            ).format(sql.Identifier(schema, EVENTS_TABLE))
        ).fetchone()
    if row is None:
        return 0, GENESIS
    return int(row[0]), _maybe(row[1]) or GENESIS


def checkpoint(
    conn: Connection[Any], schema: str, key: bytes | None, now: datetime | None = None
) -> Checkpoint:
    """The log's head as a checkpoint, signed when `key` is given."""
    position, chain = head(conn, schema)
    made = Checkpoint(position, chain, now or datetime.now(UTC))
    return made.signed(key) if key is not None else made
