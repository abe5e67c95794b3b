"""A consumer that keeps dying of a non-Kafka error is restarted with backoff and reported
degraded (its health component NOT_SERVING, the service still SERVING); top-ups work
meanwhile, and it consumes again once the fault is gone. Real Kafka, real PostgreSQL, the
real bank simulator; the fault is injected into the consumer's own loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from cake.promotions.v1 import promotions_pb2
from cake_common.consumer import EventConsumer
from cake_common.kafka import ensure_topics
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration


class InjectedBug(RuntimeError):
    pass


async def health_of(server: Any, name: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
    return int(answer.status)


async def wait_for(condition: Any, what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_failing_consumer_degrades_health_but_not_the_api(
    start_server: Any,
    signer: Any,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = f"test.promotions.isolation.{uuid.uuid4().hex[:12]}"
    await ensure_topics(kafka_bootstrap, {topic: 1, f"{topic}.dlq": 1})
    broken = True
    real_batch = EventConsumer._consume_batch

    async def failing_batch(self: EventConsumer, consumer: Any) -> None:
        if broken:
            raise InjectedBug("not a KafkaError")
        await real_batch(self, consumer)

    monkeypatch.setattr(EventConsumer, "_consume_batch", failing_batch)
    server = await start_server(
        consumer_enabled=True,
        kafka_bootstrap_servers=kafka_bootstrap,
        user_events_topic=topic,
        consumer_group=f"test-isolation-{uuid.uuid4().hex[:8]}",
        consumer_retry_max_seconds=1,
    )
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )

    async def restarted_twice() -> bool:
        restarts = server.registry.get_sample_value("cake_promotions_consumer_restarts_total")
        return bool(restarts and restarts >= 2)

    await wait_for(restarted_twice, "two consumer restarts")

    async def degraded() -> bool:
        return await health_of(server, "kafka_consumer") == not_serving

    await wait_for(degraded, "kafka_consumer NOT_SERVING")
    assert await health_of(server, "") == serving  # the service itself still serves
    receipt = await server.stub.Topup(
        promotions_pb2.TopupRequest(phone_number="+84901234567", amount=100),
        metadata=signer.metadata(4242),
    )
    assert receipt.success and receipt.message == "Top-up successful!"

    broken = False

    async def consuming() -> bool:
        return await health_of(server, "kafka_consumer") == serving

    await wait_for(consuming, "kafka_consumer SERVING again")
