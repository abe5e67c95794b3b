"""The login throttle's counters on real Redis: an attempt that reaches no verdict is taken
back, however many run at once, and the account is never locked out by them."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio
from cake_auth.adapters.login_throttle import RedisLoginThrottle
from cake_auth.adapters.redis_guard import RedisGuard
from cake_auth.domain.login import DelayPolicy, ThrottleKeys
from cake_auth.metrics import AuthMetrics
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration

POLICY = DelayPolicy(
    free_failures=5, base_delay_seconds=30, max_delay_seconds=900, window_seconds=900
)


def throttle(client: redis.asyncio.Redis, prefix: str) -> RedisLoginThrottle:
    guard = RedisGuard(AuthMetrics(CollectorRegistry()))
    return RedisLoginThrottle(
        client, guard, account_policy=POLICY, ip_policy=POLICY, key_prefix=prefix
    )


async def counts(client: redis.asyncio.Redis, prefix: str) -> list[int]:
    keys = sorted(await client.keys(f"{prefix}login-failures:*"))
    return [int(await client.hget(key, "n") or 0) for key in keys]


async def test_abandoned_attempts_are_taken_back_even_when_many_race(
    redis_client: redis.asyncio.Redis,
) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    limiter = throttle(redis_client, prefix)
    keys = ThrottleKeys(account="user:1", client_ip="203.0.113.7")

    # One real failure stays counted on both counters.
    assert (await limiter.reserve(keys)).failures == 1
    assert await counts(redis_client, prefix) == [1, 1]

    # Forty attempts at once, each abandoned before its verdict (those the race let in are
    # taken back; a refused one was never counted): nothing of them is left counted.
    async def abandoned() -> bool:
        status = await limiter.reserve(keys)
        if status.retry_after_seconds is None:
            await limiter.released(keys)
            return True
        return False

    admitted = await asyncio.gather(*(abandoned() for _ in range(40)))
    assert any(admitted)
    assert await counts(redis_client, prefix) == [1, 1]
    # The account still gets in, and a success clears it (the IP keeps its one failure).
    assert (await limiter.reserve(keys)).retry_after_seconds is None
    await limiter.succeeded(keys)
    assert await counts(redis_client, prefix) == [1]  # the IP: the one real failure
    await limiter.released(keys)
    assert await counts(redis_client, prefix) == []
