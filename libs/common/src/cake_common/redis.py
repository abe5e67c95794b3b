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

    When ``max_connections`` commands are in flight, the next one waits for a connection
    (up to ``timeout_seconds``, then ``ConnectionError``) instead of failing at once: with
    redis-py's default pool a burst of reads (a busy worker with more than 50 calls in
    flight) got ``MaxConnectionsError`` while Redis was fine, and callers that degrade on
    errors then skipped Redis for their cooldown (auth read profiles from PostgreSQL,
    which cost far more CPU than the wait, making the burst worse).
    """
    plain_url = url.get_secret_value() if isinstance(url, SecretStr) else url
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        plain_url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), retries=1),
        max_connections=max_connections,
        timeout=timeout_seconds,
        health_check_interval=30,
    )
    # from_pool: the client owns the pool (aclose() closes it).
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_pool(pool)
    return client


def redis_probe(client: redis.asyncio.Redis) -> Callable[[], Awaitable[None]]:
    """A ``PING`` probe for :class:`~cake_common.grpc_server.DependencyCheck`."""

    async def probe() -> None:
        await client.ping()

    return probe
