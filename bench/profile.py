"""Where the CPU of a no-op task goes: py-spy samples the api and the worker while they run
the no-op load of ``python -m bench`` (echo tasks, the same processes and settings), and
the samples are summed by area of the code and by function.

Sampled with ``--gil``: only the thread holding the GIL, so a sample is Python (or C
under the GIL) at work, and waiting on a socket or for the GIL counts nowhere. The
baseline is the process's whole sampled time: each row is a share of it.

``--load rtt --idle``: where the *wall time* of one task's round trip goes instead. The
benchmark's round trips run one after another (submit, then a long-poll until it ended),
and every thread is sampled, waiting or not (py-spy ``--idle``), so the rows show
where a request, a dispatch or a start spends its milliseconds, waits included. ``--keep DIR``
keeps the raw stacks (``py-spy``'s collapsed format: ``flamegraph.pl`` or speedscope
read them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.report import Run, eprint, markdown_table, parser
from bench.services import require_broker, temporary_database
from bench.systems.taskledger import Taskledger

NAME = "profile"
LOADS = {"noop": "a batch", "rtt": "one round trip at a time"}
# Areas, by the first of these path fragments a frame's file has, innermost frame first.
AREAS = (
    ("projections/", "views (projections/)"),
    ("api/", "api: HTTP handlers, watcher, roles (api/)"),
    ("ledger/", "ledger: domain, store, log (ledger/)"),
    ("workers/", "worker (workers/)"),
    ("eventsourcing/", "eventsourcing library"),
    ("psycopg", "psycopg"),
    ("aio_pika/", "aio-pika/aiormq"),
    ("aiormq/", "aio-pika/aiormq"),
    ("pamqp/", "aio-pika/aiormq"),
    ("uvicorn/", "uvicorn"),
    ("h11/", "uvicorn"),
    ("httptools", "uvicorn"),
    ("starlette/", "starlette"),
    ("pydantic", "pydantic"),
    ("orjson", "orjson"),
    ("asyncio/", "asyncio event loop"),
    ("threading.py", "threads (start, locks, queues)"),
    ("queue.py", "threads (start, locks, queues)"),
    ("concurrent/", "threads (start, locks, queues)"),
    ("logging/", "logging"),
    ("prometheus_client/", "metrics (prometheus-client)"),
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser(NAME, __doc__, rounds=False, broker=True)
    p.add_argument("--tasks", type=int, default=6000, help="no-op tasks (6,000; 1,000 quick)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (200)")
    p.add_argument("--top", type=int, default=20, help="functions listed per process (20)")
    p.add_argument("--concurrency", type=int, default=2, help="taskledger worker --concurrency")
    p.add_argument("--connections", type=int, default=32, help="the client's HTTP connections")
    p.add_argument("--keep", type=Path, help="a directory to keep the raw stacks in")
    p.add_argument(
        "--load", choices=("noop", "rtt"), default="noop", help="no-op batch, or round trips"
    )
    p.add_argument("--idle", action="store_true", help="every thread, waiting or not (wall time)")
    p.add_argument(
        "--under", help="only the samples with this function on the stack, e.g. Ledger.get"
    )
    args = p.parse_args(argv)
    if args.quick and "--tasks" not in argv:
        args.tasks = 1000
    return args


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) of each frame of a collapsed stack, outermost first."""
    found = []
    for frame in stack.split(";"):
        function, _, where = frame.rpartition(" (")
        found.append((function or frame, where.rstrip(")").rpartition(":")[0] or where))
    return found


def area(file: str) -> str:
    for fragment, name in AREAS:
        if fragment in file:
            return name
    return "other"


def summarize(
    raw: str, top: int, under: str | None = None
) -> tuple[int, list[list[str]], list[list[str]]]:
    """(samples, rows by area, rows by function) of py-spy's collapsed output. An area's
    share is its self time: a sample counts for the area of its innermost frame that is
    in one (C frames and unknown files pass it outward). A function's share is inclusive:
    each sample counts once for every function on its stack. With `under`, only the
    samples with that function on their stack count."""
    total = 0
    by_area: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        stacked = frames(stack)
        if under is not None and all(fn != under for fn, _ in stacked):
            continue
        total += count
        names = {f"{fn} ({Path(file).name})" for fn, file in stacked}
        for name in names:
            inclusive[name] += count
        fn, file = stacked[-1]
        own[f"{fn} ({Path(file).name})"] += count
        for _, file in reversed(stacked):
            if area(file) != "other":
                by_area[area(file)] += count
                break
        else:
            by_area["other"] += count

    def share(n: int) -> str:
        return f"{100 * n / total:.1f}%" if total else "-"

    areas = [[name, f"{n:,}", share(n)] for name, n in by_area.most_common()]
    functions = [
        [name, share(n), share(own.get(name, 0))] for name, n in inclusive.most_common(top)
    ]
    return total, areas, functions


def record(pid: int, rate: int, output: Path, idle: bool) -> subprocess.Popen[bytes]:
    spy = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if spy is None:
        raise SystemExit(f"{NAME}: py-spy is not installed (pip install -e '.[bench]')")
    command = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking"]
    command.append("--idle" if idle else "--gil")
    command += ["--format", "raw", "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_broker(NAME, args.broker_url)
    run = Run(NAME, argv)
    with (
        temporary_database(args.database_url) as url,
        tempfile.TemporaryDirectory(prefix="taskledger-bench-profile-") as tmp,
    ):
        header = run.header(url)
        eprint(f"{NAME}: {header}")
        tl = Taskledger(url, args.broker_url, args.concurrency, args.connections, Path(tmp), eprint)
        try:
            tl.start()
            tl.noop_batch(min(500, args.tasks))  # warm: pools filled, code paths compiled
            outputs = {role: Path(tmp) / f"{role}.txt" for role in ("api", "worker")}
            spies = {
                role: record(pid, args.rate, outputs[role], args.idle)
                for role, pid in tl.processes().items()
                if role in outputs
            }
            time.sleep(1.0)  # py-spy attached
            started = time.monotonic()
            if args.load == "rtt":
                tl.round_trips(args.tasks)
            else:
                tl.noop_batch(args.tasks)
            seconds = time.monotonic() - started
            for spy in spies.values():
                spy.send_signal(signal.SIGINT)
            for role, spy in spies.items():
                _, err = spy.communicate(timeout=60)
                if not outputs[role].exists():
                    raise SystemExit(f"{NAME}: py-spy wrote nothing for the {role}: {err.decode()}")
        finally:
            tl.close()
        what = "wall time" if args.idle else "CPU"
        print(f"## Where a no-op task's {what} goes\n\n{header}\n")
        print(
            f"{args.tasks:,} no-op tasks, {LOADS[args.load]},"
            f" at {args.tasks / seconds:,.0f} tasks/s; py-spy {'--idle' if args.idle else '--gil'}"
            f" at {args.rate}/s while they ran.\n"
        )
        for role, output in outputs.items():
            raw = output.read_text()
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(output, args.keep / f"{role}.collapsed.txt")
            total, areas, functions = summarize(raw, args.top, args.under)
            if args.under:
                print(f"(only the samples under {args.under})\n")
            if not total:
                print(f"{role}: no samples\n")
                continue
            held = "thread time (all threads)" if args.idle else "GIL-held time"
            print(
                f"### {role}: {total:,} samples, {1000 * total / args.rate / args.tasks:.2f}"
                f" ms of {held} per task\n"
            )
            print(markdown_table(["area (self time)", "samples", "share"], areas))
            print()
            print(markdown_table(["function (inclusive)", "inclusive", "self"], functions))
            print()
    return 0
