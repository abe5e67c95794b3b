"""Outbox writes + NOTIFY and inbox deduplication against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa
from cake.events.v1 import payloads_pb2, registry
from cake_common.db import UnitOfWork, create_async_engine_for, create_session_factory, libpq_url
from cake_common.inbox import inbox_table, record_once
from cake_common.outbox import OUTBOX_NOTIFY_CHANNEL, OutboxWriter, outbox_table
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

metadata = sa.MetaData()
outbox = outbox_table(metadata)
inbox = inbox_table(metadata)


@pytest.fixture(scope="module")
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine_for(postgres_url, pool_size=12)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
async def listener(postgres_url: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    connection = await psycopg.AsyncConnection.connect(libpq_url(postgres_url), autocommit=True)
    await connection.execute(f"LISTEN {OUTBOX_NOTIFY_CHANNEL}")
    yield connection
    await connection.close()


async def _next_notification(
    connection: psycopg.AsyncConnection[tuple[object, ...]], wait_seconds: float
) -> psycopg.Notify | None:
    async for notify in connection.notifies(timeout=wait_seconds, stop_after=1):
        return notify
    return None


async def test_outbox_row_and_notify_on_commit(
    engine: AsyncEngine, listener: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    writer = OutboxWriter()
    occurred = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    payload = payloads_pb2.UserFirstLogin(user_id=42, user_agent="ua")
    async with UnitOfWork(create_session_factory(engine)) as uow:
        event_id = await writer.add(
            uow.session,
            registry.USER_FIRST_LOGIN,
            aggregate_id=42,
            payload=payload,
            occurred_at=occurred,
            trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        # Nothing is delivered before commit.
        assert await _next_notification(listener, wait_seconds=0.3) is None
        await uow.commit()

    notify = await _next_notification(listener, wait_seconds=5)
    assert notify is not None
    assert notify.channel == OUTBOX_NOTIFY_CHANNEL
    database = sa.engine.make_url(str(engine.url)).database
    assert notify.payload == database

    async with engine.connect() as connection:
        row = (
            await connection.execute(sa.select(outbox).where(outbox.c.event_id == event_id))
        ).one()
    assert row.event_type == "USER_FIRST_LOGIN"
    assert row.aggregate_type == "user"
    assert row.aggregate_id == "42"
    assert payloads_pb2.UserFirstLogin.FromString(row.payload) == payload
    assert row.payload_type == "cake.events.v1.UserFirstLogin"
    assert row.occurred_at == occurred
    assert row.trace_parent.startswith("00-")
    assert row.published_at is None and row.dead_lettered_at is None
    assert row.attempts == 0
    assert row.created_at is not None


async def test_rollback_writes_nothing_and_notifies_nothing(
    engine: AsyncEngine, listener: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    async with UnitOfWork(create_session_factory(engine)) as uow:
        event_id = await OutboxWriter().add(
            uow.session,
            registry.VOUCHER_ISSUED,
            aggregate_id="7",
            payload=payloads_pb2.VoucherIssued(voucher_id=1),
            occurred_at=datetime.now(UTC),
        )
    assert await _next_notification(listener, wait_seconds=0.5) is None
    async with engine.connect() as connection:
        count = await connection.scalar(
            sa.select(sa.func.count()).where(outbox.c.event_id == event_id)
        )
    assert count == 0


async def test_ids_follow_commit_order_and_event_ids_unique(engine: AsyncEngine) -> None:
    writer = OutboxWriter()
    given = uuid.uuid4()
    async with engine.begin() as connection:
        for index in range(3):
            await writer.add(
                connection,
                registry.USER_FIRST_LOGIN,
                aggregate_id=index,
                payload=payloads_pb2.UserFirstLogin(user_id=index + 1),
                occurred_at=datetime.now(UTC),
                event_id=given if index == 0 else None,
            )
    with pytest.raises(sa.exc.IntegrityError):
        async with engine.begin() as connection:
            await writer.add(
                connection,
                registry.USER_FIRST_LOGIN,
                aggregate_id=0,
                payload=payloads_pb2.UserFirstLogin(),
                occurred_at=datetime.now(UTC),
                event_id=given,
            )


async def test_naive_occurred_at_rejected(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        with pytest.raises(ValueError, match="timezone"):
            await OutboxWriter().add(
                connection,
                registry.USER_FIRST_LOGIN,
                aggregate_id=1,
                payload=payloads_pb2.UserFirstLogin(),
                occurred_at=datetime(2026, 1, 1),
            )


async def test_partial_index_exists(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        definition = await connection.scalar(
            sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_outbox_unpublished'")
        )
    assert definition is not None
    assert "WHERE (published_at IS NULL)" in definition


async def test_record_once_first_time_only(engine: AsyncEngine) -> None:
    event_id = uuid.uuid4()
    async with engine.begin() as connection:
        assert await record_once(connection, event_id, "promotions") is True
        assert await record_once(connection, event_id, "promotions") is False
        assert await record_once(connection, event_id, "another-consumer") is True


async def test_record_once_rolled_back_can_be_recorded_again(engine: AsyncEngine) -> None:
    event_id = uuid.uuid4()
    async with UnitOfWork(create_session_factory(engine)) as uow:
        assert await record_once(uow.session, event_id, "promotions") is True
        # no commit: the effect failed, so the event must be processed again
    async with UnitOfWork(create_session_factory(engine)) as uow:
        assert await record_once(uow.session, event_id, "promotions") is True
        await uow.commit()


async def test_record_once_concurrent_exactly_one_winner(engine: AsyncEngine) -> None:
    event_id = uuid.uuid4()
    start = asyncio.Event()

    async def consume() -> bool:
        async with engine.connect() as connection:
            await start.wait()
            async with connection.begin():
                first = await record_once(connection, event_id, "promotions")
                await asyncio.sleep(0.05)  # hold the row lock like a real effect would
                return first

    tasks = [asyncio.create_task(consume()) for _ in range(10)]
    await asyncio.sleep(0.1)
    start.set()
    results = await asyncio.gather(*tasks)
    assert results.count(True) == 1


async def test_record_once_waits_for_and_respects_concurrent_rollback(engine: AsyncEngine) -> None:
    event_id = uuid.uuid4()
    async with engine.connect() as first, engine.connect() as second:
        await first.begin()
        assert await record_once(first, event_id, "promotions") is True
        await second.begin()
        blocked = asyncio.create_task(record_once(second, event_id, "promotions"))
        await asyncio.sleep(0.2)
        assert not blocked.done(), "second transaction waits on the first's key"
        await first.rollback()
        assert await blocked is True
        await second.commit()
