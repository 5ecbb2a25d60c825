"""The composition root: from settings to running services.

`bootstrap(settings, **overrides)` builds the real adapters by default; tests pass their
own (a clock, a retry policy, a ready-made ledger) as overrides.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from ledger import Ledger
from ledger.persistence import postgres_env
from projections import all_projections
from projections.runner import ProjectionRunner
from taskledger.embedded import EmbeddedPostgres
from taskledger.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    ledger: Ledger
    database_url: str
    schema: str
    projection_runners: dict[str, ProjectionRunner] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def start_projections(self, names: list[str] | None = None, **options: Any) -> None:
        """Run the projections (all, or `names`) in background threads of this process.

        Each takes part in its leader election: with several processes, one applies.
        """
        for name, projection in all_projections().items():
            if names is not None and name not in names:
                continue
            runner = ProjectionRunner(self.database_url, self.schema, projection, **options)
            runner.start()
            self._stack.callback(runner.stop)
            self.projection_runners[name] = runner

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bootstrap(settings: Settings, **overrides: Any) -> Services:
    """Start what the settings ask for: the database (embedded if no URL) and the ledger.

    Overrides: `ledger` (a ready Ledger), or `clock`, `retry_policy`, `limits` for the one
    built here.
    """
    stack = contextlib.ExitStack()
    try:
        database_url = settings.database_url
        if database_url is None:
            embedded = EmbeddedPostgres(settings.data_dir)
            database_url = embedded.start()
            stack.callback(embedded.stop)
        ledger = overrides.pop("ledger", None)
        if ledger is None:
            env = postgres_env(database_url, schema=settings.database_schema)
            ledger = Ledger(env, **overrides)
            stack.callback(ledger.close)
        return Services(
            settings=settings,
            ledger=ledger,
            database_url=database_url,
            schema=settings.database_schema,
            _stack=stack,
        )
    except BaseException:
        stack.close()
        raise
