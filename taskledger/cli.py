"""The `taskledger` command line."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence

from taskledger import client_cli

# The views `taskledger projections` names (projections.all_projections(), which
# tests/unit/test_cli.py checks this against). Here as names, so that building the parser
# imports no server module: the client commands start in a third of the time without.
PROJECTIONS = ("api_keys", "audit", "task_periods", "task_status", "webhook_deliveries")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskledger",
        description="An event-sourced task service. Configuration, strongest first: "
        "command-line flags, TASKLEDGER_* environment variables, the TOML file of --config, "
        "the defaults (see `taskledger config`).",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file (keys: the setting names, lower case); "
        "default: the file named by TASKLEDGER_CONFIG, if any",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dev = commands.add_parser(
        "dev",
        help="run everything in one process on the embedded defaults",
        description="Run the API and every role in one process, on TASKLEDGER_DATABASE_URL "
        "or, when it is unset, an embedded PostgreSQL in TASKLEDGER_DATA_DIR. Prints the URL "
        "and an API key (generated and kept in the data directory when none is configured).",
    )
    _serve_options(dev)
    dev.add_argument("--concurrency", type=_positive, default=2, help="attempts run at once")
    api = commands.add_parser("api", help="run the API and the singleton roles")
    _serve_options(api)
    api.add_argument(
        "--ssl-certfile",
        metavar="FILE",
        help="serve HTTPS with this certificate chain (PEM; TASKLEDGER_SSL_CERTFILE)",
    )
    api.add_argument(
        "--ssl-keyfile", metavar="FILE", help="… and this private key (PEM; TASKLEDGER_SSL_KEYFILE)"
    )
    api.add_argument(
        "--no-projections",
        action="store_true",
        help="do not run the view projections here (run `taskledger projections run` "
        "elsewhere: a process of their own, off this one's interpreter lock)",
    )
    worker = commands.add_parser(
        "worker",
        help="run a worker: take attempts from the broker, run them, record outcomes",
    )
    worker.add_argument("--concurrency", type=_positive, default=2, help="attempts run at once")
    worker.add_argument(
        "--prefetch",
        type=_positive,
        default=None,
        help="commands held at once (default: max(32, 4 x concurrency)); those waiting for a "
        "slot are not started yet, and echo tasks need none",
    )
    worker.add_argument(
        "--grace",
        type=float,
        default=None,
        help="seconds running attempts get on SIGTERM before they are killed and retried "
        "(default: TASKLEDGER_SHUTDOWN_SECONDS - 3, and less than it)",
    )
    worker.add_argument(
        "--check-sandbox",
        action="store_true",
        help="check each isolation layer of the sandbox on this machine (namespaces, cgroups, "
        "seccomp, slot users), print them as a table, and exit: 0 if all are active, 1 if "
        "one is missing (needs no database or broker)",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics "
        "(TASKLEDGER_METRICS_PORT; default: not served)",
    )
    keys = commands.add_parser("keys", help="API keys: create, revoke").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", help="issue a key; prints it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", required=True, choices=["read", "submit", "admin"])
    create.add_argument("--label", default="", help="a note for whoever finds it in the audit")
    revoke = keys.add_parser("revoke", help="revoke a key by its id (the part after tlk_)")
    revoke.add_argument("key_id")
    config = commands.add_parser(
        "config",
        help="print the effective configuration (secrets masked) and where each value came from",
    )
    config.add_argument("--json", action="store_true", help="as one JSON object")

    projections = commands.add_parser(
        "projections", help="query views: status, rebuild, run"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    projections.add_parser("status", help="each projection's position, the log's head, the lag")
    rebuild = projections.add_parser(
        "rebuild",
        help="rebuild a view from position 0 beside the live one, then switch to it",
    )
    rebuild.add_argument("name", choices=PROJECTIONS)
    run = projections.add_parser(
        "run",
        help="keep the views up to date (joins the leader election; one process applies)",
    )
    run.add_argument("--only", action="append", choices=PROJECTIONS)
    run.add_argument("--batch-size", type=int, default=2_000, help="events per transaction")
    ledger = commands.add_parser(
        "ledger", help="the hash chain over the log: verify, checkpoint"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = ledger.add_parser(
        "verify",
        help="walk the log and check its hash chain; exit 0 if intact, 1 naming the first "
        "broken position",
    )
    verify.add_argument("--task", type=_task_id, help="check only this task's events")
    verify.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a line of `taskledger ledger checkpoint`: also prove the log still holds it",
    )
    ledger.add_parser(
        "checkpoint",
        help="print the log's head as one JSON line (position, chain, time, HMAC under "
        "TASKLEDGER_LEDGER_SIGNING_KEY): keep it elsewhere",
    )
    _config_option_everywhere(parser)
    # After --config went everywhere: the client commands read no server settings.
    client_cli.add_client_commands(commands)
    return parser


def _task_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a task id (a UUID): {text!r}") from None


def _config_option_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --config after any subcommand too (`taskledger api --config FILE`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                # SUPPRESS: a subcommand without --config keeps the one given before it.
                command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS)
                _config_option_everywhere(command)


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", help="interface to listen on (TASKLEDGER_HOST; default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, help="port to listen on (TASKLEDGER_PORT; default 8000)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    client = args.command in client_cli.CLIENT_COMMANDS
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        if client:  # 2 is a task's outcome there (Expired): a usage error is 4
            parser.print_usage(sys.stderr)
            parser.exit(client_cli.EXIT_ERROR, f"{parser.prog}: error: {message}\n")
        parser.error(message)
    if client:
        # No server logging set up: its JSON lines (httpx's among them) would mix with the
        # output scripts read.
        return client_cli.run_client_command(args, parser)
    # The server's modules, only for its commands.
    from ledger.errors import LedgerError
    from taskledger import commands
    from taskledger.logs import configure_logging
    from taskledger.settings import ConfigError

    configure_logging()
    try:
        runners = {
            "dev": commands.run_dev,
            "api": commands.run_api,
            "keys": commands.run_keys,
            "worker": commands.run_worker,
            "projections": commands.run_projections,
            "config": commands.run_config,
            "ledger": commands.run_ledger,
        }
        return runners[args.command](args)
    except ConfigError as error:
        print(f"taskledger: configuration error: {error}", file=sys.stderr)
        return 2
    except LedgerError as error:
        print(f"taskledger: {error}", file=sys.stderr)
        return 1
