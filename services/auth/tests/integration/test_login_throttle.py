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

    # One real failure: the account counted it up front, the IP once it was known.
    assert (await limiter.reserve(keys)).failures == 1
    await limiter.failed(keys)
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
    # The account still gets in, and a success clears its count (the IP keeps its failure).
    assert (await limiter.reserve(keys)).retry_after_seconds is None
    await limiter.succeeded(keys)
    assert await counts(redis_client, prefix) == [1]


async def test_logins_in_flight_from_one_address_are_not_failures_of_that_address(
    redis_client: redis.asyncio.Redis,
) -> None:
    """Sixty correct logins of sixty accounts from one address (a NAT gateway, a proxy) wait
    at once: none is refused for the address, however far past its five free failures."""
    prefix = f"test-{uuid.uuid4().hex}:"
    limiter = throttle(redis_client, prefix)
    users = [ThrottleKeys(account=f"user:{n}", client_ip="198.51.100.9") for n in range(60)]
    statuses = await asyncio.gather(*(limiter.reserve(keys) for keys in users))
    assert [s.retry_after_seconds for s in statuses] == [None] * 60
    await asyncio.gather(*(limiter.succeeded(keys) for keys in users))
    assert await counts(redis_client, prefix) == []
    # Known failures from that address still add up: past five, the address must wait.
    for keys in users[:5]:
        assert (await limiter.reserve(keys)).retry_after_seconds is None
        await limiter.failed(keys)
    refused = await limiter.reserve(users[10])
    assert refused.retry_after_seconds is not None
    assert refused.retry_after_seconds >= 29
