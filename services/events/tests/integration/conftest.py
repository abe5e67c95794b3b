"""Fixtures for the relay's integration tests: real PostgreSQL and Kafka from the test stack.

Each test gets its own source databases (an ``outbox`` table reached through the real
``cake_relay`` role, as in production), its own Kafka topics, and the module's migrated
events database.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from cake.events.v1 import envelope_pb2, payloads_pb2
from cake_common.db import create_async_engine_for, libpq_url
from cake_common.kafka import ensure_topics
from cake_common.migrations import run_alembic_upgrade
from cake_common.outbox import grant_outbox_to_relay_sql, outbox_table
from cake_devtools.stack.services import OUTBOX_SOURCES
from cake_events.bootstrap import MIGRATIONS, RelayWiring, build_relays
from cake_events.settings import EventsSettings
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

RELAY_ROLE = "cake_relay"
PARTITIONS = 6


@dataclass(frozen=True)
class SourceDatabase:
    """A scratch database with an outbox, as a producing service would have it."""

    name: str
    owner_url: str
    """Async SQLAlchemy URL of the superuser (writes rows like the producing service)."""
    relay_url: str
    """Async SQLAlchemy URL of the ``cake_relay`` role (what the relay is given)."""

    @property
    def owner_libpq_url(self) -> str:
        return libpq_url(self.owner_url)


@dataclass(frozen=True)
class OutboxRow:
    event_id: uuid.UUID
    event_type: str
    aggregate_id: str
    payload: bytes
    payload_type: str
    aggregate_type: str = "user"
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    trace_parent: str | None = None


def _timestamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def payload_for(event_type: str, user_id: int, sequence: int) -> Message:
    """A valid payload of ``event_type`` for user ``user_id``."""
    now = _timestamp(datetime.now(UTC))
    code = f"CAKE-{sequence:08d}"
    if event_type == "USER_FIRST_LOGIN":
        return payloads_pb2.UserFirstLogin(user_id=user_id, login_at=now)
    if event_type == "PROMOTION_ENROLLMENT":
        return payloads_pb2.PromotionEnrollment(
            user_id=user_id, campaign_id=1, participation_order=sequence + 1, enrolled_at=now
        )
    if event_type == "VOUCHER_ISSUED":
        return payloads_pb2.VoucherIssued(
            voucher_id=sequence + 1,
            code=code,
            user_id=user_id,
            campaign_id=1,
            discount_percentage="30",
            expires_at=now,
            issued_at=now,
        )
    if event_type == "VOUCHER_USED":
        return payloads_pb2.VoucherUsed(
            voucher_id=sequence + 1,
            code=code,
            user_id=user_id,
            transaction_id=f"TXN-{sequence}",
            used_amount="100.00",
            discount_amount="30.00",
            used_at=now,
        )
    return payloads_pb2.PaymentProcessed(
        transaction_id=f"TXN-{sequence}",
        user_id=user_id,
        original_amount="100.00",
        discount_amount="30.00",
        final_amount="70.00",
        success=True,
        processed_at=now,
    )


def event_row(event_type: str, user_id: int, sequence: int = 0) -> OutboxRow:
    payload = payload_for(event_type, user_id, sequence)
    return OutboxRow(
        event_id=uuid.uuid4(),
        event_type=event_type,
        aggregate_id=str(user_id),
        payload=payload.SerializeToString(),
        payload_type=payload.DESCRIPTOR.full_name,
    )


async def write_rows(source: SourceDatabase, rows: Sequence[OutboxRow]) -> list[int]:
    """Insert rows (COPY, one transaction, then NOTIFY); returns their outbox ids in order."""
    async with await psycopg.AsyncConnection.connect(source.owner_libpq_url) as conn:
        async with conn.cursor() as cursor:
            async with cursor.copy(
                "COPY outbox (event_id, event_type, aggregate_type, aggregate_id, payload,"
                " payload_type, occurred_at, trace_parent) FROM STDIN"
            ) as copy:
                for row in rows:
                    await copy.write_row(
                        (
                            row.event_id,
                            row.event_type,
                            row.aggregate_type,
                            row.aggregate_id,
                            row.payload,
                            row.payload_type,
                            row.occurred_at,
                            row.trace_parent,
                        )
                    )
            await cursor.execute(
                "SELECT id FROM outbox WHERE event_id = ANY(%s) ORDER BY id",
                ([row.event_id for row in rows],),
            )
            ids = [record[0] for record in await cursor.fetchall()]
            await cursor.execute("SELECT pg_notify('cake_outbox', current_database())")
        await conn.commit()
    return ids


async def outbox_state(source: SourceDatabase) -> dict[str, int]:
    """Counts of the source's outbox rows by state."""
    async with await psycopg.AsyncConnection.connect(source.owner_libpq_url) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FILTER (WHERE published_at IS NOT NULL),"
            " count(*) FILTER (WHERE published_at IS NULL AND dead_lettered_at IS NULL),"
            " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL),"
            " coalesce(sum(attempts), 0)"
            " FROM outbox"
        )
        published, waiting, dead, attempts = await cursor.fetchone()  # type: ignore[misc]
    return {"published": published, "waiting": waiting, "dead": dead, "attempts": attempts}


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, within: float = 60, what: str = "condition"
) -> None:
    """Poll ``condition`` until true; fail the test if it never becomes true (a liveness
    bound, not a performance assertion)."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def all_published(source: SourceDatabase, expected: int) -> bool:
    return (await outbox_state(source))["published"] >= expected


@dataclass(frozen=True)
class Delivered:
    """What a consumer read back: (event id, aggregate id, partition) in log order."""

    records: list[ConsumerRecord[bytes, bytes]]

    def event_ids(self) -> list[uuid.UUID]:
        return [
            uuid.UUID(envelope_pb2.EventEnvelope.FromString(record.value).event_id)  # type: ignore[arg-type]
            for record in self.records
        ]

    def by_aggregate(self) -> dict[str, list[uuid.UUID]]:
        """Each aggregate's event ids in the order a consumer sees them."""
        sequences: dict[str, list[uuid.UUID]] = defaultdict(list)
        for record in sorted(self.records, key=lambda r: (r.topic, r.partition, r.offset)):
            envelope = envelope_pb2.EventEnvelope.FromString(record.value)  # type: ignore[arg-type]
            assert record.key == envelope.aggregate_id.encode()
            sequences[envelope.aggregate_id].append(uuid.UUID(envelope.event_id))
        return sequences


async def read_topics(bootstrap: str, topics: Sequence[str]) -> Delivered:
    """Everything currently on ``topics`` (up to their end offsets), from the beginning."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, partition) for topic in topics for partition in range(PARTITIONS)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end_offsets = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        remaining = {tp for tp, end in end_offsets.items() if end > 0}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=10_000)
            for batch in batches.values():
                records.extend(batch)
            for tp in list(remaining):
                if await consumer.position(tp) >= end_offsets[tp]:
                    remaining.discard(tp)
        return Delivered(records)
    finally:
        await consumer.stop()


def ordered_by_aggregate(rows: Sequence[OutboxRow]) -> dict[str, list[uuid.UUID]]:
    """Each aggregate's event ids in outbox (commit) order."""
    sequences: dict[str, list[uuid.UUID]] = defaultdict(list)
    for row in rows:
        sequences[row.aggregate_id].append(row.event_id)
    return sequences


def first_occurrences(event_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """What a deduplicating consumer applies: each event the first time it is seen."""
    seen: set[uuid.UUID] = set()
    first = []
    for event_id in event_ids:
        if event_id not in seen:
            seen.add(event_id)
            first.append(event_id)
    return first


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def events_db(postgres_url: str) -> str:
    """The module's events database, migrated to head."""
    await asyncio.to_thread(run_alembic_upgrade, postgres_url, MIGRATIONS)
    return postgres_url


@pytest.fixture
async def events_engine(events_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine_for(events_db, pool_size=2)
    yield engine
    await engine.dispose()


SOURCE_TOPICS = {name: list(topics) for name, topics in OUTBOX_SOURCES.items()}
"""The registry topics of each source, as the local stack configures them."""


def relay_url_of_the_stack(stack: Any) -> str:
    """The relay role's URL on the stack's auth database (a template for scratch ones)."""
    sources = json.loads(stack.service_environment()["events"]["CAKE_EVENTS_SOURCES"])
    return str(next(source["outbox_url"] for source in sources if source["name"] == "auth"))


@pytest.fixture
def make_source_db(
    stack: Any, request: pytest.FixtureRequest
) -> Iterator[Callable[[], SourceDatabase]]:
    """Factory of scratch source databases with an ``outbox`` granted to ``cake_relay``."""
    admin_url = stack.postgres_admin_url
    relay_template = relay_url_of_the_stack(stack)
    created: list[str] = []

    def make() -> SourceDatabase:
        label = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[-30:]
        name = f"t_src_{label}_{secrets.token_hex(3)}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        owner_url = (
            make_url(admin_url)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )
        engine = sa.create_engine(owner_url, poolclass=sa.pool.NullPool)
        try:
            metadata = sa.MetaData()
            outbox_table(metadata)
            with engine.begin() as connection:
                metadata.create_all(connection)
                connection.execute(sa.text(grant_outbox_to_relay_sql(RELAY_ROLE)))
        finally:
            engine.dispose()
        relay_url = (
            make_url(relay_template).set(database=name).render_as_string(hide_password=False)
        )
        return SourceDatabase(name=name, owner_url=owner_url, relay_url=relay_url)

    yield make
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in created:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
async def topic_routes(kafka_bootstrap: str) -> dict[str, str]:
    """Routes of every event type to topics of this test only (created, with their .dlq)."""
    prefix = f"test.{uuid.uuid4().hex[:10]}"
    routes = {
        "USER_FIRST_LOGIN": f"{prefix}.user",
        "PROMOTION_ENROLLMENT": f"{prefix}.voucher",
        "VOUCHER_ISSUED": f"{prefix}.voucher",
        "VOUCHER_USED": f"{prefix}.voucher",
        "PAYMENT_PROCESSED": f"{prefix}.payment",
    }
    topics = {topic for topic in routes.values()}
    await ensure_topics(
        kafka_bootstrap, {name: PARTITIONS for topic in topics for name in (topic, topic + ".dlq")}
    )
    return routes


@pytest.fixture
def relay_settings(
    events_db: str, kafka_bootstrap: str, redis_url: str, topic_routes: dict[str, str]
) -> Callable[..., EventsSettings]:
    """Settings for a relay of the given sources, fast timings for tests; override any field."""

    def make(
        *,
        auth: SourceDatabase | None = None,
        promotions: SourceDatabase | None = None,
        **overrides: Any,
    ) -> EventsSettings:
        values: dict[str, Any] = {
            "database_url": events_db,
            "redis_url": redis_url,
            "kafka_bootstrap_servers": kafka_bootstrap,
            "topic_routes": topic_routes,
            "sources": [
                {"name": name, "outbox_url": source.relay_url, "topics": SOURCE_TOPICS[name]}
                for name, source in (("auth", auth), ("promotions", promotions))
                if source is not None
            ],
            "relay_poll_interval_seconds": 0.2,
            "relay_leader_retry_seconds": 0.2,
            "relay_backoff_base_seconds": 0.05,
            "relay_backoff_max_seconds": 0.2,
            "relay_kafka_timeout_seconds": 5,
            "relay_metrics_refresh_seconds": 0.2,
            "log_json": False,
            "log_level": "WARNING",
        }
        values.update(overrides)
        return EventsSettings(**values)

    return make


@pytest.fixture
def running_relays(
    events_engine: AsyncEngine,
) -> Callable[[EventsSettings], Any]:
    """``async with running_relays(settings) as (wiring, registry):`` relays of one replica."""

    @asynccontextmanager
    async def run(settings: EventsSettings) -> AsyncIterator[tuple[RelayWiring, CollectorRegistry]]:
        registry = CollectorRegistry()
        wiring = build_relays(settings, events_engine, registry)
        wiring.group.start()
        try:
            yield wiring, registry
        finally:
            await wiring.group.stop()
            for engine in wiring.engines:
                await engine.dispose()

    return run


def relay_environment(settings: EventsSettings) -> dict[str, str]:
    """``CAKE_EVENTS_*`` variables giving a relay process the same configuration."""
    environment = {
        "CAKE_EVENTS_DATABASE_URL": settings.database_url.get_secret_value(),
        "CAKE_EVENTS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CAKE_EVENTS_TOPIC_ROUTES": json.dumps(settings.topic_routes),
        "CAKE_EVENTS_RELAY_BATCH_SIZE": str(settings.relay_batch_size),
        "CAKE_EVENTS_RELAY_POLL_INTERVAL_SECONDS": str(settings.relay_poll_interval_seconds),
        "CAKE_EVENTS_RELAY_LEADER_RETRY_SECONDS": str(settings.relay_leader_retry_seconds),
        "CAKE_EVENTS_LOG_LEVEL": settings.log_level,
        "CAKE_EVENTS_LOG_JSON": "false",
    }
    environment["CAKE_EVENTS_SOURCES"] = json.dumps(
        [
            {
                "name": source.name,
                "outbox_url": source.outbox_url.get_secret_value(),
                "topics": list(source.topics),
            }
            for source in settings.sources
        ]
    )
    return environment


class RelayTestKit:
    """The helpers above, for test modules (which cannot import this conftest)."""

    OutboxRow = OutboxRow
    Delivered = Delivered
    event_row = staticmethod(event_row)
    payload_for = staticmethod(payload_for)
    write_rows = staticmethod(write_rows)
    outbox_state = staticmethod(outbox_state)
    wait_until = staticmethod(wait_until)
    all_published = staticmethod(all_published)
    read_topics = staticmethod(read_topics)
    ordered_by_aggregate = staticmethod(ordered_by_aggregate)
    first_occurrences = staticmethod(first_occurrences)
    relay_environment = staticmethod(relay_environment)


@pytest.fixture
def kit() -> type[RelayTestKit]:
    return RelayTestKit
