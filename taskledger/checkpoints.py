"""The api's leader logs a ledger checkpoint every `checkpoint_minutes`.

Shipped off the host with the logs, the lines anchor the hash chain where someone with
the database cannot reach them: each line is itself a checkpoint file for `taskledger
ledger verify --checkpoint` (its position, chain, at and hmac fields).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import psycopg

from ledger import verification
from projections import leadership
from workers.singleton import keep_running, sleep_or_stop

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        database_url: str,
        schema: str,
        key: bytes | None,
        minutes: float,
        *,
        standby_interval: float = 0.5,
    ) -> None:
        self.database_url = database_url
        self.schema = schema
        self.key = key
        self.seconds = minutes * 60
        self.standby_interval = standby_interval
        self.logged = 0
        self.is_leader = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        await keep_running(
            "checkpointer", self._run_once, stop, self.standby_interval, self.is_leader.clear
        )

    async def _run_once(self, stop: asyncio.Event) -> None:
        key = leadership.lock_key("checkpoint", self.schema)
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as session:
            if not await leadership.wait_to_lead_async(session, key, stop, self.standby_interval):
                return
            self.is_leader.set()
            while not stop.is_set():
                point = await asyncio.to_thread(self._make)
                fields: dict[str, Any] = orjson.loads(point.as_json())
                log.info("ledger checkpoint", extra=fields)
                self.logged += 1
                await sleep_or_stop(stop, self.seconds)

    def _make(self) -> verification.Checkpoint:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return verification.checkpoint(conn, self.schema, self.key)
