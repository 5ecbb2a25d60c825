"""The `taskledger` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from taskledger.bootstrap import bootstrap
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
    return parser


def _run_dev(args: argparse.Namespace) -> int:
    settings = load_settings()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with bootstrap(settings) as services:
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
        return _run_config(args)
    except ConfigError as error:
        print(f"taskledger: configuration error: {error}", file=sys.stderr)
        return 2
