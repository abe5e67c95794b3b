"""The generic Kafka consumer's loop on real Kafka and PostgreSQL: a malformed message is
dead-lettered with the registry's headers and does not block the partition; a consumer that
dies after its effects are durable but before its offsets are committed gets the batch again,
and the inbox makes the redelivery a no-op (exactly-once effect)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from cake.events.v1 import envelope_pb2, payloads_pb2, registry
from cake_common.consumer import (
    ConsumedEvent,
    ConsumerMetrics,
    EventConsumer,
    FatalConsumerError,
)
from cake_common.db import create_async_engine_for
from cake_common.inbox import inbox_table, record_many
from cake_common.kafka import create_consumer, create_producer, ensure_topics, start_with_retry
from cake_common.retry import RetryPolicy
from cake_common.startup_retry import startup_retrying
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

metadata = sa.MetaData()
inbox = inbox_table(metadata)
effects = sa.Table(
    "first_login_effects",
    metadata,
    sa.Column("event_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.BigInteger, nullable=False),
)


@pytest.fixture(scope="module")
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine_for(postgres_url, pool_size=4)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
async def topic(kafka_bootstrap: str) -> str:
    name = f"test.consumer.{uuid.uuid4().hex[:12]}"
    await ensure_topics(kafka_bootstrap, {name: 1, registry.dead_letter_topic_for(name): 1})
    return name


class EffectHandler:
    """A first-login handler the way a service writes one: the batch's effects and its
    inbox rows in one transaction; optionally the process "dies" right after it commits."""

    def __init__(self, engine: AsyncEngine, *, die_after_commit: bool = False) -> None:
        self._engine = engine
        self._die_after_commit = die_after_commit
        self.batches = 0

    async def __call__(
        self, events: Sequence[ConsumedEvent[payloads_pb2.UserFirstLogin]]
    ) -> list[str]:
        async with self._engine.begin() as connection:
            fresh = await record_many(connection, [e.event_id for e in events], "test")
            rows = [
                {"event_id": e.event_id, "user_id": e.payload.user_id}
                for e in events
                if e.event_id in fresh
            ]
            if rows:
                await connection.execute(sa.insert(effects), rows)
        self.batches += 1
        if self._die_after_commit:
            raise FatalConsumerError("dies after its effects, before its offsets")
        return ["applied" if e.event_id in fresh else "duplicate" for e in events]


def first_login(user_id: int) -> bytes:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    payload = AnyMessage()
    payload.Pack(payloads_pb2.UserFirstLogin(user_id=user_id, login_at=stamp))
    return envelope_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()),
        type=registry.USER_FIRST_LOGIN.name,
        occurred_at=stamp,
        aggregate_type=registry.USER_FIRST_LOGIN.aggregate_type,
        aggregate_id=str(user_id),
        payload=payload,
    ).SerializeToString()


async def publish(bootstrap: str, topic: str, values: Sequence[bytes]) -> None:
    producer = await start_with_retry(
        lambda: create_producer(bootstrap, "consumer-test"), timeout_seconds=30
    )
    try:
        for value in values:
            await producer.send_and_wait(topic, key=b"k", value=value)
    finally:
        await producer.stop()


def consumer_for(
    bootstrap: str, topic: str, group: str, handler: EffectHandler, metrics: CollectorRegistry
) -> EventConsumer:
    consumer = EventConsumer(
        name="test",
        metrics=ConsumerMetrics("test", metrics),
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id=f"{group}-{uuid.uuid4().hex[:6]}",
        retry=RetryPolicy(base_seconds=0.05, max_seconds=0.5),
    )
    consumer.register(registry.USER_FIRST_LOGIN, handler, topic=topic)
    return consumer


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def committed(bootstrap: str, group: str, topic: str) -> int | None:
    admin: AIOKafkaAdminClient = await start_with_retry(
        lambda: AIOKafkaAdminClient(bootstrap_servers=bootstrap), timeout_seconds=30
    )
    try:
        # A fresh broker may not have a group coordinator for a moment: ask again then.
        async for attempt in startup_retrying(
            "group coordinator", timeout_seconds=30, retry_on=(KafkaError,)
        ):
            with attempt:
                offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    position = offsets.get(TopicPartition(topic, 0))
    return position.offset if position is not None else None


async def effect_count(engine: AsyncEngine, user_ids: Sequence[int]) -> int:
    async with engine.connect() as connection:
        count = await connection.scalar(
            sa.select(sa.func.count()).select_from(effects).where(effects.c.user_id.in_(user_ids))
        )
    return int(count or 0)


async def test_a_malformed_message_is_dead_lettered_and_does_not_block_the_partition(
    engine: AsyncEngine, kafka_bootstrap: str, topic: str
) -> None:
    group = f"test-dead-letter-{uuid.uuid4().hex[:8]}"
    user_id = 7_100_000_000 + int(time.time()) % 1_000_000
    await publish(kafka_bootstrap, topic, [b"\xffnot an envelope", first_login(user_id)])
    metrics = CollectorRegistry()
    consumer = consumer_for(kafka_bootstrap, topic, group, EffectHandler(engine), metrics)
    consumer.start()

    async def caught_up() -> bool:
        return await committed(kafka_bootstrap, group, topic) == 2

    try:
        await wait_for(caught_up, "both records handled and committed")
    finally:
        await consumer.stop()
    assert await effect_count(engine, [user_id]) == 1

    reader = await start_with_retry(
        lambda: create_consumer(
            kafka_bootstrap, [registry.dead_letter_topic_for(topic)], f"{group}-dlq", "dlq-reader"
        ),
        timeout_seconds=30,
    )
    try:
        letters: list[Any] = []
        deadline = time.monotonic() + 30
        while not letters and time.monotonic() < deadline:
            batches = await reader.getmany(timeout_ms=500)
            letters = [record for records in batches.values() for record in records]
    finally:
        await reader.stop()
    [letter] = letters
    headers = dict(letter.headers)
    assert letter.value == b"\xffnot an envelope"
    assert headers[registry.DEAD_LETTER_REASON_HEADER] == b"undecodable: not an EventEnvelope"
    assert headers[registry.DEAD_LETTER_ORIGIN_HEADER] == f"{topic}/0/0".encode()
    assert metrics.get_sample_value("cake_test_dead_letters_total", {"reason": "undecodable"}) == 1


async def test_a_batch_redelivered_after_a_crash_takes_effect_once(
    engine: AsyncEngine, kafka_bootstrap: str, topic: str
) -> None:
    group = f"test-redelivery-{uuid.uuid4().hex[:8]}"
    base = 7_200_000_000 + (int(time.time()) % 1_000_000) * 10
    user_ids = [base + index for index in range(5)]
    await publish(kafka_bootstrap, topic, [first_login(user) for user in user_ids])

    dying = EffectHandler(engine, die_after_commit=True)
    failures: list[BaseException] = []
    first = consumer_for(kafka_bootstrap, topic, group, dying, CollectorRegistry())
    first.start(on_failure=failures.append)
    with pytest.raises(FatalConsumerError):
        await asyncio.wait_for(first.wait(), timeout=60)
    assert dying.batches >= 1
    assert [type(error) for error in failures] == [FatalConsumerError]
    assert await committed(kafka_bootstrap, group, topic) in (None, -1)  # offsets not committed
    applied_before = await effect_count(engine, user_ids)
    assert applied_before >= 1  # the effects of the dead consumer's batch are durable

    metrics = CollectorRegistry()
    second = consumer_for(kafka_bootstrap, topic, group, EffectHandler(engine), metrics)
    second.start()

    async def caught_up() -> bool:
        return await committed(kafka_bootstrap, group, topic) == len(user_ids)

    try:
        await wait_for(caught_up, "the redelivered batch committed")
    finally:
        await second.stop()
    assert await effect_count(engine, user_ids) == len(user_ids)  # each once, none twice

    def consumed(result: str) -> float:
        value = metrics.get_sample_value("cake_test_consumed_events_total", {"result": result})
        return value or 0.0

    assert consumed("duplicate") == applied_before
    assert consumed("applied") == len(user_ids) - applied_before


async def test_stopping_right_after_a_batch_still_commits_it_and_commits_land_in_order(
    engine: AsyncEngine, kafka_bootstrap: str, topic: str
) -> None:
    """The offset commit runs in the background while the next batch is applied: a stop
    right after a handler returned must still commit its batch (else every restart would
    replay it), and the commits of many small batches in a row must leave the group at
    the last offset, never behind it."""
    group = f"test-commit-order-{uuid.uuid4().hex[:8]}"
    base = 7_300_000_000 + int(time.time()) % 1_000_000
    users = [base + n for n in range(40)]
    metrics = CollectorRegistry()
    last_applied = asyncio.Event()

    class SignallingHandler(EffectHandler):
        async def __call__(
            self, events: Sequence[ConsumedEvent[payloads_pb2.UserFirstLogin]]
        ) -> list[str]:
            outcomes = await super().__call__(events)
            if any(e.payload.user_id == users[-1] for e in events):
                last_applied.set()
            return outcomes

    handler = SignallingHandler(engine)
    consumer = consumer_for(kafka_bootstrap, topic, group, handler, metrics)
    consumer.start()
    try:
        for user_id in users:  # one by one: many batches, each committed behind the next
            await publish(kafka_bootstrap, topic, [first_login(user_id)])
        async with asyncio.timeout(60):
            await last_applied.wait()
    finally:
        await consumer.stop()  # at once: the last batch's commit is still running
    assert handler.batches > 1
    assert await effect_count(engine, users) == len(users)
    assert await committed(kafka_bootstrap, group, topic) == len(users)
