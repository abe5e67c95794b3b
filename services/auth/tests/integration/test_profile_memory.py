"""Profiles answered from a process's memory, kept coherent by the changes stream, on a real
Redis: several caches here stand for several processes (workers or replicas)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import redis.asyncio
from cake_auth.adapters.profile_cache import RedisProfileCache
from cake_auth.adapters.redis_guard import RedisGuard
from cake_auth.domain.users import Role, User
from cake_auth.metrics import AuthMetrics
from cake_auth.user_proto import user_to_proto
from cake_common.token_auth import stream_redis
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def _user(user_id: int, version: int = 1, fullname: str = "Ada Lovelace") -> User:
    return User(
        id=user_id,
        fullname=fullname,
        username=f"ada{user_id}",
        email=f"ada{user_id}@example.com",
        phone=f"+8490{user_id:07d}",
        birthday=None,
        latest_login=None,
        role=Role.USER,
        created_at=NOW,
        updated_at=NOW,
        version=version,
    )


class _Clock:
    """A monotonic clock a test can move forward (the follower's freshness reads it)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polling a follower task's state
            await asyncio.sleep(0.005)


Caches = Callable[..., Awaitable[tuple[RedisProfileCache, AuthMetrics]]]


@pytest.fixture
async def caches(redis_client: redis.asyncio.Redis, redis_url: str) -> AsyncIterator[Caches]:
    """Started caches ("processes") sharing one fresh key prefix; closed after the test."""
    prefix = f"test:{uuid.uuid4().hex}:"
    started: list[RedisProfileCache] = []

    async def start(
        memory_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> tuple[RedisProfileCache, AuthMetrics]:
        metrics = AuthMetrics(CollectorRegistry())
        cache = RedisProfileCache(
            redis_client,
            RedisGuard(metrics),
            metrics,
            ttl_seconds=60,
            key_prefix=prefix,
            stream_client=stream_redis(redis_url),
            memory_seconds=memory_seconds,
            clock=clock,
        )
        started.append(cache)
        cache.start()
        if memory_seconds:
            await _until(lambda: cache._changes.following)
        return cache, metrics

    yield start
    for cache in started:
        await cache.aclose()


def _lookups(metrics: AuthMetrics, result: str) -> float:
    return metrics.profile_cache.labels(result)._value.get()


async def _write_behind_the_streams_back(
    client: redis.asyncio.Redis, cache: RedisProfileCache, user: User
) -> None:
    """The Redis copy replaced without a stream entry: a change whose entry a follower
    missed (trimmed while it lagged)."""
    await client.hset(
        cache._key(user.id),
        mapping={
            "version": user.version,
            "role": user.role.value,
            "user": user_to_proto(user).SerializeToString(),
        },
    )


async def test_a_process_answers_again_from_memory_and_a_change_elsewhere_drops_it(
    caches: Caches,
) -> None:
    (reader, reader_metrics), (writer, _) = await caches(), await caches()
    v1 = _user(101)
    await writer.put(v1)
    assert await reader.get(v1.id) == v1  # from Redis
    assert await reader.get(v1.id) == v1  # from memory
    assert (_lookups(reader_metrics, "hit"), _lookups(reader_metrics, "memory")) == (1, 1)

    v2 = replace(v1, fullname="Renamed elsewhere", version=2)
    await writer.put(v2)
    await _until(lambda: v1.id not in reader._memory)
    assert await reader.get(v1.id) == v2
    # The writer answers its own write from memory at once.
    assert writer._memory[v1.id].user == v2


async def test_a_read_with_a_newer_token_is_not_answered_by_an_older_copy(
    caches: Caches, redis_client: redis.asyncio.Redis
) -> None:
    (reader, _), (writer, _) = await caches(), await caches()
    v1 = _user(102)
    await writer.put(v1)
    assert await reader.get(v1.id) == v1
    v2 = replace(v1, fullname="Logged in again", version=2)
    await _write_behind_the_streams_back(redis_client, writer, v2)
    changed_at = datetime.now(UTC)

    assert await reader.get(v1.id) == v1  # the kept copy: no entry said it changed
    assert await reader.get(v1.id, fresh_after=changed_at) == v2  # read from Redis again
    assert await reader.get(v1.id, fresh_after=changed_at) == v2  # and kept


async def test_a_follower_that_fell_behind_answers_nothing_from_memory_then_forgets(
    caches: Caches, redis_client: redis.asyncio.Redis
) -> None:
    clock = _Clock()
    (reader, metrics), (writer, _) = await caches(clock=clock), await caches()
    v1 = _user(103)
    await writer.put(v1)
    assert await reader.get(v1.id) == v1
    v2 = replace(v1, fullname="Changed while it lagged", version=2)
    await _write_behind_the_streams_back(redis_client, writer, v2)

    clock.ahead = 1.0  # the follower's last fresh read is now a second old
    assert not reader._changes.following
    memory_hits = _lookups(metrics, "memory")
    assert await reader.get(v1.id) == v2  # Redis, while not fresh
    assert _lookups(metrics, "memory") == memory_hits
    # Fresh again (its next read): what it kept from before is gone, not answered.
    await _until(lambda: reader._changes.following)
    assert v1.id not in reader._memory or reader._memory[v1.id].user == v2
    assert await reader.get(v1.id) == v2


async def test_a_kept_copy_is_read_again_after_memory_seconds(caches: Caches) -> None:
    (reader, metrics), (writer, _) = await caches(memory_seconds=0.3), await caches()
    v1 = _user(104)
    await writer.put(v1)
    await reader.get(v1.id)
    await reader.get(v1.id)
    assert (_lookups(metrics, "hit"), _lookups(metrics, "memory")) == (1, 1)
    await asyncio.sleep(0.4)
    assert reader._changes.following  # not a resync: the copy is simply too old
    assert await reader.get(v1.id) == v1
    assert (_lookups(metrics, "hit"), _lookups(metrics, "memory")) == (2, 1)


async def test_memory_seconds_zero_always_asks_redis(caches: Caches) -> None:
    (reader, metrics), (writer, _) = await caches(memory_seconds=0), await caches()
    v1 = _user(105)
    await writer.put(v1)
    for _ in range(3):
        assert await reader.get(v1.id) == v1
    assert (_lookups(metrics, "hit"), _lookups(metrics, "memory")) == (3, 0)


async def test_concurrent_writes_and_reads_in_three_processes_never_go_back(
    caches: Caches,
) -> None:
    """Writers put versions 1..N of one profile while readers in other processes read it as
    fast as they can, with and without ``fresh_after``. A read with ``fresh_after`` = its
    start returns at least every version whose put returned before that; any read returns at
    least the versions put half a second (the followers' staleness bound) before it; and no
    reader ever goes back to an older version."""
    (writer, _), (reader_a, metrics_a), (reader_b, metrics_b) = (
        await caches(),
        await caches(),
        await caches(),
    )
    user_id, last = 106, 300
    done_at: dict[int, float] = {}  # version -> wall time its put returned
    stop = asyncio.Event()
    violations: list[str] = []

    async def write() -> None:
        for version in range(1, last + 1):
            await writer.put(_user(user_id, version, fullname=f"v{version}"))
            done_at[version] = time.time()
            await asyncio.sleep(0)
        stop.set()

    def newest_put_before(moment: float) -> int:
        return max((v for v, at in done_at.items() if at < moment), default=0)

    async def read(cache: RedisProfileCache, strict: bool) -> int:
        reads, seen = 0, 0
        while not stop.is_set():
            started = time.time()
            fresh_after = datetime.fromtimestamp(started, UTC) if strict else None
            got = await cache.get(user_id, fresh_after=fresh_after)
            version = 0 if got is None else got.version
            floor = newest_put_before(started if strict else started - 0.5)
            if version < floor:
                violations.append(f"read v{version} after v{floor} was put (strict={strict})")
            if version < seen:
                violations.append(f"went back from v{seen} to v{version}")
            seen = max(seen, version)
            reads += 1
            await asyncio.sleep(0)
        return reads

    _, *reads = await asyncio.gather(
        write(), read(reader_a, False), read(reader_a, True), read(reader_b, False)
    )
    assert violations == []
    assert all(count > 50 for count in reads), reads
    # Memory answered a share of the reads, and every process ends on the last version.
    assert _lookups(metrics_a, "memory") + _lookups(metrics_b, "memory") > 0
    for cache in (reader_a, reader_b):
        await _until(
            lambda cache=cache: (
                cache._memory.get(user_id) is None or cache._memory[user_id].user.version == last
            )
        )
        got = await cache.get(user_id)
        assert got is not None and got.version == last


async def test_malformed_change_entries_are_ignored_and_valid_ones_still_apply(
    caches: Caches, redis_client: redis.asyncio.Redis
) -> None:
    """What a broken or hostile writer could put on the stream: skipped with a warning, the
    follower keeps going and the next valid entry still drops the older copy."""
    (reader, _), (writer, _) = await caches(), await caches()
    v1 = _user(107)
    await writer.put(v1)
    assert await reader.get(v1.id) == v1
    for fields in ({"user": "107"}, {"version": "9"}, {"user": "x", "version": "2"}, {"a": "b"}):
        await redis_client.xadd(writer._changes_key, fields)
    v2 = replace(v1, fullname="After the garbage", version=2)
    await writer.put(v2)
    await _until(lambda: v1.id not in reader._memory)
    assert reader._changes.following
    assert await reader.get(v1.id) == v2
