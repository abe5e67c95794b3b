"""Redis client factory. Cake treats Redis as optional (cache, denylist, throttling), so the
client fails fast instead of stalling requests when Redis is down."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio
from pydantic import SecretStr
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class BoundedConnectionPool(redis.asyncio.ConnectionPool):
    """A connection pool of at most ``max_connections`` whose callers wait (up to ``timeout``
    seconds, then ``ConnectionError("No connection available.")``) for a free connection
    instead of failing with ``MaxConnectionsError``: what redis-py's ``BlockingConnectionPool``
    does, at a fraction of its cost per command.

    Hand-written because ``BlockingConnectionPool`` takes an ``asyncio.Condition`` and arms a
    timeout for every command, and the plain pool takes a lock and calls redis-py's
    observability recorders (no-ops unless its OpenTelemetry export is configured, which Cake
    does not do) on every get and release: ≈ 45 % of the redis-py time of a profile read
    (py-spy of an auth worker under ``bench/profile_reads.py --vegeta``). Here a command
    takes a slot of an ``asyncio.Semaphore`` (a counter decrement while connections are
    free; a timeout is armed only when it has to wait) and the connection itself is taken
    synchronously (nothing can interleave on the event loop), and is checked as
    ``ensure_connection`` would (see :func:`_ready`). Releases go through the plain pool's
    ``release`` unchanged (reconnect when needed, released-connection events).
    """

    def __init__(
        self,
        *,
        max_connections: int = 50,
        timeout: float | None = 20,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(max_connections=max_connections, **connection_kwargs)
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)

    async def get_connection(self, *_args: Any, **_options: Any) -> AbstractConnection:
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout(self.timeout):
                    await slots.acquire()
            except TimeoutError as error:
                raise RedisConnectionError("No connection available.") from error
        else:
            await slots.acquire()  # returns at once: a slot is free
        try:
            connection = cast(AbstractConnection, self.get_available_connection())  # type: ignore[no-untyped-call]
        except BaseException:
            slots.release()
            raise
        try:
            if not await _ready(connection):
                await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            self._slots.release()


async def _ready(connection: AbstractConnection) -> bool:
    """A connected connection with nothing left to read: what ``ensure_connection`` checks
    once ``connect()`` returned, without ``connect()``'s retry wrapper, which it runs even on
    a connection that is already up (≈ 5 % of an auth worker's CPU on profile reads, py-spy).
    Anything else (not connected, unread data, a broken socket) goes through the pool's own
    ``ensure_connection``, which reconnects."""
    if not connection.is_connected:
        return False
    try:
        return not await connection.can_read()
    except (RedisConnectionError, RedisTimeoutError, OSError):
        return False


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
    which cost far more CPU than the wait, making the burst worse). See
    :class:`BoundedConnectionPool`.
    """
    plain_url = url.get_secret_value() if isinstance(url, SecretStr) else url
    pool = BoundedConnectionPool.from_url(
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
