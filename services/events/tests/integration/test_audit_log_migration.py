"""Migration 0003 against real PostgreSQL: the per-event audit table becomes per-batch rows
behind a view with the old columns, without losing a line, and back again."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from cake_common.db import create_async_engine_for, create_session_factory
from cake_common.migrations import run_alembic_downgrade, run_alembic_upgrade
from cake_events.adapters.tables import published_batches, published_events
from cake_events.adapters.unit_of_work import SqlEventsUnitOfWork
from cake_events.bootstrap import MIGRATIONS
from cake_events.domain.delivery import PublishedBatch

pytestmark = pytest.mark.integration

LINE_COLUMNS = (
    "event_id",
    "source",
    "event_type",
    "aggregate_id",
    "topic",
    "partition",
    "kafka_offset",
    "published_at",
)


def old_line(source: str, offset: int, published_at: datetime) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4(),
        "source": source,
        "event_type": "USER_FIRST_LOGIN" if source == "auth" else "VOUCHER_USED",
        "aggregate_id": str(offset % 7),
        "topic": f"cake.{source}.v1",
        "partition": offset % 3,
        "kafka_offset": offset,
        "published_at": published_at,
    }


async def audit_lines(url: str) -> list[dict[str, Any]]:
    engine = create_async_engine_for(url, pool_size=1)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                sa.text(f"SELECT {', '.join(LINE_COLUMNS)} FROM published_events")
            )
            return sorted(
                (dict(row) for row in rows.mappings()), key=lambda line: line["kafka_offset"]
            )
    finally:
        await engine.dispose()


async def test_lines_survive_the_move_to_batches_and_back(postgres_url: str) -> None:
    await asyncio.to_thread(run_alembic_upgrade, postgres_url, MIGRATIONS, revision="0002")
    first_batch_at = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    before = [
        old_line("auth", 0, first_batch_at),
        old_line("auth", 1, first_batch_at),
        old_line("auth", 2, first_batch_at),
        old_line("promotions", 3, first_batch_at),
        old_line("auth", 4, first_batch_at + timedelta(seconds=1)),
    ]
    # Event ids in the reverse of publication order: the migration must not sort by them.
    for position, line in enumerate(before[:3]):
        line["event_id"] = uuid.UUID(int=3 - position)
    engine = create_async_engine_for(postgres_url, pool_size=1)
    old_table = sa.table("published_events", *(sa.column(name) for name in LINE_COLUMNS))
    async with engine.begin() as connection:
        await connection.execute(sa.insert(old_table), before)
    await engine.dispose()

    await asyncio.to_thread(run_alembic_upgrade, postgres_url, MIGRATIONS)

    assert await audit_lines(postgres_url) == before
    engine = create_async_engine_for(postgres_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            batches = (
                await connection.execute(
                    sa.select(
                        published_batches.c.source,
                        published_batches.c.published_at,
                        published_batches.c.event_count,
                    ).order_by(published_batches.c.published_at, published_batches.c.source)
                )
            ).all()
        assert [tuple(batch) for batch in batches] == [
            ("auth", first_batch_at, 3),
            ("promotions", first_batch_at, 1),
            ("auth", first_batch_at + timedelta(seconds=1), 1),
        ]
        # A migrated batch keeps its lines in publication order (per partition, by offset),
        # and its six arrays stay parallel.
        async with engine.connect() as connection:
            lines = (
                await connection.execute(
                    sa.select(published_batches.c.lines).where(
                        published_batches.c.source == "auth",
                        published_batches.c.published_at == first_batch_at,
                    )
                )
            ).scalar_one()
        assert lines["kafka_offset"] == [0, 1, 2]
        assert lines["event_id"] == [str(line["event_id"]) for line in before[:3]]
        assert lines["partition"] == [line["partition"] for line in before[:3]]

        # The relay's way in: one row per batch; an event published again gets a new line.
        again = before[0]
        async with SqlEventsUnitOfWork(create_session_factory(engine)) as uow:
            await uow.published.record(
                PublishedBatch(
                    "auth",
                    event_ids=[str(again["event_id"])],
                    event_types=[again["event_type"]],
                    aggregate_ids=[again["aggregate_id"]],
                    topics=[again["topic"]],
                    partitions=[2],
                    offsets=[99],
                )
            )
            await uow.commit()
            assert await uow.published.count_by_source() == {"auth": 5, "promotions": 1}
        async with engine.connect() as connection:
            republished = (
                await connection.execute(
                    sa.select(published_events).where(
                        published_events.c.event_id == again["event_id"]
                    )
                )
            ).all()
        assert sorted((line.partition, line.kafka_offset) for line in republished) == [
            (again["partition"], again["kafka_offset"]),
            (2, 99),
        ]
    finally:
        await engine.dispose()

    # Back to one row per event: the old table kept each event's first publication.
    await asyncio.to_thread(run_alembic_downgrade, postgres_url, MIGRATIONS, "0002")
    assert await audit_lines(postgres_url) == before
