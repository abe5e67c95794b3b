"""The first-login consumer rides out a PostgreSQL outage: while its database refuses
connections the event is retried with backoff and its offset is NOT committed; once the
database is back the event is applied exactly once and only then committed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from cake.events.v1 import envelope_pb2, payloads_pb2
from cake_common.db import create_async_engine_for
from cake_common.kafka import create_producer, ensure_topics, start_with_retry
from cake_promotions import bootstrap
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.enrollment import FirstLoginEnrollment
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration


def first_login(user_id: int) -> bytes:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    payload = AnyMessage()
    payload.Pack(payloads_pb2.UserFirstLogin(user_id=user_id, login_at=stamp))
    return envelope_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()),
        type="USER_FIRST_LOGIN",
        occurred_at=stamp,
        aggregate_type="user",
        aggregate_id=str(user_id),
        payload=payload,
    ).SerializeToString()


def set_connections_allowed(stack: Any, database: str, allowed: bool) -> None:
    with psycopg.connect(stack.postgres_admin_url, autocommit=True) as connection:
        connection.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.SQL("true" if allowed else "false")
            )
        )
        if not allowed:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            )


async def wait_for(condition: Any, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def consumer_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine_for(database_url, pool_size=2, connect_timeout_seconds=2)
    yield engine
    await engine.dispose()


async def test_database_outage_is_retried_without_committing(
    stack: Any,
    database_url: str,
    engine: AsyncEngine,
    consumer_engine: AsyncEngine,
    kafka_bootstrap: str,
) -> None:
    topic = f"test.promotions.outage.{uuid.uuid4().hex[:12]}"
    group = f"test-outage-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: 1, f"{topic}.dlq": 1})
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        await connection.execute(sa.text("UPDATE promotion_campaigns SET status = 'inactive'"))
        await connection.execute(
            sa.text(
                "INSERT INTO promotion_campaigns (name, start_date, end_date)"
                " VALUES ('outage', :start, :end)"
            ),
            {"start": now - timedelta(hours=1), "end": now + timedelta(days=1)},
        )
    await engine.dispose()  # its pooled connections would be terminated anyway

    registry = CollectorRegistry()
    metrics = PromotionsMetrics(registry)
    enrollment = FirstLoginEnrollment(bootstrap.unit_of_work_factory(consumer_engine), metrics)
    consumer = bootstrap.first_login_consumer(
        enrollment,
        metrics,
        bootstrap_servers=kafka_bootstrap,
        topic=topic,
        group_id=group,
        client_id="outage-test",
        retry_max_seconds=0.5,
    )
    admin: AIOKafkaAdminClient = await start_with_retry(
        lambda: AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap), timeout_seconds=30
    )
    database = make_url(database_url).database
    assert database is not None
    user_id = 4_200_000_000 + int(time.time()) % 1_000_000

    def retries() -> float:
        value = registry.get_sample_value(
            "cake_promotions_consumer_retries_total", {"kind": "transient"}
        )
        return value or 0.0

    async def committed() -> int | None:
        offsets = await admin.list_consumer_group_offsets(group)
        position = offsets.get(TopicPartition(topic, 0))
        return position.offset if position is not None else None

    set_connections_allowed(stack, database, False)
    try:
        consumer.start()
        producer = await start_with_retry(
            lambda: create_producer(kafka_bootstrap, "outage-test"), timeout_seconds=30
        )
        try:
            await producer.send_and_wait(
                topic, key=str(user_id).encode(), value=first_login(user_id)
            )
        finally:
            await producer.stop()

        async def retried_twice() -> bool:
            return retries() >= 2

        await wait_for(retried_twice, "the consumer to retry against the closed database")
        assert await committed() in (None, -1)
    finally:
        set_connections_allowed(stack, database, True)

    async def caught_up() -> bool:
        return await committed() == 1

    try:
        await wait_for(caught_up, "the event to be applied and committed")
    finally:
        await consumer.stop()
        await admin.close()

    assert (
        registry.get_sample_value("cake_promotions_consumed_events_total", {"result": "enrolled"})
        == 1
    )
    async with consumer_engine.connect() as connection:
        vouchers = await connection.scalar(
            sa.text("SELECT count(*) FROM vouchers WHERE user_id = :user"), {"user": user_id}
        )
    assert vouchers == 1
