"""The relay against real PostgreSQL and Kafka: volume, order, audit log, replicas, outages."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from cake.events.v1 import envelope_pb2
from cake_events.adapters.tables import published_events
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

PROMOTION_TYPES = ("PROMOTION_ENROLLMENT", "VOUCHER_ISSUED", "VOUCHER_USED")


async def audit_rows(engine: AsyncEngine, event_ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    statement = sa.select(published_events).where(published_events.c.event_id.in_(event_ids))
    async with engine.connect() as connection:
        rows = (await connection.execute(statement)).mappings().all()
    return {row["event_id"]: row for row in rows}


async def test_ten_thousand_events_of_500_aggregates_reach_kafka_in_order(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    running_relays: Any,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
    events_engine: AsyncEngine,
) -> None:
    promotions = make_source_db()
    rows = [
        kit.event_row(PROMOTION_TYPES[i % 3], user_id=1 + i % 500, sequence=i)
        for i in range(10_000)
    ]
    await kit.write_rows(promotions, rows)
    topic = topic_routes["VOUCHER_ISSUED"]

    async with running_relays(relay_settings(promotions=promotions)) as (_, registry):
        await kit.wait_until(
            lambda: kit.all_published(promotions, len(rows)), what="10,000 rows published"
        )
        published_metric = registry.get_sample_value(
            "cake_events_relay_published_total", {"source": "promotions", "topic": topic}
        )

    delivered = await kit.read_topics(kafka_bootstrap, [topic])
    # No crash, no outage: the idempotent producer delivers each event exactly once.
    assert sorted(delivered.event_ids()) == sorted(row.event_id for row in rows)
    assert published_metric == len(rows)
    by_aggregate = delivered.by_aggregate()
    assert len(by_aggregate) == 500
    assert by_aggregate == kit.ordered_by_aggregate(rows)

    # Envelope and headers follow the contract.
    record = delivered.records[0]
    envelope = envelope_pb2.EventEnvelope.FromString(record.value)
    headers = dict(record.headers)
    assert headers["ce_id"] == envelope.event_id.encode()
    assert headers["ce_type"] == envelope.type.encode()
    assert envelope.payload.type_url.endswith(
        kit.payload_for(envelope.type, 1, 0).DESCRIPTOR.full_name
    )

    # The audit log has every event, where Kafka put it.
    audit = await audit_rows(events_engine, [row.event_id for row in rows])
    assert len(audit) == len(rows)
    for record in delivered.records[:200]:
        line = audit[uuid.UUID(envelope_pb2.EventEnvelope.FromString(record.value).event_id)]
        assert (line["topic"], line["partition"], line["kafka_offset"]) == (
            record.topic,
            record.partition,
            record.offset,
        )
        assert line["source"] == "promotions"


async def test_two_replicas_keep_order_with_one_active_relay_per_source(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    running_relays: Any,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
) -> None:
    auth, promotions = make_source_db(), make_source_db()
    settings = relay_settings(auth=auth, promotions=promotions, relay_batch_size=100)
    waves, per_wave = 10, 300
    written: dict[str, list[Any]] = {"auth": [], "promotions": []}

    async def write_waves() -> None:
        for wave in range(waves):
            user_rows = [
                kit.event_row("USER_FIRST_LOGIN", user_id=1 + i % 50, sequence=i)
                for i in range(per_wave)
            ]
            promotion_rows = [
                kit.event_row(
                    PROMOTION_TYPES[i % 3], user_id=1 + i % 50, sequence=wave * per_wave + i
                )
                for i in range(per_wave)
            ]
            await kit.write_rows(auth, user_rows)
            await kit.write_rows(promotions, promotion_rows)
            written["auth"] += user_rows
            written["promotions"] += promotion_rows
            await asyncio.sleep(0.05)

    async with (
        running_relays(settings) as (first, first_metrics),
        running_relays(settings) as (second, second_metrics),
    ):
        replicas = [first.group, second.group]

        def active(source: str) -> list[int]:
            return [
                index
                for index, group in enumerate(replicas)
                for relay in group.relays
                if relay.source == source and relay.is_active
            ]

        most_active_at_once = 0

        async def watch() -> None:
            nonlocal most_active_at_once
            while True:
                most_active_at_once = max(most_active_at_once, *(len(active(s)) for s in written))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            await kit.wait_until(
                lambda: _true(all(len(active(s)) == 1 for s in written)), what="one active relay"
            )
            writer = asyncio.create_task(write_waves())
            await kit.wait_until(
                lambda: kit.all_published(promotions, 3 * per_wave), what="first waves published"
            )
            # The active promotions relay goes away mid-stream; the standby must take over.
            (leaving,) = active("promotions")
            await replicas[leaving].stop()
            await writer
            for source, database in (("auth", auth), ("promotions", promotions)):
                total = len(written[source])
                await kit.wait_until(
                    lambda db=database, n=total: kit.all_published(db, n),
                    what=f"all {source} rows published",
                )
        finally:
            watcher.cancel()

    assert most_active_at_once == 1
    registries = [first_metrics, second_metrics]
    promotion_topic = topic_routes["VOUCHER_ISSUED"]
    published_by_replica = [
        registry.get_sample_value(
            "cake_events_relay_published_total", {"source": "promotions", "topic": promotion_topic}
        )
        or 0
        for registry in registries
    ]
    assert published_by_replica[leaving] > 0
    assert published_by_replica[1 - leaving] > 0
    assert sum(published_by_replica) == waves * per_wave

    for source, topic in (
        ("auth", topic_routes["USER_FIRST_LOGIN"]),
        ("promotions", promotion_topic),
    ):
        delivered = await kit.read_topics(kafka_bootstrap, [topic])
        expected = kit.ordered_by_aggregate(written[source])
        assert {
            aggregate: kit.first_occurrences(ids)
            for aggregate, ids in delivered.by_aggregate().items()
        } == expected


async def _true(value: bool) -> bool:
    return value


async def test_published_rows_past_retention_are_deleted_but_stay_audited(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    running_relays: Any,
    events_engine: AsyncEngine,
) -> None:
    auth = make_source_db()
    rows = [kit.event_row("USER_FIRST_LOGIN", user_id=i) for i in range(1, 51)]
    settings = relay_settings(
        auth=auth, published_retention_seconds=0, retention_sweep_interval_seconds=0.1
    )
    async with running_relays(settings):
        await kit.write_rows(auth, rows)

        async def swept() -> bool:
            state = await kit.outbox_state(auth)
            return state == {"published": 0, "waiting": 0, "dead": 0, "attempts": 0}

        await kit.wait_until(swept, what="published rows to be deleted")
    assert len(await audit_rows(events_engine, [row.event_id for row in rows])) == len(rows)


async def test_audit_offsets_are_kafkas_and_order_holds_across_batch_boundaries(
    kit: Any,
    make_source_db: Any,
    relay_settings: Any,
    running_relays: Any,
    topic_routes: dict[str, str],
    kafka_bootstrap: str,
    events_engine: AsyncEngine,
) -> None:
    """Many events of few aggregates, in small producer batches (16 KiB, the smallest the
    settings allow) and several claims: each partition gets many batches, every event's
    offset in the audit log is the one a consumer reads it at (the batch's base offset plus
    its index), and each aggregate's events stay in outbox order across the batches."""
    promotions = make_source_db()
    rows = [kit.event_row("VOUCHER_ISSUED", user_id=1 + i % 6, sequence=i) for i in range(3_000)]
    await kit.write_rows(promotions, rows)
    topic = topic_routes["VOUCHER_ISSUED"]
    settings = relay_settings(
        promotions=promotions, relay_kafka_max_batch_bytes=16_384, relay_batch_size=700
    )

    async with running_relays(settings):
        await kit.wait_until(
            lambda: kit.all_published(promotions, len(rows)), what="3,000 rows published"
        )

    delivered = await kit.read_topics(kafka_bootstrap, [topic])
    assert sorted(delivered.event_ids()) == sorted(row.event_id for row in rows)
    bytes_per_partition: dict[int, int] = {}
    for record in delivered.records:
        bytes_per_partition[record.partition] = bytes_per_partition.get(record.partition, 0) + len(
            record.value
        )
    # Several 16 KiB batches per partition: the boundaries are crossed many times.
    assert min(bytes_per_partition.values()) > 4 * 16_384
    assert delivered.by_aggregate() == kit.ordered_by_aggregate(rows)

    audit = await audit_rows(events_engine, [row.event_id for row in rows])
    assert len(audit) == len(rows)
    read_at = {
        uuid.UUID(envelope_pb2.EventEnvelope.FromString(record.value).event_id): (
            record.topic,
            record.partition,
            record.offset,
        )
        for record in delivered.records
    }
    recorded_at = {
        event_id: (line["topic"], line["partition"], line["kafka_offset"])
        for event_id, line in audit.items()
    }
    assert recorded_at == read_at
