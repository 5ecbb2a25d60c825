"""The composition root: from settings to running services.

`bootstrap(settings, **overrides)` builds the real adapters by default; tests pass their
own (a clock, a retry policy, a ready-made ledger) as overrides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette

from api.app import create_app
from api.auth import Authenticator, parse_configured_keys
from api.context import ApiContext
from api.delivery import Deliverer
from api.metrics import ApiMetrics, WebhookMetrics
from api.watch import TaskWatcher
from ledger import Ledger
from ledger.connections import DEFAULT_BOUNDS, bounded_url, postgres_env
from ledger.values import TaskLimits
from projections import all_projections
from projections.runner import ProjectionRunner
from taskledger.brokers import broker_for
from taskledger.checkpoints import Checkpointer
from taskledger.embedded import EmbeddedPostgres
from taskledger.logs import log_context
from taskledger.settings import ConfigError, SandboxSettings, Settings
from workers.broker import Broker
from workers.dispatcher import Dispatcher
from workers.executors import build_executors
from workers.metrics import WorkerMetrics
from workers.reaper import Reaper
from workers.sandbox import Limits, MiB
from workers.worker import Worker

# Threads that may touch the ledger at once: its connection pool's size (5 + 10 overflow).
LEDGER_THREADS = 15
DEV_KEY_FILE = "dev-api-key"

log = logging.getLogger(__name__)


def process_registry() -> CollectorRegistry:
    """The one metrics registry of a process: ours, and the process's own (CPU, memory,
    open files, GC) beside them."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass
class Services:
    settings: Settings
    ledger: Ledger
    database_url: str
    schema: str
    projection_runner: ProjectionRunner | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # Served on the API's /metrics, or on a worker's --metrics-port.
    registry: CollectorRegistry = field(default_factory=process_registry)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)
    _broker: Broker | None = None
    _worker_metrics: WorkerMetrics | None = None
    _api_metrics: ApiMetrics | None = None
    _webhook_metrics: WebhookMetrics | None = None
    embedded: EmbeddedPostgres | None = None  # the no-configuration default's server

    @property
    def worker_metrics(self) -> WorkerMetrics:
        """The metrics of this process's worker, dispatcher and reaper (on `registry`)."""
        if self._worker_metrics is None:
            self._worker_metrics = WorkerMetrics(self.registry)
        return self._worker_metrics

    @property
    def api_metrics(self) -> ApiMetrics:
        """The metrics of this process's API (on `registry`)."""
        if self._api_metrics is None:
            self._api_metrics = ApiMetrics(self.registry)
        return self._api_metrics

    @property
    def webhook_metrics(self) -> WebhookMetrics:
        """The metrics of this process's webhook deliverer (on `registry`)."""
        if self._webhook_metrics is None:
            self._webhook_metrics = WebhookMetrics(self.registry)
        return self._webhook_metrics

    @property
    def broker(self) -> Broker:
        """The broker (created on first use; queues are namespaced by the schema)."""
        if self._broker is None:
            self._broker = self.overrides.get("broker") or broker_for(
                self.settings.broker_url,
                "taskledger" if self.schema == "public" else f"taskledger.{self.schema}",
            )
        return self._broker

    def singleton_roles(self) -> list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]]:
        """The dispatcher, the reaper, the webhook deliverer and the checkpointer (each
        elects its leader across processes; the checkpointer only with
        checkpoint_minutes > 0)."""
        clock = self.ledger.clock
        metrics = self.worker_metrics
        dispatcher = Dispatcher(self.database_url, self.schema, self.broker, clock, metrics=metrics)
        reaper = Reaper(self.database_url, self.schema, self.ledger, clock, metrics=metrics)
        deliverer = Deliverer(
            self.database_url,
            self.schema,
            self.ledger,
            clock,
            targets=self.settings.webhook_targets(),
            retry_hours=self.settings.webhook_retry_hours,
            metrics=self.webhook_metrics,
        )
        roles: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = [
            dispatcher.run,
            reaper.run,
            deliverer.run,
        ]
        minutes = self.settings.checkpoint_minutes
        if minutes > 0:
            key = self.settings.signing_key()
            roles.append(Checkpointer(self.database_url, self.schema, key, minutes).run)
        return roles

    def worker(
        self, concurrency: int, *, unisolated_by_default: bool = False, **options: Any
    ) -> Worker:
        """A worker; its sandbox runs programs without a missing isolation layer only if
        [sandbox] allow_unisolated says so, or (unset) `unisolated_by_default` (dev)."""
        executors = self.overrides.get("executors")
        if executors is None:
            configured = self.settings.sandbox
            allow = configured.allow_unisolated
            executors = build_executors(
                concurrency=concurrency,
                data_dir=self.settings.data_dir,
                limits=sandbox_limits(configured, self.ledger.limits),
                allow_unisolated=unisolated_by_default if allow is None else allow,
            )
        options.setdefault("metrics", self.worker_metrics)
        options.setdefault("heartbeat_seconds", self.settings.heartbeat_seconds)
        options.setdefault("log_context", log_context)
        return Worker(self.ledger, self.broker, executors, concurrency=concurrency, **options)

    def start_projections(self, names: list[str] | None = None, **options: Any) -> None:
        """Run the projections (all, or `names`) in a background thread of this process,
        one reader for all (projections.runner).

        Each takes part in its leader election: with several processes, one applies it.
        """
        chosen = [p for name, p in all_projections().items() if names is None or name in names]
        runner = ProjectionRunner(self.database_url, self.schema, chosen, **options)
        runner.start()
        self._stack.callback(runner.stop)
        self.projection_runner = runner

    def api_app(
        self, background: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] | None = None
    ) -> Starlette:
        """The HTTP API over these services (its query pool closes with them), running
        `background` roles beside it for as long as it serves."""
        spec = self.settings.api_keys.get_secret_value() if self.settings.api_keys else ""
        try:
            configured = parse_configured_keys(spec)
        except ValueError as error:
            raise ConfigError(f"TASKLEDGER_API_KEYS: {error}") from None
        bounds = self.ledger.store.bounds
        queries = ConnectionPool(
            bounded_url(self.database_url, {"options": bounds.statement_options()}),
            min_size=1,
            max_size=10,
            kwargs={"autocommit": True, "application_name": "taskledger api"},
            open=True,
            name="queries",
            timeout=bounds.wait_seconds,
            reconnect_timeout=bounds.reconnect_seconds,
            # A connection broken by a restart is found and replaced when taken, not
            # handed to a request (or to /readyz, which then said "unreachable").
            check=ConnectionPool.check_connection,
        )
        self._stack.callback(queries.close)
        context = ApiContext(
            ledger=self.ledger,
            queries=queries,
            database_url=self.database_url,
            schema=self.schema,
            authenticator=Authenticator(
                configured, self.ledger.keys.authenticate, active=self.ledger.keys.is_active
            ),
            readiness={"broker": self.broker.problem},
            background=list(background or []),
            shutdown=[self.broker.close],
            watcher=TaskWatcher(self.database_url, self.schema),
            metrics=self.api_metrics,
            limiter=anyio.CapacityLimiter(LEDGER_THREADS),
        )
        if self.settings.ui_secret is not None:
            context.ui_secret = self.settings.ui_secret.get_secret_value().encode()
        else:
            log.warning(
                "TASKLEDGER_UI_SECRET is not set: dashboard (/ui) sessions are signed with a "
                "random secret of this process, so they end when it restarts and other api "
                "processes refuse them; set it (32+ random characters, the same everywhere)"
            )
        return create_app(context)

    def dev_api_key(self) -> str:
        """The dev key kept in the data directory, issued (admin of tenant `default`) if
        there is none yet or it no longer works."""
        path = self.settings.data_dir / DEV_KEY_FILE
        if path.exists():
            token = path.read_text().strip()
            if self.ledger.keys.authenticate(token) is not None:
                return token
        _, token = self.ledger.keys.issue(
            tenant="default", role="admin", issued_by="taskledger dev", label="dev"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(token + "\n")
        return token

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sandbox_limits(configured: SandboxSettings, task: TaskLimits | None = None) -> Limits:
    """The sandbox's limits from the [sandbox] section, and the output it keeps from the
    tasks' payload budget (the ledger's)."""
    return Limits(
        memory_bytes=configured.memory_mib * MiB,
        processes=configured.pids,
        cpus=configured.cpus,
        tmp_bytes=configured.tmp_mib * MiB,
        tmp_files=configured.tmp_files,
        output_bytes=(task or TaskLimits()).output_bytes,
    )


def bootstrap(settings: Settings, **overrides: Any) -> Services:
    """Start what the settings ask for: the database (embedded if no URL) and the ledger.

    Overrides: `ledger` (a ready Ledger), or `clock`, `retry_policy`, `limits` for the one
    built here; `broker`, `executors` for the workers.
    """
    role_overrides: dict[str, Any] = {
        k: overrides.pop(k) for k in ("broker", "executors") if k in overrides
    }
    stack = contextlib.ExitStack()
    try:
        database_url = settings.database_url
        embedded = None
        if database_url is None:
            embedded = EmbeddedPostgres(settings.data_dir)
            database_url = embedded.start()
            stack.callback(embedded.stop)
        # Every role's own connections (views, dispatcher, reaper, watcher) are bounded.
        database_url = bounded_url(database_url, DEFAULT_BOUNDS.network())
        ledger = overrides.pop("ledger", None)
        if ledger is None:
            env = postgres_env(database_url, schema=settings.database_schema)
            overrides.setdefault("lease_seconds", settings.lease_seconds)
            overrides.setdefault("webhook_targets", settings.webhook_targets())
            ledger = Ledger(env, **overrides)
            stack.callback(ledger.close)
        return Services(
            settings=settings,
            ledger=ledger,
            database_url=database_url,
            schema=settings.database_schema,
            overrides=role_overrides,
            embedded=embedded,
            _stack=stack,
        )
    except BaseException:
        stack.close()
        raise
