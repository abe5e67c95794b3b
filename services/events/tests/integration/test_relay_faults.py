"""Fault tests: the relay process killed mid-batch, and Kafka stopped while publishing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, TopicPartition
from cake_common.db import create_async_engine_for
from cake_common.inbox import inbox_table, record_once

pytestmark = pytest.mark.integration

CONSUMER = "relay-fault-test"


def start_relay_process(environment: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cake_events", "relay"],
        env={**os.environ, **environment},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def published_count(libpq_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(libpq_url) as conn:
        cursor = await conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def kill_mid_batch(
    process: subprocess.Popen[bytes],
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    libpq_url: str,
) -> tuple[int, int]:
    """SIGKILL the relay as soon as Kafka holds events its outbox does not show as published
    (acknowledged, not yet committed); returns (events on Kafka, rows marked published) once
    it is dead."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else b""
        assert time.monotonic() < deadline, "the relay never had a batch in flight"
        on_kafka = sum((await consumer.end_offsets(partitions)).values())
        if on_kafka > await published_count(libpq_url):
            process.send_signal(signal.SIGKILL)
            break
        await asyncio.sleep(0.002)
    await asyncio.to_thread(process.wait)
    # Produce requests the process wrote just before dying may still be appended: wait
    # until the end offsets stop moving.
    on_kafka = -1
    while True:
        settled = sum((await consumer.end_offsets(partitions)).values())
        if settled == on_kafka:
            return on_kafka, await published_count(libpq_url)
        on_kafka = settled
        await asyncio.sleep(0.5)


async def test_relay_killed_mid_batch_delivers_everything_at_least_once(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    auth = make_source_db()
    rows = [kit.event_row("USER_FIRST_LOGIN", user_id=1 + i % 300, sequence=i) for i in range(8000)]
    await kit.write_rows(auth, rows)
    settings = relay_settings(auth=auth, relay_batch_size=200)
    environment = kit.relay_environment(settings)
    topic = topic_routes["USER_FIRST_LOGIN"]
    partitions = [TopicPartition(topic, p) for p in range(6)]
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    expected_duplicates = 0
    kills = 0
    try:
        # A kill can land between two batches; kill again until one lands mid-batch.
        while kills < 5:
            process = start_relay_process(environment)
            on_kafka, marked = await kill_mid_batch(
                process, consumer, partitions, auth.owner_libpq_url
            )
            kills += 1
            # After the last kill, the final run publishes every unmarked row once more.
            expected_duplicates = on_kafka - marked
            if expected_duplicates > 0:
                break
        assert expected_duplicates > 0, "no kill landed while a batch was in flight"

        process = start_relay_process(environment)
        try:
            await kit.wait_until(lambda: kit.all_published(auth, len(rows)), what="all published")
        finally:
            process.send_signal(signal.SIGTERM)
            # Graceful stop: finish the batch, release the lock, close the producer, exit 0.
            assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        await consumer.stop()

    delivered = await kit.read_topics(kafka_bootstrap, [topic])
    event_ids = delivered.event_ids()
    assert set(event_ids) == {row.event_id for row in rows}, "an event was lost"
    duplicates = len(event_ids) - len(rows)
    # Exactly the events acknowledged by Kafka but not yet marked when the process died.
    assert duplicates == expected_duplicates
    print(f"\nkills={kills} events={len(rows)} duplicates={duplicates}")

    # A consumer with an inbox applies each event once, in per-aggregate order.
    inbox_db = make_source_db()
    engine = create_async_engine_for(inbox_db.owner_url, pool_size=1)
    try:
        async with engine.begin() as connection:
            metadata = sa.MetaData()
            inbox_table(metadata)
            await connection.run_sync(metadata.create_all)
        applied: list[Any] = []
        skipped = 0
        ordered = sorted(delivered.records, key=lambda r: (r.partition, r.offset))
        for start in range(0, len(ordered), 1000):
            async with engine.begin() as connection:
                for record, event_id in zip(
                    ordered[start : start + 1000],
                    kit.Delivered(ordered[start : start + 1000]).event_ids(),
                    strict=True,
                ):
                    if await record_once(connection, event_id, CONSUMER):
                        applied.append((record.key, event_id))
                    else:
                        skipped += 1
    finally:
        await engine.dispose()
    assert skipped == duplicates
    assert len(applied) == len(rows)
    seen_by_user: dict[bytes, list[Any]] = {}
    for key, event_id in applied:
        seen_by_user.setdefault(key, []).append(event_id)
    assert {key.decode(): ids for key, ids in seen_by_user.items()} == kit.ordered_by_aggregate(
        rows
    )


async def test_kafka_outage_holds_rows_back_without_losing_or_failing_any(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    running_relays: Any,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
    stack: Any,
) -> None:
    auth = make_source_db()
    before = [
        kit.event_row("USER_FIRST_LOGIN", user_id=1 + i % 100, sequence=i) for i in range(3000)
    ]
    during = [
        kit.event_row("USER_FIRST_LOGIN", user_id=1 + i % 100, sequence=i) for i in range(1000)
    ]
    settings = relay_settings(auth=auth, relay_batch_size=100, relay_kafka_timeout_seconds=3)
    async with running_relays(settings) as (_, registry):
        await kit.write_rows(auth, before)
        await kit.wait_until(lambda: kit.all_published(auth, 500), what="publishing under way")
        try:
            await asyncio.to_thread(stack.stop, "kafka")
            await kit.write_rows(auth, during)

            async def outage_noticed() -> bool:
                value = registry.get_sample_value(
                    "cake_events_relay_kafka_unavailable_total", {"source": "auth"}
                )
                return bool(value)

            await kit.wait_until(outage_noticed, what="the relay to notice the outage")

            async def lag_reported() -> bool:
                backlog = registry.get_sample_value(
                    "cake_events_outbox_backlog", {"source": "auth"}
                )
                lag = registry.get_sample_value(
                    "cake_events_outbox_lag_seconds", {"source": "auth"}
                )
                return bool(backlog) and bool(lag)

            await kit.wait_until(lag_reported, what="backlog and lag gauges")
            state = await kit.outbox_state(auth)
            assert state["waiting"] > 0
            # Broker outages are not the events' fault: no attempt counted, nothing parked.
            assert state["attempts"] == 0
            assert state["dead"] == 0
        finally:
            await asyncio.to_thread(stack.start, "kafka")
        rows = before + during
        await kit.wait_until(
            lambda: kit.all_published(auth, len(rows)), within=120, what="delivery to resume"
        )

    state = await kit.outbox_state(auth)
    assert state == {"published": len(rows), "waiting": 0, "dead": 0, "attempts": 0}
    delivered = await kit.read_topics(kafka_bootstrap, [topic_routes["USER_FIRST_LOGIN"]])
    assert set(delivered.event_ids()) == {row.event_id for row in rows}, "an event was lost"
    assert {
        aggregate: kit.first_occurrences(ids) for aggregate, ids in delivered.by_aggregate().items()
    } == kit.ordered_by_aggregate(rows)


async def test_relay_recovers_when_its_database_session_is_killed(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    running_relays: Any,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    auth = make_source_db()
    rows = [kit.event_row("USER_FIRST_LOGIN", user_id=1 + i % 100, sequence=i) for i in range(6000)]
    async with running_relays(relay_settings(auth=auth, relay_batch_size=200)) as (wiring, _):
        await kit.write_rows(auth, rows)
        await kit.wait_until(lambda: kit.all_published(auth, 1000), what="publishing under way")
        # The leader's session dies (a Postgres restart or failover looks like this to it):
        # its lock, LISTEN and open transaction go; it must reconnect and lead again.
        async with await psycopg.AsyncConnection.connect(auth.owner_libpq_url) as conn:
            cursor = await conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                ("cake-events-relay-auth",),
            )
            row = await cursor.fetchone()
        assert row is not None and row[0] == 1
        await kit.wait_until(lambda: kit.all_published(auth, len(rows)), what="all published")
        assert wiring.group.relays[0].is_active

    delivered = await kit.read_topics(kafka_bootstrap, [topic_routes["USER_FIRST_LOGIN"]])
    assert set(delivered.event_ids()) == {row.event_id for row in rows}, "an event was lost"
    assert {
        aggregate: kit.first_occurrences(ids) for aggregate, ids in delivered.by_aggregate().items()
    } == kit.ordered_by_aggregate(rows)
