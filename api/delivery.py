"""The deliverer: sends the webhooks the `webhook_deliveries` view says are owed, and
records each attempt on the task's history (`WebhookAttempted`).

A leader-elected role like the dispatcher (one per deployment: a PostgreSQL advisory
lock; it runs in every api process through `Services.singleton_roles`, and the others
stand by). Outside the request path: it follows the view, woken by the views' progress
NOTIFY and by a timer for the next retry that comes due.

- **What is sent**: a POST of `{"type", "task", "event"}` (api.schemas.WebhookPayload):
  the task exactly as `GET /api/tasks/{id}?as_of_version=<the event's version>` answers,
  in the API's encoding, signed per Standard Webhooks (`webhook-id` = the delivery id,
  `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`, one signature per
  secret that signs now: during a rotation's grace the old and the new).
- **Where**: through api.outbound's pinned transport (SSRF checks at connect time).
  Redirects are not followed (a 3xx is a failure); only 2xx is delivered.
- **Retries**: exponential backoff with jitter (BACKOFF, then hourly) until
  `retry_hours` after the trigger, then `gave-up`.
- **At least once**: the view moves only when the attempt is recorded; a crash between
  the POST and its record sends it again, with the same `webhook-id`.
- **Bounds**: `concurrency` deliveries at once; each has `connect_timeout` to connect
  and `total_timeout` in all, so a slow receiver holds one slot, never the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import psycopg
from standardwebhooks.webhooks import Webhook

from api.metrics import WebhookMetrics
from api.outbound import TargetRefused, pinned_transport
from api.schemas import WebhookPayload, dump_json
from api.tasks import task_content
from ledger import HistoryEntry, Ledger, TaskState
from ledger.clock import Clock
from ledger.targets import TargetPolicy
from projections import leadership, tracking, webhook_deliveries

log = logging.getLogger(__name__)

NAME = "webhooks"
# Seconds before the 1st, 2nd, … retry; the last one repeats (hourly).
BACKOFF = (10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
JITTER = 0.2  # each delay is drawn from ±20 % of its value
REMEMBERED = 10_000  # attempts recorded that the view may not show yet


def _version() -> str:
    try:
        return metadata.version("taskledger")
    except metadata.PackageNotFoundError:
        return "dev"


USER_AGENT = f"taskledger-webhooks/{_version()}"


@dataclass(frozen=True)
class Sent:
    """What one attempt to send a webhook came to."""

    status_code: int | None  # the receiver's answer, if any
    error: str | None  # why it failed, if it did
    seconds: float
    refused: bool = False  # the SSRF policy refused the target: nothing was sent

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def sign(secrets: Sequence[str], msg_id: str, at: datetime, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space-separated."""
    data = body.decode()
    return " ".join(Webhook(secret).sign(msg_id, at, data) for secret in secrets)


def payload(task: TaskState, entry: HistoryEntry) -> bytes:
    """A webhook's body: the task as of the event, and the event (the API's encoding)."""
    return dump_json(
        WebhookPayload.model_validate(
            {
                "type": entry.type,
                "task": task_content(task),
                "event": {
                    "version": entry.version,
                    "type": entry.type,
                    "at": entry.at,
                    "data": entry.data,
                },
            }
        )
    )


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Deliverer:
    def __init__(
        self,
        database_url: str,
        schema: str,
        ledger: Ledger,
        clock: Clock,
        *,
        targets: TargetPolicy | None = None,
        retry_hours: float = 24.0,
        backoff: Sequence[float] = BACKOFF,
        concurrency: int = 8,
        connect_timeout: float = 5.0,
        total_timeout: float = 10.0,
        poll_interval: float = 1.0,
        standby_interval: float = 0.5,
        min_interval: float = 0.05,
        batch_size: int = 64,
        metrics: WebhookMetrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.database_url = database_url
        self.schema = schema
        self.ledger = ledger
        self.clock = clock
        self.targets = targets if targets is not None else ledger.webhook_targets
        self.retry_hours = retry_hours
        self.backoff = tuple(backoff)
        self.concurrency = concurrency
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout
        self.poll_interval = poll_interval
        self.standby_interval = standby_interval
        self.min_interval = min_interval
        self.batch_size = batch_size
        self.metrics = metrics or WebhookMetrics()
        self.transport = transport
        self.is_leader = asyncio.Event()
        self._in_flight: set[UUID] = set()
        # delivery id -> its attempts recorded by this process: a row the view shows with
        # fewer is one whose last attempt the view has not applied yet (not due again).
        self._recorded: OrderedDict[UUID, int] = OrderedDict()

    # -- the role ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Lead when this process's turn comes, deliver until stopped."""
        while not stop.is_set():
            try:
                await self._run_once(stop)
            except (psycopg.OperationalError, OSError) as error:
                log.warning("webhooks lost a connection; retrying", extra={"error": str(error)})
            except Exception:
                log.exception("webhooks failed; retrying in 2 s")
                await _sleep_or_stop(stop, 2.0)
            self.is_leader.clear()
            await _sleep_or_stop(stop, self.standby_interval)

    def client(self) -> httpx.AsyncClient:
        """The HTTP client every delivery of a turn shares: pinned, no redirects, bounded."""
        return httpx.AsyncClient(
            transport=self.transport or pinned_transport(self.targets),
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self.total_timeout, connect=self.connect_timeout),
        )

    async def _run_once(self, stop: asyncio.Event) -> None:
        key = leadership.lock_key(NAME, self.schema)
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True
        ) as session:
            if not await leadership.wait_to_lead_async(session, key, stop, self.standby_interval):
                return
            await session.execute(tracking.listen_to_views())
            self.is_leader.set()
            log.info("webhooks deliverer active")
            running: set[asyncio.Task[None]] = set()
            slots = asyncio.Semaphore(self.concurrency)
            progress = f"{self.schema}:{webhook_deliveries.WebhookDeliveriesProjection.name}:"
            loop = asyncio.get_running_loop()
            try:
                async with self.client() as client:
                    with psycopg.connect(self.database_url, autocommit=True) as conn:
                        while not stop.is_set():
                            looked_at = loop.time()
                            timeout = await self._start_due(conn, client, slots, running)
                            notified = False
                            # Only this view's progress matters (the others move far
                            # more often); closed at once when it comes (its lock).
                            notes = session.notifies(timeout=timeout)
                            async with contextlib.aclosing(notes):
                                async for note in notes:
                                    if note.payload.startswith(progress):
                                        notified = True
                                        break
                            if notified:  # the views move often: one look per min_interval
                                wake = min(looked_at + self.min_interval, looked_at + timeout)
                                await asyncio.sleep(max(0.0, wake - loop.time()))
            finally:
                if running:
                    _, late = await asyncio.wait(running, timeout=self.total_timeout + 5)
                    for task in late:
                        task.cancel()

    async def _start_due(
        self,
        conn: psycopg.Connection[Any],
        client: httpx.AsyncClient,
        slots: asyncio.Semaphore,
        running: set[asyncio.Task[None]],
    ) -> float:
        """Start a delivery for each due row; return seconds until the next look."""
        now = self.clock.now()
        rows = await asyncio.to_thread(
            webhook_deliveries.due, conn, self.schema, now, self.batch_size
        )
        for row in rows:
            key = row["id"]
            if key in self._in_flight or row["attempts"] < self._recorded.get(key, 0):
                continue
            self._in_flight.add(key)
            task = asyncio.create_task(self._deliver(client, slots, row))
            running.add(task)
            task.add_done_callback(running.discard)
        upcoming = await asyncio.to_thread(webhook_deliveries.next_due, conn, self.schema)
        if upcoming is None:
            return self.poll_interval
        until = (upcoming - self.clock.now()).total_seconds()
        return self.poll_interval if until <= 0 else min(self.poll_interval, until)

    async def _deliver(
        self, client: httpx.AsyncClient, slots: asyncio.Semaphore, row: dict[str, Any]
    ) -> None:
        try:
            async with slots:
                sent = await self.send(client, row)
            await asyncio.to_thread(self.record, row, sent)
        except Exception:
            # Not recorded: the view still says pending, so it is sent again (same id).
            log.exception(
                "a webhook attempt could not be recorded; it will be sent again",
                extra={"task_id": str(row["task_id"]), "delivery_id": str(row["id"])},
            )
        finally:
            self._in_flight.discard(row["id"])

    # -- one attempt -------------------------------------------------------------------------

    async def send(self, client: httpx.AsyncClient, row: dict[str, Any]) -> Sent:
        """POST the webhook of `row` (a due row of the view) once; never raises for what
        the receiver or the network does. Records nothing."""
        task, entry = await asyncio.to_thread(
            self.ledger.webhook_trigger, row["task_id"], row["trigger_version"]
        )
        body = payload(task, entry)
        secrets = await asyncio.to_thread(
            self.ledger.webhooks.signing_secrets, row["tenant"], self.clock.now()
        )
        # Wall time: receivers check it against theirs (five minutes either way).
        sent_at = datetime.now(UTC).replace(microsecond=0)
        msg_id = str(row["id"])
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": sign(secrets, msg_id, sent_at, body),
        }
        started = time.perf_counter()

        def took() -> float:
            return time.perf_counter() - started

        try:
            async with (
                asyncio.timeout(self.total_timeout),
                client.stream("POST", row["url"], content=body, headers=headers) as response,
            ):
                status = response.status_code  # the body is not read
        except TargetRefused as refused:
            return Sent(None, str(refused), took(), refused=True)
        except TimeoutError:
            return Sent(None, f"no answer within {self.total_timeout:g} s", took())
        except httpx.TimeoutException as error:
            return Sent(None, f"timed out ({type(error).__name__})", took())
        except httpx.HTTPError as error:
            return Sent(None, f"{type(error).__name__}: {error}", took())
        if 200 <= status < 300:
            return Sent(status, None, took())
        if 300 <= status < 400:
            return Sent(status, f"HTTP {status}: redirects are not followed", took())
        return Sent(status, f"HTTP {status}", took())

    def next_attempt(self, row: dict[str, Any], attempt: int, now: datetime) -> datetime | None:
        """When to try again after failed attempt `attempt`, or None: the retry window
        (`retry_hours` after the trigger) is over."""
        delay = self.backoff[min(attempt - 1, len(self.backoff) - 1)]
        delay *= random.uniform(1 - JITTER, 1 + JITTER)
        at = now + timedelta(seconds=delay)
        if at > row["trigger_at"] + timedelta(hours=self.retry_hours):
            return None
        return at

    def record(self, row: dict[str, Any], sent: Sent) -> None:
        """WebhookAttempted on the task (blocking), the log line and the metrics."""
        attempt = row["attempts"] + 1
        now = self.clock.now()
        next_at = None if sent.delivered else self.next_attempt(row, attempt, now)
        outcome = "delivered" if sent.delivered else ("failed" if next_at else "gave-up")
        self.ledger.record_webhook_attempt(
            row["task_id"],
            delivery_id=row["id"],
            trigger_version=row["trigger_version"],
            trigger_type=row["trigger_type"],
            url=row["url"],
            delivery_attempt=attempt,
            outcome=outcome,
            status_code=sent.status_code,
            error=sent.error,
            next_attempt_at=next_at,
        )
        self._recorded[row["id"]] = attempt
        self._recorded.move_to_end(row["id"])
        while len(self._recorded) > REMEMBERED:
            self._recorded.popitem(last=False)
        self.metrics.deliveries.labels(outcome).inc()
        self.metrics.delivery_seconds.observe(sent.seconds)
        fields = {
            "task_id": str(row["task_id"]),
            "delivery_id": str(row["id"]),
            "host": urlsplit(row["url"]).hostname,
            "trigger": row["trigger_type"],
            "attempt": attempt,
            "outcome": outcome,
            "status_code": sent.status_code,
            "error": sent.error,
            "seconds": round(sent.seconds, 3),
            "next_attempt_at": next_at.isoformat() if next_at else None,
        }
        if sent.refused:
            log.warning(f"webhook refused: {sent.error}", extra=fields)
        elif sent.delivered:
            log.info("webhook delivered", extra=fields)
        else:
            log.warning("webhook attempt failed", extra=fields)
