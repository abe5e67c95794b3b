"""Kafka helpers: pure parts here, broker round trips in the integration tests below."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from cake_common import kafka as kafka_module
from cake_common.kafka import (
    create_consumer,
    create_producer,
    ensure_topics,
    kafka_headers,
    start_with_retry,
)


def test_kafka_headers() -> None:
    event_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert kafka_headers(event_id, "USER_FIRST_LOGIN", "00-abc-def-01") == [
        ("ce_id", b"12345678-1234-5678-1234-567812345678"),
        ("ce_type", b"USER_FIRST_LOGIN"),
        ("traceparent", b"00-abc-def-01"),
    ]
    assert kafka_headers(event_id, "T", None) == [
        ("ce_id", str(event_id).encode()),
        ("ce_type", b"T"),
    ]


class Recorder:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


def test_producer_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_module, "AIOKafkaProducer", Recorder)
    producer: Any = create_producer("broker:9092", "cake-relay", linger_ms=0)
    assert producer.kwargs == {
        "bootstrap_servers": "broker:9092",
        "client_id": "cake-relay",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 0,
    }


def test_consumer_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", Recorder)
    consumer: Any = create_consumer("broker:9092", ["t1", "t2"], "promotions", "cake-promotions")
    assert consumer.args == ("t1", "t2")
    assert consumer.kwargs == {
        "bootstrap_servers": "broker:9092",
        "group_id": "promotions",
        "client_id": "cake-promotions",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }


async def test_start_with_retry_gives_up_on_unreachable_broker() -> None:
    created: list[Any] = []

    def factory() -> AIOKafkaAdminClient:
        client = AIOKafkaAdminClient(bootstrap_servers="127.0.0.1:1", request_timeout_ms=200)
        created.append(client)
        return client

    with pytest.raises(KafkaConnectionError):
        await start_with_retry(factory, timeout_seconds=0.5)
    assert len(created) >= 2, "retried with a fresh client each time"


@pytest.mark.integration
async def test_ensure_topics_is_idempotent(kafka_bootstrap: str) -> None:
    suffix = secrets.token_hex(4)
    topics = {f"cake.test.{suffix}.a": 3, f"cake.test.{suffix}.a.dlq": 1}
    await ensure_topics(kafka_bootstrap, topics)
    await ensure_topics(kafka_bootstrap, topics)  # second run: nothing to do, no error
    # Concurrent replicas racing to create the same topics both succeed.
    other = {f"cake.test.{suffix}.b": 2}
    await asyncio.gather(
        ensure_topics(kafka_bootstrap, other), ensure_topics(kafka_bootstrap, other)
    )

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    partitions = {topic["topic"]: len(topic["partitions"]) for topic in described}
    assert partitions == topics


@pytest.mark.integration
async def test_produce_and_consume_with_headers_and_manual_commit(kafka_bootstrap: str) -> None:
    topic = f"cake.test.{secrets.token_hex(4)}"
    group = f"cake-test-{secrets.token_hex(4)}"
    await ensure_topics(kafka_bootstrap, {topic: 2})

    producer = await start_with_retry(
        lambda: create_producer(kafka_bootstrap, "cake-test-producer"), timeout_seconds=30
    )
    event_ids = [uuid.uuid4() for _ in range(3)]
    try:
        for index, event_id in enumerate(event_ids):
            await producer.send_and_wait(
                topic,
                value=f"payload-{index}".encode(),
                key=b"user-42",
                headers=kafka_headers(event_id, "USER_FIRST_LOGIN", None),
            )
    finally:
        await producer.stop()

    async def consume(expected: int) -> list[Any]:
        consumer = await start_with_retry(
            lambda: create_consumer(kafka_bootstrap, [topic], group, "cake-test-consumer"),
            timeout_seconds=30,
        )
        received: list[Any] = []
        try:
            async with asyncio.timeout(30):
                while len(received) < expected:
                    batch = await consumer.getmany(timeout_ms=500)
                    for records in batch.values():
                        received.extend(records)
            if expected:
                await consumer.commit()
            else:
                extra = await consumer.getmany(timeout_ms=2000)
                received.extend(record for records in extra.values() for record in records)
        finally:
            await consumer.stop()
        return received

    records = await consume(3)
    # Same key ⇒ same partition ⇒ order preserved.
    assert [record.value for record in records] == [b"payload-0", b"payload-1", b"payload-2"]
    assert [dict(record.headers)["ce_id"] for record in records] == [
        str(event_id).encode() for event_id in event_ids
    ]
    assert {record.partition for record in records} == {records[0].partition}
    # After the manual commit, the same group resumes past everything it processed.
    assert await consume(0) == []
