"""What each `taskledger` server command does (taskledger/cli.py parses the line)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from projections import all_projections
from projections.admin import rebuild, status
from taskledger.bootstrap import Services, bootstrap, sandbox_limits
from taskledger.loading import load_settings
from taskledger.logs import configure_logging
from taskledger.settings import ConfigError, Settings, env_name
from taskledger.shutdown import ShutdownBound
from workers.metrics import serving

log = logging.getLogger("taskledger")


def serve_flags(args: argparse.Namespace) -> dict[str, object]:
    """The serving flags a command line gave (`--host`, `--port`, TLS files)."""
    names = ("host", "port", "ssl_certfile", "ssl_keyfile")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def settings_for(args: argparse.Namespace, **flags: object) -> Settings:
    """The settings: these command-line values over the environment over the TOML file."""
    return load_settings(flags, config_file=args.config)


def log_as(role: str, settings: Settings) -> None:
    """JSON lines to stdout and `<log_dir>/<role>-YYYY-MM-DD.log`, from the start."""
    try:
        settings.log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{settings.origin('log_dir')}: cannot create {settings.log_dir}: "
            f"{error.strerror or error}"
        ) from None
    configure_logging(settings.log_level.upper(), role=role, log_dir=settings.log_dir)


def serve(services: Services, args: argparse.Namespace, *, dev: bool) -> int:
    import uvicorn

    settings = services.settings
    tls = settings.tls_files()  # a missing or wrong file stops us before anything starts
    roles = services.singleton_roles()
    if dev:
        # On a laptop (not root, no cgroups) dev still runs programs, with a loud warning
        # from the sandbox, unless [sandbox] allow_unisolated says otherwise.
        worker = services.worker(concurrency=args.concurrency, unisolated_by_default=True)
        roles.append(worker.run)
    app = services.api_app(background=roles)
    if not getattr(args, "no_projections", False):
        services.start_projections()
    url = f"{'https' if tls else 'http'}://{settings.host}:{settings.port}"
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
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    bound = shutdown_bound("dev" if dev else "api", services)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            bound.begin()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: a client may connect from now on
                log.info("serving the API", extra={"url": url})

    server = Server(config)
    # Once shut down, uvicorn hands the signal that stopped it back to the handler it found:
    # the default one would kill the process before the services close (the projections,
    # the embedded PostgreSQL). This one asks the server to stop and lets run() return.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: setattr(server, "should_exit", True))
    server.run()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    settings = settings_for(args, metrics_port=args.metrics_port)
    if args.check_sandbox:
        return check_sandbox(settings, args.concurrency)
    if settings.broker_url.startswith("memory://"):
        raise ConfigError(
            f"{settings.origin('broker_url')}: memory:// only works inside one process "
            "(taskledger dev); a separate worker needs amqp://user:password@host:port/"
        )
    bound_seconds = settings.shutdown_seconds
    grace = max(0.0, bound_seconds - 3) if args.grace is None else args.grace
    if not 0 <= grace < bound_seconds:
        raise ConfigError(
            f"--grace {grace:g} must be at least 0 and less than "
            f"{settings.origin('shutdown_seconds')} ({bound_seconds:g} s): the attempts it "
            "kills need time to be recorded"
        )
    log_as("worker", settings)
    with bootstrap(settings) as services, serving(services.registry, settings.metrics_port):
        worker = services.worker(
            concurrency=args.concurrency, prefetch=args.prefetch, grace_seconds=grace
        )
        bound = shutdown_bound("worker", services)

        def stopping(stop: asyncio.Event) -> None:
            bound.begin()
            stop.set()

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stopping, stop)
            try:
                await worker.run(stop)
            finally:
                await services.broker.close()

        asyncio.run(main())
    return 0


def check_sandbox(settings: Settings, slots: int) -> int:
    """`taskledger worker --check-sandbox`: the layers as a table; 1 if one is missing."""
    from workers.sandbox import Sandbox
    from workers.sandbox.layers import table

    configure_logging(settings.log_level.upper())
    sandbox = Sandbox(slots, sandbox_limits(settings.sandbox))

    async def check() -> int:
        try:
            caps = await sandbox.start()
            print(table(caps.layers))
            mode = "isolated (zygote)" if caps.isolated else "UNISOLATED (spawned)"
            print(f"\nprograms run {mode}; python: {caps.python}; slots: {slots}")
            missing = caps.missing
            if missing:
                names = ", ".join(layer.name for layer in missing)
                print(
                    f"MISSING: {names}. A worker here refuses python and csharp tasks unless "
                    "[sandbox] allow_unisolated = true (see docs/sandbox.md)."
                )
            return 1 if missing else 0
        finally:
            await sandbox.close()

    return asyncio.run(check())


def run_keys(args: argparse.Namespace) -> int:
    with bootstrap(settings_for(args)) as services:
        if args.action == "create":
            principal, token = services.ledger.keys.issue(
                tenant=args.tenant, role=args.role, issued_by="taskledger keys", label=args.label
            )
            print(token)
            print(
                f"key id {principal.key_id}: {principal.role} for tenant {principal.tenant}. "
                "Keep the key: it is not stored and cannot be shown again.",
                file=sys.stderr,
            )
            return 0
        services.ledger.keys.revoke(args.key_id, by="taskledger keys")
        print(f"revoked key {args.key_id}", file=sys.stderr)
        return 0


def stop_on_signals(bound: ShutdownBound) -> threading.Event:
    stop = threading.Event()

    def stopping(*_: object) -> None:
        bound.begin()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stopping)
    return stop


def shutdown_bound(role: str, services: Services) -> ShutdownBound:
    """The bound on this process's stop; its last words stop the embedded server."""
    embedded = services.embedded
    return ShutdownBound(
        role, services.settings.shutdown_seconds, embedded.stop if embedded else None
    )


def run_dev(args: argparse.Namespace) -> int:
    settings = settings_for(args, **serve_flags(args))
    settings.tls_files()
    log_as("dev", settings)
    with bootstrap(settings) as services:
        return serve(services, args, dev=True)


def run_api(args: argparse.Namespace) -> int:
    settings = settings_for(args, **serve_flags(args))
    settings.tls_files()  # before the database: a bad certificate fails fast, by its name
    log_as("api", settings)
    with bootstrap(settings) as services:
        return serve(services, args, dev=False)


def run_projections(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    if args.action == "run":
        log_as("projections", settings)
    with bootstrap(settings) as services:
        if args.action == "status":
            return print_status(services)
        if args.action == "rebuild":
            report = rebuild(services.database_url, services.schema, all_projections()[args.name])
            print(
                f"rebuilt {report.name}: generation {report.old_generation} -> "
                f"{report.new_generation}, {report.events} events in {report.seconds:.2f} s "
                f"({report.events_per_second:,.0f} events/s)"
            )
            return 0
        stop = stop_on_signals(shutdown_bound("projections", services))
        services.start_projections(args.only, batch_size=args.batch_size)
        stop.wait()
        return 0


def print_status(services: Services) -> int:
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


def run_ledger(args: argparse.Namespace) -> int:
    """`taskledger ledger verify|checkpoint`: exit 0 intact, 1 broken (named), 2 unusable
    checkpoint file."""
    import psycopg

    from ledger import verification
    from projections import task_status

    settings = settings_for(args)
    key = settings.signing_key()
    with bootstrap(settings) as services, psycopg.connect(services.database_url) as conn:
        if args.action == "checkpoint":
            print(verification.checkpoint(conn, services.schema, key).as_json().decode())
            if key is None:
                print(
                    "unsigned: set TASKLEDGER_LEDGER_SIGNING_KEY to sign checkpoints",
                    file=sys.stderr,
                )
            return 0
        anchor = None
        if args.checkpoint is not None:
            try:
                anchor = verification.Checkpoint.parse(Path(args.checkpoint).read_bytes())
            except (OSError, verification.CheckpointError) as error:
                print(f"taskledger: checkpoint {args.checkpoint}: {error}", file=sys.stderr)
                return 2
            untrusted = anchor.check_signature(key)
            if untrusted is not None:
                print(f"LEDGER NOT VERIFIED: checkpoint {args.checkpoint}: {untrusted}")
                return 1
        expected = None if args.task else task_status.versions(conn, services.schema)
        conn.commit()
        report = verification.verify(
            conn, services.schema, task=args.task, checkpoint=anchor, expected_versions=expected
        )
    scope = f"task {args.task}" if args.task else "the log"
    if report.ok:
        print(
            f"ledger intact: {scope}, {report.events:,} events of {report.streams:,} streams "
            f"(tasks, keys) up to position {report.head_position}; "
            f"head chain {report.head_chain.hex()}"
            + (f"; checkpoint at position {anchor.position} held" if anchor else "")
        )
    else:
        first, *others = report.problems
        print(f"LEDGER BROKEN: {first.describe()}")
        for other in others:
            print(f"  also: {other.describe()}")
    if expected is None and not args.task:
        print("(no task_status view here: the tasks' last versions were not checked)")
    print(
        f"checked {report.events:,} events in {report.seconds:.2f} s "
        f"({report.events_per_second:,.0f} events/s)",
        file=sys.stderr,
    )
    return 0 if report.ok else 1


def run_config(args: argparse.Namespace) -> int:
    """The effective settings as TOML (a valid --config file but for the masked secrets),
    each with its source; unset ones as comments. `--json`: one object of the same."""
    settings = settings_for(args)
    shown = settings.masked()
    if args.json:
        described = {
            name: {
                "value": value,
                "source": settings.source(name),
                "variable": env_name(name),
            }
            for name, value in shown.items()
        }
        config_file = str(settings.config_file) if settings.config_file else None
        print(json.dumps({"config_file": config_file, "settings": described}, indent=2))
        return 0
    print(
        "# taskledger settings; strongest first: flag > environment (TASKLEDGER_*) > "
        f"file ({settings.config_file or 'none'}) > default"
    )
    section = ""
    # Top-level settings first: in TOML, whatever follows a [section] header is in it.
    for name, value in sorted(shown.items(), key=lambda item: "." in item[0]):
        where, _, key = name.rpartition(".")
        if where != section:
            print(f"\n[{where}]")
            section = where
        source = settings.source(name)
        if value is None:
            print(f"# {key} is unset ({UNSET.get(name, 'no default')})  # {source}")
        else:
            literal = json.dumps(value, ensure_ascii=False)  # a TOML string, number, bool
            print(f"{key} = {literal}  # {source}")
    return 0


# What an unset setting means, for `taskledger config`.
UNSET = {
    "database_url": "embedded PostgreSQL in the data directory",
    "api_keys": "`taskledger dev` generates one",
    "ssl_certfile": "plain HTTP",
    "ssl_keyfile": "plain HTTP",
    "metrics_port": "no worker metrics server",
    "ledger_signing_key": "ledger checkpoints are not signed",
    "sandbox.allow_unisolated": "`taskledger dev` allows it, with a warning; workers refuse",
}
