"""The relay's sources are configuration; Cake's two queue figures are derived from them."""

from __future__ import annotations

import json

import pytest
from cake.events.v1 import registry
from cake_events.bootstrap import build_relays
from cake_events.domain.delivery import QueueStats, SourceQueueStats
from cake_events.entrypoints.grpc.admin import cake_queues
from cake_events.settings import EventsSettings
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import create_async_engine

DATABASE = "postgresql+psycopg://u:p@h/db"
USER_TOPIC = registry.USER_FIRST_LOGIN.topic
VOUCHER_TOPIC = registry.VOUCHER_ISSUED.topic
PAYMENT_TOPIC = registry.PAYMENT_PROCESSED.topic


def source(name: str, *topics: str) -> dict[str, object]:
    return {"name": name, "outbox_url": f"postgresql+psycopg://r:p@h/{name}", "topics": topics}


def test_sources_come_from_one_json_variable_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CAKE_EVENTS_SOURCES",
        json.dumps(
            [
                {**source("auth", USER_TOPIC), "grpc_target": "auth:50051"},
                source("notifications"),
                source("promotions", VOUCHER_TOPIC, PAYMENT_TOPIC),
            ]
        ),
    )
    settings = EventsSettings(database_url=DATABASE)
    assert [(s.name, s.grpc_target, s.topics) for s in settings.sources] == [
        ("auth", "auth:50051", (USER_TOPIC,)),
        ("notifications", None, ()),
        ("promotions", None, (VOUCHER_TOPIC, PAYMENT_TOPIC)),
    ]
    # The URL carries the relay role's password: never shown.
    assert "r:p@" not in repr(settings.sources[0])


def test_no_sources_configured_means_nothing_to_relay() -> None:
    assert EventsSettings(database_url=DATABASE).sources == []


@pytest.mark.parametrize(
    ("sources", "complaint"),
    [
        ([source("auth", "cake.auth.users.v9")], "not in the event registry"),
        ([source("auth"), source("auth")], "names a source twice"),
        ([source("Auth Service")], "name"),
        ([{"name": "auth"}], "outbox_url"),
        ([{**source("auth"), "outbox": "typo"}], "outbox"),
    ],
)
def test_a_bad_source_is_refused_at_start(sources: list[dict[str, object]], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        EventsSettings(database_url=DATABASE, sources=sources)


def figures(name: str, topics: tuple[str, ...], completed: int) -> SourceQueueStats:
    return SourceQueueStats(
        name, topics, QueueStats(waiting=1, active=0, completed=completed, failed=2)
    )


def test_cake_queues_add_up_the_sources_by_their_topics() -> None:
    users, promotions = cake_queues(
        [
            figures("auth", (USER_TOPIC,), 10),
            figures("promotions", (VOUCHER_TOPIC, PAYMENT_TOPIC), 20),
            figures("payments-v2", (PAYMENT_TOPIC,), 5),
            figures("retired", (), 7),  # recorded in the past, configured no more
        ]
    )
    assert users == QueueStats(waiting=1, active=0, completed=10, failed=2)
    assert promotions == QueueStats(waiting=2, active=0, completed=25, failed=4)


def test_cake_queues_are_zero_without_sources() -> None:
    assert cake_queues([]) == (QueueStats(), QueueStats())


def test_health_services_come_from_one_json_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CAKE_EVENTS_HEALTH_SERVICES",
        json.dumps(
            [
                {"name": "notifications", "grpc_target": "notifications:50051", "critical": False},
                {"name": "ledger", "grpc_target": "ledger:50051"},
            ]
        ),
    )
    settings = EventsSettings(database_url=DATABASE)
    assert [(s.name, s.grpc_target, s.critical) for s in settings.health_services] == [
        ("notifications", "notifications:50051", False),
        ("ledger", "ledger:50051", True),
    ]


@pytest.mark.parametrize(
    ("services", "sources", "complaint"),
    [
        (
            [{"name": "auth", "grpc_target": "x:1"}],
            [{**source("auth"), "grpc_target": "a:1"}],
            "report these services twice: auth",
        ),
        ([{"name": "n", "grpc_target": "x:1"}] * 2, [], "twice: n"),
        ([{"name": "notifications"}], [], "grpc_target"),
        ([{"name": "Bad Name", "grpc_target": "x:1"}], [], "name"),
        ([{"name": "n", "grpc_target": "x:1", "critcal": False}], [], "critcal"),
    ],
)
def test_a_bad_health_service_is_refused_at_start(
    services: list[dict[str, object]], sources: list[dict[str, object]], complaint: str
) -> None:
    with pytest.raises(ValidationError, match=complaint):
        EventsSettings(database_url=DATABASE, health_services=services, sources=sources)


async def test_relay_settings_reach_the_relays_and_their_producers() -> None:
    """The composition root hands every relay setting on: the idle back-off was once left
    out (the relay polled at the base interval forever) and the producer's linger is the
    relay's own (0 by default: the relay flushes each claim, lingering only delays it)."""
    settings = EventsSettings(
        database_url=DATABASE,
        sources=[source("auth")],
        relay_idle_poll_max_seconds=7.0,
        relay_kafka_linger_ms=3,
    )
    events_engine = create_async_engine(DATABASE)
    wiring = build_relays(settings, events_engine, CollectorRegistry())
    try:
        (relay,) = wiring.group.relays
        assert relay._timing.idle_poll_max_seconds == 7.0
        producer = relay._publisher._new_producer()  # type: ignore[attr-defined]
        assert producer._message_accumulator._linger_time == 0.003
        default = EventsSettings(database_url=DATABASE).relay_kafka_linger_ms
        assert default == 0
    finally:
        for engine in (*wiring.engines, events_engine):
            await engine.dispose()
