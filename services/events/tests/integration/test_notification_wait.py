"""The leader session's wait for outbox notifications, on a real PostgreSQL: a NOTIFY ends a
long wait at once, one sent while nobody waited (during a batch) ends the next wait at once,
a quiet wait lasts its timeout, and the session stays usable for claims afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from cake_common.db import create_async_engine_for
from cake_common.outbox import OUTBOX_NOTIFY_CHANNEL
from cake_events.adapters.outbox_source import LeaderConnection, acquire_leadership

pytestmark = pytest.mark.integration


@pytest.fixture
async def waiting_leader(
    make_source_db: Callable[[], Any],
) -> AsyncIterator[tuple[LeaderConnection, psycopg.AsyncConnection[Any]]]:
    source = make_source_db()
    engine = create_async_engine_for(source.relay_url, pool_size=1)
    leader = await acquire_leadership(engine, retry_seconds=1, stop=asyncio.Event())
    assert leader is not None
    writer = await psycopg.AsyncConnection.connect(source.owner_libpq_url, autocommit=True)
    try:
        await leader.listen()
        yield leader, writer
    finally:
        await writer.close()
        await leader.close()
        await engine.dispose()


async def notify(writer: psycopg.AsyncConnection[Any]) -> None:
    await writer.execute(f"SELECT pg_notify('{OUTBOX_NOTIFY_CHANNEL}', 'test')")


async def test_a_notification_ends_a_long_wait_at_once(
    waiting_leader: tuple[LeaderConnection, psycopg.AsyncConnection[Any]],
) -> None:
    leader, writer = waiting_leader
    started = time.monotonic()
    waiting = asyncio.create_task(leader.wait_for_notification(30))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await notify(writer)
    assert await asyncio.wait_for(waiting, 5) is True
    assert time.monotonic() - started < 3


async def test_a_notification_sent_while_nobody_waited_ends_the_next_wait_at_once(
    waiting_leader: tuple[LeaderConnection, psycopg.AsyncConnection[Any]],
) -> None:
    leader, writer = waiting_leader
    await notify(writer)
    await notify(writer)
    # A statement on the session meanwhile (a batch): psycopg buffers what it reads.
    async with leader.transaction():
        await leader.claim(10, exclude_ids=(), guard_retries=True)
    started = time.monotonic()
    assert await leader.wait_for_notification(30) is True
    assert time.monotonic() - started < 3
    # Both were consumed by that wait: the next one is quiet.
    assert await leader.wait_for_notification(0.2) is False


async def test_a_quiet_wait_lasts_its_timeout_and_leaves_the_session_usable(
    waiting_leader: tuple[LeaderConnection, psycopg.AsyncConnection[Any]],
) -> None:
    leader, _ = waiting_leader
    started = time.monotonic()
    assert await leader.wait_for_notification(0.5) is False
    assert time.monotonic() - started >= 0.45
    async with leader.transaction():
        assert await leader.claim(10, exclude_ids=(), guard_retries=True) == []


async def test_a_cancelled_wait_leaves_the_session_usable(
    waiting_leader: tuple[LeaderConnection, psycopg.AsyncConnection[Any]],
) -> None:
    leader, writer = waiting_leader
    waiting = asyncio.create_task(leader.wait_for_notification(30))
    await asyncio.sleep(0.2)
    waiting.cancel()  # as a stop does (relay._wait_for_rows)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await notify(writer)
    assert await leader.wait_for_notification(5) is True
