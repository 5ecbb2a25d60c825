"""The `taskledger` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from projections import all_projections
from projections.admin import rebuild, status
from taskledger.bootstrap import Services, bootstrap
from taskledger.logs import configure_logging
from taskledger.settings import ConfigError, load_settings

log = logging.getLogger("taskledger")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskledger",
        description="An event-sourced task service. Configuration comes from TASKLEDGER_* "
        "environment variables (see `taskledger config`).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "dev",
        help="run everything in one process on the embedded defaults",
        description="Start the ledger on TASKLEDGER_DATABASE_URL, or on an embedded "
        "PostgreSQL in TASKLEDGER_DATA_DIR when it is unset, and run until interrupted.",
    )
    commands.add_parser("config", help="print the effective configuration (secrets masked)")

    projections = commands.add_parser(
        "projections", help="query views: status, rebuild, run"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    projections.add_parser("status", help="each projection's position, the log's head, the lag")
    rebuild = projections.add_parser(
        "rebuild",
        help="rebuild a view from position 0 beside the live one, then switch to it",
    )
    rebuild.add_argument("name", choices=sorted(all_projections()))
    run = projections.add_parser(
        "run",
        help="keep the views up to date (joins the leader election; one process applies)",
    )
    run.add_argument("--only", action="append", choices=sorted(all_projections()))
    run.add_argument("--batch-size", type=int, default=2_000, help="events per transaction")
    return parser


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _run_dev(args: argparse.Namespace) -> int:
    settings = load_settings()
    stop = _stop_on_signals()
    with bootstrap(settings) as services:
        services.start_projections()
        position = services.ledger.recorder.max_notification_id() or 0
        log.info(
            "taskledger dev: ledger ready",
            extra={
                "database": settings.masked()["TASKLEDGER_DATABASE_URL"],
                "events_stored": position,
            },
        )
        print(
            "taskledger is running: the ledger is ready on "
            f"{settings.masked()['TASKLEDGER_DATABASE_URL']}. Press Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
        log.info("taskledger dev: stopping")
    return 0


def _run_projections(args: argparse.Namespace) -> int:
    settings = load_settings()
    with bootstrap(settings) as services:
        if args.action == "status":
            return _print_status(services)
        if args.action == "rebuild":
            report = rebuild(services.database_url, services.schema, all_projections()[args.name])
            print(
                f"rebuilt {report.name}: generation {report.old_generation} -> "
                f"{report.new_generation}, {report.events} events in {report.seconds:.2f} s "
                f"({report.events_per_second:,.0f} events/s)"
            )
            return 0
        stop = _stop_on_signals()
        services.start_projections(args.only, batch_size=args.batch_size)
        stop.wait()
        return 0


def _print_status(services: Services) -> int:
    import psycopg

    from projections.base import ensure_installed

    with psycopg.connect(services.database_url, autocommit=True) as conn:
        for projection in all_projections().values():
            ensure_installed(conn, services.schema, projection)
        rows = status(conn, services.schema)
    print(
        f"{'projection':<14} {'generation':>10} {'position':>10} {'head':>10} {'lag':>8}  updated"
    )
    for row in rows:
        print(
            f"{row.name:<14} {row.generation:>10} {row.position:>10} {row.head:>10} "
            f"{row.lag:>8}  {row.updated_at.isoformat(timespec='seconds')}"
        )
    return 0


def _run_config(args: argparse.Namespace) -> int:
    for name, value in load_settings().masked().items():
        print(f"{name}={value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        if args.command == "dev":
            return _run_dev(args)
        if args.command == "projections":
            return _run_projections(args)
        return _run_config(args)
    except ConfigError as error:
        print(f"taskledger: configuration error: {error}", file=sys.stderr)
        return 2
