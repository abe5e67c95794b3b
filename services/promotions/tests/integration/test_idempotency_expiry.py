"""Top-up idempotency keys are remembered for their retention, then deleted by the sweep
that ``serve`` runs; a key past its retention starts a new top-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from cake.promotions.v1 import promotions_pb2
from cake_promotions.bootstrap import unit_of_work_factory
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.housekeeping import IdempotencyKeyExpiry
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

DAY = 86_400.0


def topup(amount: float) -> promotions_pb2.TopupRequest:
    return promotions_pb2.TopupRequest(phone_number="+84901234567", amount=amount)


async def stored_keys(engine: AsyncEngine, user: int) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.text("SELECT key FROM idempotency_keys WHERE user_id = :u ORDER BY key"),
            {"u": user},
        )
        return [row[0] for row in rows]


async def age_key(engine: AsyncEngine, user: int, key: str, seconds: float) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                "UPDATE idempotency_keys SET created_at = now() - make_interval(secs => :s)"
                " WHERE user_id = :u AND key = :k"
            ),
            {"s": seconds, "u": user, "k": key},
        )


async def test_keys_past_their_retention_are_deleted_and_can_be_used_again(
    start_server: Any, signer: Any, unique: Callable[[], int], engine: AsyncEngine
) -> None:
    server = await start_server()  # default retention: one day
    user = unique()
    old_key, fresh_key = (("idempotency-key", "old"),), (("idempotency-key", "fresh"),)
    first = await server.stub.Topup(topup(20000), metadata=signer.metadata(user) + old_key)
    fresh = await server.stub.Topup(topup(30000), metadata=signer.metadata(user) + fresh_key)
    await age_key(engine, user, "old", DAY + 60)

    registry = CollectorRegistry()
    metrics = PromotionsMetrics(registry)
    expiry = IdempotencyKeyExpiry(
        unit_of_work_factory(engine), metrics, retention_seconds=DAY, interval_seconds=3600
    )
    assert await expiry.sweep() >= 1
    assert await stored_keys(engine, user) == ["fresh"]
    assert registry.get_sample_value("cake_promotions_idempotency_keys_expired_total") >= 1

    # Within its retention a key still replays; past it, the same key is a new top-up.
    replayed = await server.stub.Topup(topup(30000), metadata=signer.metadata(user) + fresh_key)
    again = await server.stub.Topup(topup(20000), metadata=signer.metadata(user) + old_key)
    assert replayed == fresh
    assert again.transaction_id != first.transaction_id
    async with engine.connect() as connection:
        charged = await connection.scalar(
            sa.text("SELECT count(*) FROM topups WHERE user_id = :u"), {"u": user}
        )
    assert charged == 3  # old, fresh, old again; the fresh retry was a replay


async def test_the_server_sweeps_by_itself(
    start_server: Any, signer: Any, unique: Callable[[], int], engine: AsyncEngine
) -> None:
    server = await start_server(
        idempotency_key_retention_seconds=3600, idempotency_key_sweep_seconds=0.2
    )
    user = unique()
    await server.stub.Topup(
        topup(20000), metadata=(*signer.metadata(user), ("idempotency-key", "short-lived"))
    )
    await asyncio.sleep(0.5)  # a few sweeps: a key within its retention stays
    assert await stored_keys(engine, user) == ["short-lived"]
    # The key's age, not the wall clock, decides: made older than the retention here, it
    # goes at the next sweep however slow this machine is.
    await age_key(engine, user, "short-lived", 3600 + 60)
    for _ in range(100):
        if not await stored_keys(engine, user):
            break
        await asyncio.sleep(0.1)
    assert await stored_keys(engine, user) == []
    assert server.registry.get_sample_value("cake_promotions_idempotency_keys_expired_total") >= 1
