"""Redis client factory. Cake treats Redis as optional (cache, denylist, throttling), so the
client fails fast instead of stalling requests when Redis is down."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio
from pydantic import SecretStr
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def create_redis(
    url: str | SecretStr,
    *,
    timeout_seconds: float = 0.2,
    max_connections: int = 50,
) -> redis.asyncio.Redis:
    """A ``redis.asyncio`` client whose connect and commands time out after ~200 ms.

    redis-py retries three times with backoff by default, which would turn one dead Redis
    into a second of latency per call; one immediate retry still survives a dropped idle
    connection. Callers must catch ``redis.exceptions.RedisError`` and degrade.
    """
    plain_url = url.get_secret_value() if isinstance(url, SecretStr) else url
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
        plain_url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), retries=1),
        max_connections=max_connections,
        health_check_interval=30,
    )
    return client


def redis_probe(client: redis.asyncio.Redis) -> Callable[[], Awaitable[None]]:
    """A ``PING`` probe for :class:`~cake_common.grpc_server.DependencyCheck`."""

    async def probe() -> None:
        await client.ping()

    return probe
