"""A tenant's webhook settings: its default callback and its signing secrets.

The settings are an aggregate of their own (`TenantSettings`, stream uuid5 of the tenant):
`WebhookDefaultSet` (the callback every task of the tenant without one of its own gets)
and `WebhookSecretRotated` (that a new signing secret was made, its id and by whom; the
secret itself is in `webhook_secrets`, ledger.secrets, never in an event).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError

from ledger.clock import Clock
from ledger.errors import ContentionExhausted, InvalidTask
from ledger.secrets import GRACE, SecretBook, SigningSecret
from ledger.store import EventStore, store_errors
from ledger.targets import TargetPolicy, check_callback_events, check_callback_url

log = logging.getLogger("ledger.webhooks")

SETTINGS_NAMESPACE = uuid.UUID("b7b1a3f0-5c1e-4d8e-9e57-3f0d2c6a9b41")
# uuid5 namespace of delivery ids: (task id, trigger version) names one delivery, so a
# delivery sent again keeps its `webhook-id` and receivers can drop the repeat.
DELIVERY_NAMESPACE = uuid.UUID("d3c9a8e2-41f7-4b0a-8c55-6a1e2f9b7d30")
SYSTEM_ACTOR = "taskledger:webhooks"


def settings_stream_id(tenant: str) -> uuid.UUID:
    return uuid.uuid5(SETTINGS_NAMESPACE, tenant)


def delivery_id(task_id: uuid.UUID, trigger_version: int) -> uuid.UUID:
    return uuid.uuid5(DELIVERY_NAMESPACE, f"{task_id}:{trigger_version}")


class TenantSettings(Aggregate):
    class SettingsCreated(Aggregate.Created):
        tenant: str

        def apply(self, settings: TenantSettings) -> None:
            settings.tenant = self.tenant

    class WebhookDefaultSet(Aggregate.Event):
        callback_url: str | None
        callback_events: list[str] | None
        by: str

        def apply(self, settings: TenantSettings) -> None:
            settings.callback_url = self.callback_url
            settings.callback_events = self.callback_events

    class WebhookSecretRotated(Aggregate.Event):
        secret_id: str
        by: str

        def apply(self, settings: TenantSettings) -> None:
            settings.secret_id = self.secret_id

    def __init__(self) -> None:
        self.tenant = ""
        self.callback_url: str | None = None
        self.callback_events: list[str] | None = None
        self.secret_id: str | None = None

    @classmethod
    def create(cls, tenant: str, now: datetime) -> TenantSettings:
        return cls._create(
            cls.SettingsCreated, id=settings_stream_id(tenant), timestamp=now, tenant=tenant
        )


@dataclass(frozen=True)
class WebhookDefault:
    callback_url: str | None
    callback_events: list[str] | None
    updated_at: datetime | None
    by: str | None


@dataclass(frozen=True)
class SecretInfo:
    """A tenant's current secret, and the one before it while it still signs."""

    current: SigningSecret
    previous: SigningSecret | None  # retired less than GRACE ago: still signs

    @property
    def previous_until(self) -> datetime | None:
        if self.previous is None or self.previous.retired_at is None:
            return None
        return self.previous.retired_at + GRACE


class Webhooks:
    """Tenant defaults and signing secrets, over the ledger's store."""

    def __init__(
        self, store: EventStore, clock: Clock, targets: TargetPolicy, secrets: SecretBook
    ) -> None:
        self.store = store
        self.clock = clock
        self.targets = targets
        self.secrets = secrets

    # -- the default callback ------------------------------------------------------------------

    def default(self, tenant: str) -> WebhookDefault:
        settings = self._load(tenant)
        if settings is None:
            return WebhookDefault(None, None, None, None)
        return WebhookDefault(
            settings.callback_url, settings.callback_events, settings.modified_on, None
        )

    def set_default(
        self, tenant: str, callback_url: str | None, callback_events: list[str] | None, by: str
    ) -> WebhookDefault:
        if callback_url is not None:
            check_callback_url(callback_url, self.targets)
        check_callback_events(callback_events)

        def change(settings: TenantSettings) -> None:
            if (settings.callback_url, settings.callback_events) != (
                callback_url,
                callback_events,
            ):
                settings.trigger_event(
                    settings.WebhookDefaultSet,
                    timestamp=self.clock.now(),
                    callback_url=callback_url,
                    callback_events=callback_events,
                    by=by,
                )

        settings = self._change(tenant, change)
        return WebhookDefault(
            settings.callback_url, settings.callback_events, settings.modified_on, by
        )

    # -- signing secrets -------------------------------------------------------------------------

    def secret(self, tenant: str) -> SecretInfo:
        """The tenant's current secret (made now if it has none yet) and the previous one
        while it still signs."""
        info = self._info(tenant, self.clock.now())
        if info is not None:
            return info
        made = self.secrets.create_if_none(tenant, self.clock.now())
        if made is not None:
            self._record_rotation(tenant, made.secret_id, SYSTEM_ACTOR)
        info = self._info(tenant, self.clock.now())
        assert info is not None, "a secret was just made"
        return info

    def rotate(self, tenant: str, by: str) -> SecretInfo:
        made = self.secrets.rotate(tenant, self.clock.now())
        self._record_rotation(tenant, made.secret_id, by)
        info = self._info(tenant, self.clock.now())
        assert info is not None
        return info

    def signing_secrets(self, tenant: str, now: datetime) -> list[str]:
        """The secrets that sign a webhook sent now: the current one (made if there is
        none yet), and the previous one during its grace."""
        current = self.secret(tenant).current
        return [current.secret] + [
            s.secret
            for s in self.secrets.of(tenant)
            if s.retired_at is not None and s.signs_at(now) and s.secret_id != current.secret_id
        ]

    def _info(self, tenant: str, now: datetime) -> SecretInfo | None:
        found = self.secrets.of(tenant)
        current = next((s for s in found if s.retired_at is None), None)
        if current is None:
            return None
        previous = next((s for s in found if s.retired_at is not None and s.signs_at(now)), None)
        return SecretInfo(current, previous)

    def _record_rotation(self, tenant: str, secret_id: str, by: str) -> None:
        def change(settings: TenantSettings) -> None:
            settings.trigger_event(
                settings.WebhookSecretRotated,
                timestamp=self.clock.now(),
                secret_id=secret_id,
                by=by,
            )

        self._change(tenant, change)

    # -- the aggregate ---------------------------------------------------------------------------

    def _load(self, tenant: str) -> TenantSettings | None:
        found = self.store.load_aggregate(settings_stream_id(tenant))
        return found if isinstance(found, TenantSettings) else None

    def _change(self, tenant: str, change: Callable[[TenantSettings], None]) -> TenantSettings:
        if not tenant:
            raise InvalidTask("tenant", "must be a non-empty string")
        for _ in range(16):
            settings = self._load(tenant) or TenantSettings.create(tenant, self.clock.now())
            change(settings)
            if not settings.pending_events:
                return settings
            try:
                with store_errors():
                    self.store.record(settings)
            except IntegrityError:
                continue  # another process wrote first: decide again on its version
            return settings
        raise ContentionExhausted(settings_stream_id(tenant), 16)
