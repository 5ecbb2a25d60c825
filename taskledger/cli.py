"""The `taskledger` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from ledger.errors import LedgerError
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
    dev = commands.add_parser(
        "dev",
        help="run everything in one process on the embedded defaults",
        description="Run the API and every role in one process, on TASKLEDGER_DATABASE_URL "
        "or, when it is unset, an embedded PostgreSQL in TASKLEDGER_DATA_DIR. Prints the URL "
        "and an API key (generated and kept in the data directory when none is configured).",
    )
    _serve_options(dev)
    dev.add_argument("--concurrency", type=int, default=2, help="attempts run at once")
    api = commands.add_parser("api", help="run the API and the singleton roles")
    _serve_options(api)
    api.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    api.add_argument("--ssl-keyfile", help="… and this private key (PEM)")
    worker = commands.add_parser(
        "worker",
        help="run a worker: take attempts from the broker, run them, record outcomes",
    )
    worker.add_argument("--concurrency", type=int, default=2, help="attempts run at once")
    worker.add_argument(
        "--grace", type=float, default=30.0, help="seconds running attempts get on SIGTERM"
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


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")


def _serve(services: Services, args: argparse.Namespace, *, dev: bool) -> int:
    import uvicorn

    roles = services.singleton_roles()
    if dev:
        roles.append(services.worker(concurrency=args.concurrency).run)
    app = services.api_app(background=roles)
    services.start_projections()
    scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
    url = f"{scheme}://{args.host}:{args.port}"
    if dev and services.settings.api_keys is None:
        key = services.dev_api_key()
        print(
            f"taskledger is running at {url} (Swagger UI: {url}/swagger)\n"
            f"API key (admin of tenant 'default', kept in "
            f"{services.settings.data_dir / 'dev-api-key'}):\n  {key}\n"
            f"Try: curl -H 'Authorization: ApiKey {key}' {url}/api/stats",
            file=sys.stderr,
            flush=True,
        )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        ssl_certfile=getattr(args, "ssl_certfile", None),
        ssl_keyfile=getattr(args, "ssl_keyfile", None),
    )
    log.info("serving the API", extra={"url": url})
    uvicorn.Server(config).run()
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.broker_url.startswith("memory://"):
        raise ConfigError(
            "TASKLEDGER_BROKER_URL: memory:// only works inside one process (taskledger dev); "
            "a separate worker needs amqp://user:password@host:port/"
        )
    configure_logging(role="worker", log_dir=settings.log_dir)
    with bootstrap(settings) as services:
        worker = services.worker(concurrency=args.concurrency, grace_seconds=args.grace)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            try:
                await worker.run(stop)
            finally:
                await services.broker.close()

        asyncio.run(main())
    return 0


def _run_keys(args: argparse.Namespace) -> int:
    with bootstrap(load_settings()) as services:
        if args.action == "create":
            principal, token = services.ledger.issue_key(
                tenant=args.tenant, role=args.role, issued_by="taskledger keys", label=args.label
            )
            print(token)
            print(
                f"key id {principal.key_id}: {principal.role} for tenant {principal.tenant}. "
                "Keep the key: it is not stored and cannot be shown again.",
                file=sys.stderr,
            )
            return 0
        services.ledger.revoke_key(args.key_id, by="taskledger keys")
        print(f"revoked key {args.key_id}", file=sys.stderr)
        return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _run_dev(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(role="dev", log_dir=settings.log_dir)
    with bootstrap(settings) as services:
        return _serve(services, args, dev=True)


def _run_api(args: argparse.Namespace) -> int:
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("taskledger: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    settings = load_settings()
    configure_logging(role="api", log_dir=settings.log_dir)
    with bootstrap(settings) as services:
        return _serve(services, args, dev=False)


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
        runners = {
            "dev": _run_dev,
            "api": _run_api,
            "keys": _run_keys,
            "worker": _run_worker,
            "projections": _run_projections,
            "config": _run_config,
        }
        return runners[args.command](args)
    except ConfigError as error:
        print(f"taskledger: configuration error: {error}", file=sys.stderr)
        return 2
    except LedgerError as error:
        print(f"taskledger: {error}", file=sys.stderr)
        return 1
