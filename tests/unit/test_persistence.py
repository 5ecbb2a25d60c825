"""Events survive serialisation exactly: every field type of every event type."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from eventsourcing.persistence import StoredEvent
from hypothesis import given
from hypothesis import strategies as st

from ledger.connections import InvalidDatabaseURL, postgres_env
from ledger.domain import Task
from ledger.keys import ApiKey
from ledger.log import event_payload
from ledger.persistence import EventMapper, OrjsonTranscoder, stored_fields
from ledger.webhooks import TenantSettings

MAPPER = EventMapper(transcoder=OrjsonTranscoder())

# What a task may carry: strict JSON, and no U+0000 (PostgreSQL text cannot hold it). No
# lone surrogates either: they are not UTF-8, and the API's JSON parser refuses them
# (`characters()` draws them unless given the codec; `text()` alone leaves them out).
storable_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | storable_text,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(storable_text.filter(lambda t: len(t) <= 8), children, max_size=4)
    ),
    max_leaves=20,
)
# Any aware instant, in any fixed offset, to the microsecond.
instants = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
) | st.builds(
    lambda d, minutes: d.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    st.integers(-14 * 60, 14 * 60),
)
texts = st.text()
numbers = st.integers(1, 10) | st.floats(0.001, 86_400)
payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=5)

EVENT_FIELDS: dict[type, dict[str, st.SearchStrategy[Any]]] = {
    Task.TaskSubmitted: {
        "originator_topic": st.just("ledger.domain:Task"),
        "description": texts,
        "language": texts,
        "code": texts,
        "data": json_values,
        "ttl_seconds": numbers,
        "max_attempts": st.integers(1, 10),
        "tenant": texts,
        "submitted_by": texts,
        "idempotency_key": st.none() | texts,
        "callback_url": st.none() | texts,
        "callback_events": st.none() | st.lists(texts, max_size=4),
    },
    Task.AttemptScheduled: {
        "attempt": st.integers(1, 100),
        "reason": texts,
        "not_before": instants,
        "deadline": instants,
        "ttl_seconds": numbers,
        "by": texts,
        "bulk_id": st.none() | texts,
    },
    Task.AttemptStarted: {"attempt": st.integers(1, 100), "worker_id": texts},
    Task.AttemptCompleted: {"attempt": st.integers(1, 100), "result": payloads},
    Task.AttemptFailed: {
        "attempt": st.integers(1, 100),
        "error": payloads,
        "retryable": st.booleans(),
    },
    Task.TaskExpired: {"attempt": st.integers(1, 100), "detected_by": texts},
    Task.TaskCancelled: {
        "attempt": st.integers(1, 100),
        "by": texts,
        "reason": texts,
        "bulk_id": st.none() | texts,
    },
    Task.TaskUpdated: {"changes": payloads, "by": texts},
    Task.WebhookAttempted: {
        "delivery_id": st.uuids(),
        "trigger_version": st.integers(1, 100),
        "trigger_type": texts,
        "url": texts,
        "delivery_attempt": st.integers(1, 100),
        "outcome": st.sampled_from(["delivered", "failed", "gave-up"]),
        "status_code": st.none() | st.integers(100, 599),
        "error": st.none() | texts,
        "next_attempt_at": st.none() | instants,
    },
    TenantSettings.SettingsCreated: {
        "originator_topic": st.just("ledger.webhooks:TenantSettings"),
        "tenant": texts,
    },
    TenantSettings.WebhookDefaultSet: {
        "callback_url": st.none() | texts,
        "callback_events": st.none() | st.lists(texts, max_size=4),
        "by": texts,
    },
    TenantSettings.WebhookSecretRotated: {"secret_id": texts, "by": texts},
    ApiKey.KeyIssued: {
        "originator_topic": st.just("ledger.keys:ApiKey"),
        "key_id": texts,
        "tenant": texts,
        "role": texts,
        "secret_sha256": texts,
        "issued_by": texts,
        "label": texts,
    },
    ApiKey.KeyRevoked: {"by": texts},
}


def events() -> st.SearchStrategy[Any]:
    def build(event_class: type) -> st.SearchStrategy[Any]:
        return st.builds(
            event_class,
            originator_id=st.uuids(),
            originator_version=st.integers(1, 2**31),
            timestamp=instants,
            **EVENT_FIELDS[event_class],
        )

    return st.one_of(*(build(cls) for cls in EVENT_FIELDS))


def test_every_event_type_is_covered() -> None:
    defined = {
        value
        for aggregate in (Task, ApiKey, TenantSettings)
        for value in vars(aggregate).values()
        if isinstance(value, type)
        and issubclass(value, aggregate.Event | aggregate.Created)
        and value.__name__ not in ("Event", "Created")
    }
    assert {cls.__name__ for cls in defined} == {cls.__name__ for cls in EVENT_FIELDS}


@given(events())
def test_events_round_trip_exactly(event: Any) -> None:
    stored = MAPPER.to_stored_event(event)
    restored = MAPPER.to_domain_event(stored)
    assert type(restored) is type(event)
    assert vars(restored) == vars(event)
    for name, value in vars(event).items():
        # == is not enough: 1 == 1.0 == True, and aware datetimes compare by instant.
        assert type(vars(restored)[name]) is type(value), name
        if isinstance(value, datetime):
            assert vars(restored)[name].utcoffset() == value.utcoffset()


def followers_view(stored: StoredEvent) -> tuple[str, dict[str, Any]]:
    """What the mapper makes of a stored event, as the log's followers use it."""
    restored = MAPPER.to_domain_event(stored)
    fields = event_payload(restored)
    fields["timestamp"] = restored.timestamp
    return type(restored).__name__, fields


@given(events())
def test_the_followers_fast_reading_is_the_mappers(event: Any) -> None:
    stored = MAPPER.to_stored_event(event)
    kind, fields = stored_fields(stored.topic, stored.state)
    assert (kind, fields) == followers_view(stored)
    for name, value in fields.items():
        assert type(value) is type(vars(event)[name]), name


def test_the_followers_fast_reading_upcasts_like_the_mapper() -> None:
    stored = [
        StoredEvent(uuid.uuid4(), 1, "ledger.domain:Task.TaskSubmitted", V1_SUBMISSION),
        *(
            StoredEvent(uuid.uuid4(), 2, f"ledger.domain:Task.{cls.__name__}", state)
            for cls, state in V1_WITHOUT_BULK_ID
        ),
    ]
    for event in stored:
        assert stored_fields(event.topic, event.state) == followers_view(event)


def test_client_data_shaped_like_a_type_tag_is_kept_as_data() -> None:
    tagged = {"_type_": "uuid_hex", "_data_": uuid.uuid4().hex}
    event = Task.TaskUpdated(
        originator_id=uuid.uuid4(),
        originator_version=2,
        timestamp=datetime.now(UTC),
        changes={"data": tagged},
        by="k",
    )
    assert MAPPER.to_domain_event(MAPPER.to_stored_event(event)).changes == {"data": tagged}


def test_stored_state_is_json() -> None:
    event = Task.TaskExpired(
        originator_id=uuid.uuid4(),
        originator_version=3,
        timestamp=datetime(2030, 1, 1, 12, 0, 0, 5, tzinfo=UTC),
        attempt=1,
        detected_by="reaper",
    )
    stored = MAPPER.to_stored_event(event)
    assert isinstance(stored, StoredEvent)
    assert stored.state == (
        b'{"timestamp":"2030-01-01T12:00:00.000005+00:00","attempt":1,"detected_by":"reaper"}'
    )


V1_WITHOUT_BULK_ID = [
    (
        Task.AttemptScheduled,
        b'{"timestamp":"2030-01-01T12:00:00+00:00","attempt":2,"reason":"manual-retry",'
        b'"not_before":"2030-01-01T12:00:00+00:00","deadline":"2030-01-01T12:01:00+00:00",'
        b'"ttl_seconds":60.0,"by":"key-1"}',
    ),
    (
        Task.TaskCancelled,
        b'{"timestamp":"2030-01-01T12:00:00+00:00","attempt":1,"by":"key-1","reason":""}',
    ),
]
V1_SUBMISSION = (
    b'{"timestamp":"2030-01-01T12:00:00+00:00","originator_topic":"ledger.domain:Task",'
    b'"description":"d","language":"python","code":"print(1)","data":null,'
    b'"ttl_seconds":60.0,"max_attempts":3,"tenant":"acme","submitted_by":"key-1",'
    b'"idempotency_key":null}'
)


@pytest.mark.parametrize(("event_class", "state"), V1_WITHOUT_BULK_ID)
def test_events_stored_before_bulk_ids_read_back_with_none(event_class: type, state: bytes) -> None:
    """Version 1 of these events, stored before bulk actions existed, has no bulk_id."""
    topic = f"ledger.domain:Task.{event_class.__name__}"
    restored = MAPPER.to_domain_event(StoredEvent(uuid.uuid4(), 2, topic, state))
    assert type(restored) is event_class
    assert restored.bulk_id is None
    assert restored.by == "key-1"


def test_a_submission_stored_before_webhooks_reads_back_without_a_callback() -> None:
    """Version 1 of TaskSubmitted has no callback fields: read as None (no callback of
    its own, the default transitions)."""
    topic = "ledger.domain:Task.TaskSubmitted"
    restored = MAPPER.to_domain_event(StoredEvent(uuid.uuid4(), 1, topic, V1_SUBMISSION))
    assert type(restored) is Task.TaskSubmitted
    assert restored.callback_url is None
    assert restored.callback_events is None
    assert restored.tenant == "acme"
    task = restored.mutate(None)
    assert isinstance(task, Task)
    assert (task.callback_url, task.callback_events) == (None, None)


def test_new_events_are_stored_as_version_2() -> None:
    event = Task.TaskCancelled(
        originator_id=uuid.uuid4(),
        originator_version=3,
        timestamp=datetime(2030, 1, 1, tzinfo=UTC),
        attempt=1,
        by="key-1",
        reason="",
        bulk_id="b-1",
    )
    assert b'"class_version":2' in MAPPER.to_stored_event(event).state
    assert MAPPER.to_domain_event(MAPPER.to_stored_event(event)).bulk_id == "b-1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://app:s%40cret@db.example:6543/ledger",
            {
                "POSTGRES_HOST": "db.example",
                "POSTGRES_PORT": "6543",
                "POSTGRES_USER": "app",
                "POSTGRES_PASSWORD": "s@cret",
                "POSTGRES_DBNAME": "ledger",
            },
        ),
        (
            "postgresql://postgres@/postgres?host=/tmp/pg%20dir",
            {
                "POSTGRES_HOST": "/tmp/pg dir",
                "POSTGRES_PORT": "5432",
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
                "POSTGRES_DBNAME": "postgres",
            },
        ),
    ],
)
def test_database_urls_become_store_settings(url: str, expected: dict[str, str]) -> None:
    env = postgres_env(url)
    assert {k: env[k] for k in expected} == expected
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    assert env["POSTGRES_ENABLE_DB_FUNCTIONS"] == "n"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://h/db", "postgresql://"),
        ("postgresql:///db", "no host"),
        ("postgresql://h", "no database"),
    ],
)
def test_bad_database_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(InvalidDatabaseURL, match=problem):
        postgres_env(url)
