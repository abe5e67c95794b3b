"""The claim's plan: one walk of the unpublished-rows index in id order, stopped after a
batch, even when the statistics were taken while the outbox was empty (a burst after a
quiet period), where Postgres would otherwise read and sort the whole backlog per claim."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from cake_common.db import create_async_engine_for
from cake_common.outbox import OUTBOX_UNPUBLISHED_INDEX
from cake_events.adapters.outbox_source import acquire_leadership

pytestmark = pytest.mark.integration

BACKLOG = 20_000
BATCH = 1000


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@pytest.mark.parametrize("guard_retries", [False, True])
async def test_a_burst_after_a_quiet_period_is_claimed_by_walking_the_index(
    make_source_db: Callable[[], Any], kit: Any, guard_retries: bool
) -> None:
    source = make_source_db()
    async with await psycopg.AsyncConnection.connect(
        source.owner_libpq_url, autocommit=True
    ) as conn:
        await conn.execute("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        await conn.execute("ANALYZE outbox")  # statistics of an empty outbox
    ids = await kit.write_rows(
        source, [kit.event_row("USER_FIRST_LOGIN", n % 500, n) for n in range(BACKLOG)]
    )

    engine = create_async_engine_for(source.relay_url, pool_size=1)
    leader = await acquire_leadership(engine, retry_seconds=1, stop=asyncio.Event())
    assert leader is not None
    try:
        await leader.listen()
        # As the relay asks mid-burst: the previous batch is excluded, not yet recorded.
        plan = await leader.claim_plan(BATCH, exclude_ids=ids[:BATCH], guard_retries=guard_retries)
        nodes = list(plan_nodes(plan))
        assert not [node for node in nodes if node["Node Type"] == "Sort"], plan
        scans = [node for node in nodes if node.get("Relation Name") == "outbox"]
        assert scans[0]["Node Type"] == "Index Scan", plan
        assert scans[0]["Index Name"] == OUTBOX_UNPUBLISHED_INDEX, plan

        async with leader.transaction():
            claimed = await leader.claim(
                BATCH, exclude_ids=ids[:BATCH], guard_retries=guard_retries
            )
        assert [event.id for event in claimed] == ids[BATCH : 2 * BATCH]
    finally:
        await leader.close()
        await engine.dispose()
