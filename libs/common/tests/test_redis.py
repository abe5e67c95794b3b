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


@pytest.mark.integration
async def test_more_commands_in_flight_than_connections_wait_for_one(redis_url: str) -> None:
    # 200 concurrent commands through a pool of 4: each waits for a free connection instead
    # of failing with MaxConnectionsError (which made callers skip Redis for their cooldown).
    # A generous timeout: how long 200 commands take on a busy test machine is not the point.
    client = create_redis(redis_url, max_connections=4, timeout_seconds=2.0)
    try:
        await client.set("cake-common-pool-test", b"1", ex=5)
        # DEBUG SLEEP would hold the server; a short BLPOP on an empty list holds the
        # connection for real while the other commands queue behind the pool.
        replies = await asyncio.gather(
            *(client.blpop([f"cake-common-pool-empty-{i}"], timeout=0.01) for i in range(8)),
            *(client.get("cake-common-pool-test") for _ in range(200)),
        )
        assert replies[:8] == [None] * 8
        assert replies[8:] == [b"1"] * 200
        assert len(client.connection_pool._in_use_connections) == 0  # type: ignore[attr-defined]
    finally:
        await client.aclose()


async def test_a_pool_held_too_long_fails_within_the_timeout() -> None:
    # Every connection taken by a command a silent server never answers: the next command
    # fails once its wait for a connection reaches the client's timeout (a RedisError
    # callers already handle), not after redis-py's default 20 s.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        client = create_redis(f"redis://127.0.0.1:{port}/0", max_connections=2)
        holders = [asyncio.ensure_future(client.get(f"held-{i}")) for i in range(2)]
        await asyncio.sleep(0.05)  # both connections taken, their replies never coming
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(30):
            with pytest.raises(redis.exceptions.ConnectionError, match="No connection"):
                await client.get("waiting")
        assert 0.15 <= loop.time() - started < 1.0
        await asyncio.gather(*holders, return_exceptions=True)
        await client.aclose()


@pytest.mark.integration
async def test_cancelled_and_timed_out_waiters_give_every_connection_back(redis_url: str) -> None:
    # Commands cancelled while holding or waiting for a connection must each give their slot
    # back: afterwards the pool still runs max_connections commands at once (a leaked slot
    # would make them queue, and then time out). (Waits that time out: the test below.)
    client = create_redis(redis_url, max_connections=3, timeout_seconds=0.5)
    try:
        holders = [
            asyncio.ensure_future(client.blpop([f"cake-common-slot-{i}"], timeout=0.2))
            for i in range(3)
        ]
        waiters = [asyncio.ensure_future(client.get("cake-common-slot")) for _ in range(20)]
        await asyncio.sleep(0.05)
        for waiter in waiters[:10]:
            waiter.cancel()
        holders[0].cancel()
        results = await asyncio.gather(*holders, *waiters, return_exceptions=True)
        assert [type(r).__name__ for r in results] == [
            "CancelledError",
            "NoneType",
            "NoneType",
            *(["CancelledError"] * 10),
            *(["NoneType"] * 10),
        ]
        pool = client.connection_pool
        assert len(pool._in_use_connections) == 0  # type: ignore[attr-defined]
        # All three connections at once again: three blocking pops of 0.2 s end together.
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = await asyncio.gather(
            *(client.blpop([f"cake-common-slot-again-{i}"], timeout=0.2) for i in range(3))
        )
        assert replies == [None] * 3
        assert loop.time() - started < 0.2 + 0.15
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_connections_closed_by_the_server_are_replaced(redis_url: str) -> None:
    # The pool skips redis-py's reconnect wrapper for connections that are up; after the
    # server closed every connection, hammered by concurrent commands, the client still
    # answers all of them (each dead connection replaced, or retried once on a new one).
    client = create_redis(redis_url, max_connections=8)
    killer = create_redis(redis_url)
    try:
        for round_ in range(3):
            await asyncio.gather(*(client.echo(f"warm-{i}") for i in range(32)))
            await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await asyncio.sleep(0.05)
            replies = await asyncio.gather(*(client.echo(f"{round_}-{i}") for i in range(32)))
            assert replies == [f"{round_}-{i}".encode() for i in range(32)]
        assert len(client.connection_pool._in_use_connections) == 0  # type: ignore[attr-defined]
    finally:
        await killer.aclose()
        await client.aclose()
