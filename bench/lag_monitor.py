"""Live projection lag of a running taskledger, seen from outside its processes (in a
process of its own, so that the benchmark's client does not delay its clock readings).

``python -m bench.lag_monitor URL SCHEMA OUT`` runs until SIGTERM or SIGINT, then writes
its samples to OUT as JSON. It LISTENs on the ledger's insert channel and the projections'
channel and, at every wake-up (or every ``POLL`` s without one), reads in one statement
the log's head and each current view's tracking position, with the monotonic time. A
view's lag for a head is the time from the first snapshot showing that head to the first
showing the view at or past it; the resolution is the median gap between snapshots.
"""

from __future__ import annotations

import itertools
import json
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg import sql

from bench.cpu import BENCH_APPLICATION
from bench.processes import ManagedProcess
from ledger.log import EVENTS_CHANNEL, EVENTS_TABLE
from projections.tracking import PROJECTION_CHANNEL

POLL = 0.05  # seconds without a notification before a snapshot anyway
DRAIN = 0.0005  # after a wake-up, collect notifications arriving this soon (one snapshot)

Sample = tuple[float, int, dict[str, int]]


def _snapshot_query(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT (SELECT coalesce(max(notification_id), 0) FROM {events}),"
        " (SELECT coalesce(json_object_agg(c.projection, t.position), '{{}}'::json)"
        "  FROM {current} c JOIN {tracking} t"
        "  ON t.projection = c.projection AND t.generation = c.generation)"
    ).format(
        events=sql.Identifier(schema, EVENTS_TABLE),
        current=sql.Identifier(schema, "projection_current"),
        tracking=sql.Identifier(schema, "projection_tracking"),
    )


def monitor(url: str, schema: str, out: Path) -> None:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    samples: list[Sample] = []
    query = _snapshot_query(schema)
    with psycopg.connect(url, autocommit=True, application_name=BENCH_APPLICATION) as conn:
        for channel in (EVENTS_CHANNEL, PROJECTION_CHANNEL):
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        print("lag monitor: listening", file=sys.stderr, flush=True)
        last: tuple[int, dict[str, int]] | None = None
        while not stopping:
            for _ in conn.notifies(timeout=POLL, stop_after=1):
                pass
            for _ in conn.notifies(timeout=DRAIN):
                pass
            before = time.monotonic()
            row = conn.execute(query, prepare=True).fetchone()
            after = time.monotonic()
            if row is None:
                continue
            head, positions = int(row[0]), {str(k): int(v) for k, v in dict(row[1]).items()}
            if last is None or (head, positions) != last:
                samples.append(((before + after) / 2, head, positions))
                last = (head, positions)
    out.write_text(json.dumps({"samples": samples}))


@dataclass
class LagResult:
    lags_ms: dict[str, list[float]]  # projection -> one lag per head advance
    missing: dict[str, int]  # head advances the projection never reached while watched
    resolution_ms: float | None  # median gap between snapshots while the head moved


def lags(samples: Sequence[Sample]) -> LagResult:
    """Per projection, the lag of every head advance after the first snapshot."""
    if not samples:
        return LagResult({}, {}, None)
    names = sorted({name for _, _, positions in samples for name in positions})
    advances: list[tuple[float, int]] = []
    previous_head = samples[0][1]
    for t, head, _ in samples[1:]:
        if head > previous_head:
            advances.append((t, head))
            previous_head = head
    result: dict[str, list[float]] = {}
    missing: dict[str, int] = {}
    for name in names:
        reached = [(t, positions.get(name, 0)) for t, _, positions in samples]
        values: list[float] = []
        lost = 0
        index = 0
        for t, head in advances:  # heads and positions only grow: one forward scan
            while index < len(reached) and (reached[index][1] < head or reached[index][0] < t):
                index += 1
            if index == len(reached):
                lost += 1
                continue
            values.append(max(0.0, (reached[index][0] - t) * 1000))
        result[name] = values
        missing[name] = lost
    resolution = None
    if len(advances) > 1:
        first, last = advances[0][0], advances[-1][0]
        times = [t for t, _, _ in samples if first <= t <= last]
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
        resolution = statistics.median(gaps) if gaps else None
    return LagResult(result, missing, resolution)


class LagMonitor:
    """The monitor as a subprocess of the benchmark (`with LagMonitor(...) as m: ...`,
    then `m.result()`)."""

    def __init__(self, url: str, schema: str, workdir: Path, env: dict[str, str]) -> None:
        self.out = workdir / "lag-samples.json"
        self.out.unlink(missing_ok=True)
        command = [sys.executable, "-m", "bench.lag_monitor", url, schema, str(self.out)]
        self.process = ManagedProcess("lag-monitor", command, env, workdir, stop_timeout=10)

    def __enter__(self) -> LagMonitor:
        self.process.start()
        deadline = time.monotonic() + 15
        while "listening" not in self.process.stderr_path.read_text(errors="replace"):
            if not self.process.alive() or time.monotonic() > deadline:
                raise RuntimeError("the lag monitor did not start\n" + self.process.output_tail())
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()

    def result(self) -> LagResult:
        self.process.stop()
        if not self.out.exists():
            raise RuntimeError("the lag monitor wrote nothing\n" + self.process.output_tail())
        samples: list[Any] = json.loads(self.out.read_text())["samples"]
        return lags([(t, head, positions) for t, head, positions in samples])


if __name__ == "__main__":
    url, schema, out = sys.argv[1:]
    monitor(url, schema, Path(out))
