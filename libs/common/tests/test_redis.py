from __future__ import annotations

import asyncio
import socket

import pytest
import redis.exceptions
from cake_common.redis import create_redis, redis_probe
from pydantic import SecretStr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_dead_redis_fails_fast() -> None:
    client = create_redis(SecretStr(f"redis://127.0.0.1:{_closed_port()}/0"))
    # The client's own error, not this guard's TimeoutError: refused at once, no long retry.
    async with asyncio.timeout(30):
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.get("anything")
        with pytest.raises(redis.exceptions.ConnectionError):
            await redis_probe(client)()
    await client.aclose()


async def test_unresponsive_redis_times_out_fast() -> None:
    # A listener that accepts but never answers: the ~200 ms socket timeout must apply.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        client = create_redis(f"redis://127.0.0.1:{port}/0")
        # The socket timeout ends the call (redis' TimeoutError), not this 30 s guard
        # (asyncio's TimeoutError, which pytest.raises would not accept).
        async with asyncio.timeout(30):
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.ping()
        await client.aclose()


@pytest.mark.integration
async def test_probe_against_real_redis(redis_url: str) -> None:
    client = create_redis(redis_url)
    try:
        await redis_probe(client)()
        await client.set("cake-common-test", b"1", ex=5)
        assert await client.get("cake-common-test") == b"1"
    finally:
        await client.aclose()
