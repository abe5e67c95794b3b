"""The race that matters most: a burst of first logins consumed by TWO consumer processes.

1,000 USER_FIRST_LOGIN events for distinct users, plus 100 exact redeliveries (same event id)
and 100 repeated first logins of the same users (new event ids), plus three poison messages,
are published to a fresh 6-partition topic consumed by two ``cake-promotions consume``
processes of one group against one real PostgreSQL database. Exactly ``max_participants``
vouchers must come out, with participation orders 1..max each exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from cake.events.v1 import envelope_pb2, payloads_pb2
from cake_common.kafka import create_producer, ensure_topics, kafka_headers, start_with_retry
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

USERS = 1000
MAX_PARTICIPANTS = 100
REDELIVERED = 100
RELOGGED = 100
PARTITIONS = 6
POISON = (b"not protobuf \xff\xff", b"", b"\x0a\x03abc")


def first_login(user_id: int, login_at: datetime, event_id: str | None = None) -> tuple[str, bytes]:
    stamp = Timestamp()
    stamp.FromDatetime(login_at)
    payload = AnyMessage()
    payload.Pack(payloads_pb2.UserFirstLogin(user_id=user_id, login_at=stamp))
    event_id = event_id or str(uuid.uuid4())
    envelope = envelope_pb2.EventEnvelope(
        event_id=event_id,
        type="USER_FIRST_LOGIN",
        occurred_at=stamp,
        aggregate_type="user",
        aggregate_id=str(user_id),
        payload=payload,
    )
    return event_id, envelope.SerializeToString()


@pytest.fixture
async def topic(kafka_bootstrap: str) -> str:
    name = f"test.promotions.users.{uuid.uuid4().hex[:12]}"
    await ensure_topics(kafka_bootstrap, {name: PARTITIONS, f"{name}.dlq": 1})
    return name


@pytest.fixture
def consumers(
    database_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]], list[Path]]]:
    """Two ``cake-promotions consume`` processes in one fresh consumer group."""
    group = f"test-promotions-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CAKE_PROMOTIONS_DATABASE_URL": database_url,
        "CAKE_PROMOTIONS_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CAKE_PROMOTIONS_USER_EVENTS_TOPIC": topic,
        "CAKE_PROMOTIONS_CONSUMER_GROUP": group,
        "CAKE_PROMOTIONS_DATABASE_POOL_SIZE": "5",
        "CAKE_PROMOTIONS_LOG_LEVEL": "INFO",
        # Two processes on one machine: a fixed metrics port (a dev stack's, inherited from
        # the environment) would let only one of them start.
        "CAKE_PROMOTIONS_METRICS_PORT": "0",
    }
    processes: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"consumer-{index}.log" for index in range(2)]
    for log in logs:
        with log.open("wb") as output:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cake_promotions", "consume"],
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            )
    yield group, processes, logs
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
async def admin(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    client: AIOKafkaAdminClient = await start_with_retry(
        lambda: AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap), timeout_seconds=30
    )
    yield client
    await client.close()


async def group_members(admin: AIOKafkaAdminClient, group: str) -> tuple[str, int]:
    """The group's state and member count (``("", 0)`` while its coordinator is unknown)."""
    try:
        (response,) = await admin.describe_consumer_groups([group])
    except KafkaError:
        return "", 0
    (description,) = response.to_object()["groups"]
    return description["state"], len(description["members"])


async def wait_until(condition: Any, what: str, logs: list[Path], within: float = 90) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.5)
    tails = "\n".join(log.read_text()[-3000:] for log in logs)
    raise AssertionError(f"timed out waiting for {what}; consumer logs:\n{tails}")


async def end_offsets(kafka_bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, partition) for partition in range(PARTITIONS)]
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def dead_letter_origins(kafka_bootstrap: str, dlq_topic: str) -> set[str]:
    consumer = AIOKafkaConsumer(
        dlq_topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    origins: set[str] = set()
    try:
        batches = await consumer.getmany(timeout_ms=5000)
        for records in batches.values():
            for record in records:
                headers = dict(record.headers)
                assert headers["cake_dead_letter_reason"]
                origins.add(headers["cake_dead_letter_origin"].decode())
    finally:
        await consumer.stop()
    return origins


async def test_two_consumer_processes_issue_exactly_max_vouchers(
    engine: AsyncEngine,
    kafka_bootstrap: str,
    topic: str,
    consumers: tuple[str, list[subprocess.Popen[bytes]], list[Path]],
    admin: AIOKafkaAdminClient,
) -> None:
    group, processes, logs = consumers
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        await connection.execute(sa.text("UPDATE promotion_campaigns SET status = 'inactive'"))
        campaign_id = await connection.scalar(
            sa.text(
                "INSERT INTO promotion_campaigns (name, start_date, end_date, max_participants)"
                " VALUES ('race', :start, :end, :max) RETURNING id"
            ),
            {
                "start": now - timedelta(hours=1),
                "end": now + timedelta(days=1),
                "max": MAX_PARTICIPANTS,
            },
        )

    async def both_joined() -> bool:
        return await group_members(admin, group) == ("Stable", 2)

    await wait_until(both_joined, "both consumers to join the group", logs, within=60)

    base = random.randrange(10**9, 2 * 10**9)
    users = [base + index for index in range(USERS)]
    events = [(user, *first_login(user, now)) for user in users]
    messages = [(user, body) for user, _, body in events]
    # The same event delivered again, and the same users logging in "first" again.
    messages += [(user, body) for user, _, body in random.sample(events, REDELIVERED)]
    messages += [(user, first_login(user, now)[1]) for user in random.sample(users, RELOGGED)]
    random.shuffle(messages)

    producer = await start_with_retry(
        lambda: create_producer(kafka_bootstrap, "race-test"), timeout_seconds=30
    )
    try:
        sent = [
            await producer.send(
                topic,
                key=str(user).encode(),
                value=body,
                headers=kafka_headers(uuid.uuid4(), "USER_FIRST_LOGIN"),
            )
            for user, body in messages
        ]
        poison = [await producer.send(topic, key=b"poison", value=body) for body in POISON]
        await producer.flush()
        poison_records = [await future for future in poison]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    ends = await end_offsets(kafka_bootstrap, topic)
    assert sum(ends.values()) == len(messages) + len(POISON)

    async def all_committed() -> bool:
        committed = await admin.list_consumer_group_offsets(group)
        return all(
            tp in committed and committed[tp].offset >= end for tp, end in ends.items() if end
        )

    await wait_until(all_committed, "the group to commit every offset", logs)
    assert all(process.poll() is None for process in processes), "a consumer died"
    assert await group_members(admin, group) == ("Stable", 2)

    for process in processes:
        process.send_signal(signal.SIGTERM)
    assert [process.wait(timeout=30) for process in processes] == [0, 0]

    async with engine.connect() as connection:
        campaign = (
            await connection.execute(
                sa.text(
                    "SELECT current_participants, status FROM promotion_campaigns WHERE id = :id"
                ),
                {"id": campaign_id},
            )
        ).one()
        orders = (
            await connection.execute(
                sa.text(
                    "SELECT participation_order FROM user_promotions WHERE campaign_id = :id"
                    " ORDER BY participation_order"
                ),
                {"id": campaign_id},
            )
        ).scalars()
        voucher_users = (
            await connection.execute(
                sa.text(
                    "SELECT v.user_id FROM vouchers v JOIN user_promotions p"
                    " ON p.id = v.user_promotion_id WHERE p.campaign_id = :id"
                ),
                {"id": campaign_id},
            )
        ).scalars()
        voucher_user_list = list(voucher_users)
        order_list = list(orders)
        inbox = await connection.scalar(sa.text("SELECT count(*) FROM inbox"))
        outbox: dict[str, int] = dict(
            (
                await connection.execute(
                    sa.text(
                        "SELECT event_type, count(*) FROM outbox WHERE aggregate_id = ANY(:users)"
                        " GROUP BY event_type"
                    ),
                    {"users": [str(user) for user in users]},
                )
            ).all()
        )

    assert tuple(campaign) == (MAX_PARTICIPANTS, "full")
    assert order_list == list(range(1, MAX_PARTICIPANTS + 1))
    assert len(voucher_user_list) == MAX_PARTICIPANTS
    assert len(set(voucher_user_list)) == MAX_PARTICIPANTS
    assert set(voucher_user_list) <= set(users)
    # Every distinct event applied exactly once: redeliveries never reached the inbox twice.
    assert inbox == USERS + RELOGGED
    assert outbox == {"PROMOTION_ENROLLMENT": MAX_PARTICIPANTS, "VOUCHER_ISSUED": MAX_PARTICIPANTS}

    origins = await dead_letter_origins(kafka_bootstrap, f"{topic}.dlq")
    assert origins == {
        f"{record.topic}/{record.partition}/{record.offset}" for record in poison_records
    }


async def test_fewer_racers_than_places_all_enroll_and_nobody_is_told_full(
    engine: AsyncEngine,
    kafka_bootstrap: str,
    topic: str,
    consumers: tuple[str, list[subprocess.Popen[bytes]], list[Path]],
    admin: AIOKafkaAdminClient,
) -> None:
    """50 first logins at once, 100 places, two consumer processes: 50 vouchers, orders
    1..50, every decision "enrolled" and the campaign still active with 50 places left."""
    racers, places = 50, 100
    group, processes, logs = consumers
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        await connection.execute(sa.text("UPDATE promotion_campaigns SET status = 'inactive'"))
        campaign_id = await connection.scalar(
            sa.text(
                "INSERT INTO promotion_campaigns (name, start_date, end_date, max_participants)"
                " VALUES ('fewer racers', :start, :end, :max) RETURNING id"
            ),
            {"start": now - timedelta(hours=1), "end": now + timedelta(days=1), "max": places},
        )

    async def both_joined() -> bool:
        return await group_members(admin, group) == ("Stable", 2)

    await wait_until(both_joined, "both consumers to join the group", logs, within=60)

    base = random.randrange(2 * 10**9, 3 * 10**9)
    users = [base + index for index in range(racers)]
    producer = await start_with_retry(
        lambda: create_producer(kafka_bootstrap, "race-test"), timeout_seconds=30
    )
    try:
        sent = []
        for user in users:
            event_id, body = first_login(user, now)
            sent.append(
                await producer.send(
                    topic,
                    key=str(user).encode(),
                    value=body,
                    headers=kafka_headers(event_id, "USER_FIRST_LOGIN"),
                )
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    async def all_decided() -> bool:
        async with engine.connect() as connection:
            decided = await connection.scalar(
                sa.text("SELECT count(*) FROM first_login_decisions WHERE user_id = ANY(:u)"),
                {"u": users},
            )
        return decided == racers

    await wait_until(all_decided, "every first login to be decided", logs)
    assert all(process.poll() is None for process in processes), "a consumer died"

    async with engine.connect() as connection:
        campaign = (
            await connection.execute(
                sa.text(
                    "SELECT current_participants, status FROM promotion_campaigns WHERE id = :id"
                ),
                {"id": campaign_id},
            )
        ).one()
        orders = list(
            (
                await connection.execute(
                    sa.text(
                        "SELECT participation_order FROM user_promotions WHERE campaign_id = :id"
                        " ORDER BY participation_order"
                    ),
                    {"id": campaign_id},
                )
            ).scalars()
        )
        holders = list(
            (
                await connection.execute(
                    sa.text(
                        "SELECT v.user_id FROM vouchers v JOIN user_promotions p"
                        " ON p.id = v.user_promotion_id WHERE p.campaign_id = :id"
                    ),
                    {"id": campaign_id},
                )
            ).scalars()
        )
        results = dict(
            (
                await connection.execute(
                    sa.text(
                        "SELECT result, count(*) FROM first_login_decisions"
                        " WHERE user_id = ANY(:u) GROUP BY result"
                    ),
                    {"u": users},
                )
            ).all()
        )

    assert tuple(campaign) == (racers, "active")
    assert orders == list(range(1, racers + 1))
    assert sorted(holders) == users
    assert results == {"enrolled": racers}  # nobody was told "Campaign is full"
