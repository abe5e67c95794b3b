"""Redis failures become fallbacks: counted, and Redis is skipped for a cooldown."""

from __future__ import annotations

import pytest
from cake_auth.adapters.redis_guard import RedisGuard, RedisUnavailableError
from cake_auth.metrics import AuthMetrics
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_failure_skips_redis_for_the_cooldown_then_tries_again() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    guard = RedisGuard(AuthMetrics(registry), cooldown_seconds=1.0, clock=clock)
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        raise RedisConnectionError("refused")

    async def working() -> str:
        nonlocal calls
        calls += 1
        return "value"

    with pytest.raises(RedisUnavailableError):
        await guard.run("cache_get", failing)
    clock.now += 0.5
    with pytest.raises(RedisUnavailableError):
        await guard.run("cache_get", working)  # skipped: still cooling down
    assert calls == 1
    clock.now += 0.6
    assert await guard.run("cache_get", working) == "value"
    assert calls == 2
    assert (
        registry.get_sample_value("cake_auth_redis_bypassed_total", {"operation": "cache_get"}) == 2
    )


async def test_other_errors_are_not_swallowed() -> None:
    guard = RedisGuard(AuthMetrics(CollectorRegistry()))

    async def buggy() -> None:
        raise KeyError("a bug, not an outage")

    with pytest.raises(KeyError):
        await guard.run("cache_get", buggy)
