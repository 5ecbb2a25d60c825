"""What every benchmark prints and keeps: its command line's common part, the header (the
machine, the code measured), percentiles and figures over rounds, the markdown table, the
footer (how noisy the run was) and the raw figures as JSON under ``bench/results/``."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psycopg

from bench.cpu import host_busy
from bench.processes import REPOSITORY
from bench.services import BROKER_URL, DATABASE_URL_ENV, default_database_url

RESULTS_DIR = REPOSITORY / "bench" / "results"
CODE_UNDER_TEST = ("api", "ledger", "projections", "taskledger", "workers")


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def parser(
    name: str, doc: str | None, *, database: bool = True, rounds: bool = True, broker: bool = False
) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its name, the first paragraph of
    its docstring, `--quick` and `--no-json`; `--database-url`, `--rounds` (3) and
    `--broker-url` as asked."""
    result = argparse.ArgumentParser(
        prog=f"python -m bench {name}", description=doc.split("\n\n")[0] if doc else None
    )
    result.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    result.add_argument("--no-json", action="store_true", help="do not write bench/results/")
    if database:
        help_ = f"server of the throwaway databases (${DATABASE_URL_ENV} or %(default)s)"
        result.add_argument("--database-url", default=default_database_url(), help=help_)
    if rounds:
        result.add_argument("--rounds", type=int, default=3, help="rounds (3; 1 with --quick)")
    if broker:
        result.add_argument("--broker-url", default=BROKER_URL, help="RabbitMQ (%(default)s)")
    return result


def git(*args: str) -> str:
    """`git ARGS` in the repository, its output unstripped (porcelain lines start with a
    two-letter status that may be a space); "" when git or the repository is missing."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


class Run:
    """One benchmark run: when it started, on what, how noisy the machine was."""

    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.started = datetime.now(UTC)
        self.clock = time.perf_counter()
        self.load = os.getloadavg()[0]
        self.own = time.process_time()
        self.host = host_busy()
        changed = git("status", "--porcelain", "--", *CODE_UNDER_TEST)
        self.code = {
            "commit": git("rev-parse", "HEAD").strip()[:12] or None,
            "uncommitted": [line[3:] for line in changed.splitlines() if line.strip()],
        }
        self.machine: dict[str, Any] = {}

    def header(self, database_url: str) -> str:
        m = self.machine = {
            "nproc": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "eventsourcing": _version("eventsourcing"),
        }
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            for setting in ("server_version", "synchronous_commit"):
                row = conn.execute(f"SHOW {setting}").fetchone()
                m[setting] = str(row[0]) if row else "unknown"
        return (
            f"{self.started:%Y-%m-%d %H:%M} UTC · nproc={m['nproc']} · PostgreSQL"
            f" {m['server_version']} (synchronous_commit={m['synchronous_commit']}) · Python"
            f" {m['python']} · {m['platform']} · eventsourcing {m['eventsourcing']}"
        )

    def footer(self) -> str:
        """How long the run took, how busy the host was, the code measured."""
        seconds = time.perf_counter() - self.clock
        busy = host_busy() - self.host - (time.process_time() - self.own)
        uncommitted = self.code["uncommitted"]
        return (
            f"Run took {seconds:.0f} s; load average {self.load:.2f} before,"
            f" {os.getloadavg()[0]:.2f} after; processes other than this one kept"
            f" {100 * max(0.0, busy) / seconds:.0f}% of one core busy on average; code"
            f" {self.code['commit']}"
            + (f" with uncommitted changes in {', '.join(uncommitted)}." if uncommitted else ".")
        )

    def keep(self, payload: dict[str, Any], no_json: bool) -> None:
        """Write bench/results/<name>-<UTC timestamp>.json unless `no_json`."""
        if no_json:
            return
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}-{self.started:%Y%m%dT%H%M%SZ}.json"
        body = {
            "benchmark": self.name,
            "started_at": self.started.isoformat(),
            "command": ["python", "-m", "bench", self.name, *self.argv],
            "machine": self.machine,
            "code": self.code,
            **payload,
        }
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")
        eprint(f"{self.name}: raw figures in {path}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def num(value: float | None, digits: int | None = None) -> str:
    """A figure for a table: "-" when missing; `digits` decimals, or about 3 significant."""
    if value is None or math.isnan(value):
        return "-"
    if digits is None:
        digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:,.{digits}f}"


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` quantile of `values` (nearest rank); None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, min(len(ordered), math.ceil(fraction * len(ordered)))) - 1]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def over_rounds(values: Sequence[float], digits: int | None = None) -> str:
    """`median [min-max]` of one figure per round ("-" without any)."""
    if not values:
        return "-"
    text = num(statistics.median(values), digits)
    if len(values) > 1:
        text += f" [{num(min(values), digits)}–{num(max(values), digits)}]"  # noqa: RUF001
    return text


def ms(seconds: float) -> float:
    return seconds * 1000.0
