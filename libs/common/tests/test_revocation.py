"""The shared revocation list: marks that expire, a follower that answers from memory within
a second of a write and asks Redis when it is not fresh, failures that say "unknown" rather
than "not revoked"."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio
from cake_common.jwt import Principal
from cake_common.redis import create_redis
from cake_common.revocation import (
    STREAM_TIMEOUT_SECONDS,
    RevocationList,
    RevocationUnavailable,
    RevokedKeys,
)


def _principal(*, session_id: str | None = None, jti: str | None = None) -> Principal:
    return Principal(
        user_id=7,
        role="user",
        jti=jti or uuid.uuid4().hex,
        expires_at=datetime.now(UTC) + timedelta(minutes=15),
        session_id=session_id or uuid.uuid4().hex,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
async def test_sessions_and_tokens_are_revoked_with_a_ttl(redis_url: str) -> None:
    client = create_redis(redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    revocations = RevocationList(client, key_prefix=prefix)
    try:
        ended, other = _principal(), _principal()
        by_token = _principal()
        assert not await revocations.is_revoked(ended)

        await revocations.revoke_sessions([ended.session_id], ttl_seconds=60)
        await revocations.revoke_token(by_token.jti, ttl_seconds=60)

        assert await revocations.is_revoked(ended)
        # Another token of the same session is refused too.
        assert await revocations.is_revoked(_principal(session_id=ended.session_id))
        assert await revocations.is_revoked(by_token)
        assert not await revocations.is_revoked(other)
        ttl = await client.ttl(revocations.session_key(ended.session_id))
        assert 0 < ttl <= 60
    finally:
        await client.aclose()


async def test_a_dead_redis_is_unknown_not_unrevoked() -> None:
    now = [0.0]
    client = create_redis(f"redis://127.0.0.1:{_closed_port()}/0")
    revocations = RevocationList(client, cooldown_seconds=1.0, clock=lambda: now[0])
    try:
        with pytest.raises(RevocationUnavailable):
            await revocations.is_revoked(_principal())
        # Within the cooldown Redis is not even tried.
        with pytest.raises(RevocationUnavailable, match="recent failure"):
            await revocations.is_revoked(_principal())
        with pytest.raises(RevocationUnavailable):
            await revocations.revoke_sessions(["s"], ttl_seconds=10)
    finally:
        await client.aclose()


# -- the in-memory follower ---------------------------------------------------------------------


def test_revoked_keys_expire_and_are_pruned() -> None:
    known = RevokedKeys()
    known.add("sid:a", expires_at=100.0)
    known.add("sid:a", expires_at=50.0)  # an older mark never shortens a newer one
    known.add("jti:b", expires_at=10.0)
    assert known.contains("sid:a", now=99.0)
    assert not known.contains("sid:a", now=100.0)
    assert known.contains("jti:b", now=9.0)
    assert not known.contains("jti:c", now=0.0)
    known.prune(now=20.0)
    assert len(known) == 1
    known.add("jti:d", expires_at=30.0)
    known.prune(now=40.0)  # within a minute of the last prune: nothing to do yet
    assert len(known) == 2
    known.prune(now=90.0)
    assert len(known) == 1 and known.contains("sid:a", now=90.0)


def _stream_client(redis_url: str) -> redis.asyncio.Redis:
    """The follower's own connection, as ``cake_common.token_auth.revocation_list`` makes it."""
    return create_redis(redis_url, timeout_seconds=STREAM_TIMEOUT_SECONDS)


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the follower task's state, no event to wait on
            await asyncio.sleep(0.01)


@pytest.mark.integration
async def test_a_follower_answers_from_memory_within_a_second_of_the_write(
    redis_url: str,
) -> None:
    client = create_redis(redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    # Two processes' worth: auth writes, another service follows.
    writer = RevocationList(client, key_prefix=prefix)
    offset = [0.0]
    follower = RevocationList(client, key_prefix=prefix, wall_clock=lambda: time.time() + offset[0])
    try:
        # Marks written before the follower starts are read from the stream's start.
        early = _principal()
        await writer.revoke_sessions([early.session_id], ttl_seconds=60)
        follower.start()
        await _until(lambda: follower.following)
        assert await follower.is_revoked(early)

        ended, token, other = _principal(), _principal(), _principal()
        await writer.revoke_sessions([ended.session_id], ttl_seconds=60)
        await writer.revoke_token(token.jti, ttl_seconds=60)
        written_at = time.monotonic()
        # The writer knows at once, without asking Redis.
        assert await writer.is_revoked(ended)
        # The keys go: only the stream, through memory, can still say "revoked".
        await client.delete(writer.session_key(ended.session_id), writer.token_key(token.jti))
        while not (await follower.is_revoked(ended) and await follower.is_revoked(token)):
            assert time.monotonic() - written_at < 1.0, "not revoked within a second"
            await asyncio.sleep(0.01)
        assert follower.following
        assert not await follower.is_revoked(other)
        # A mark refuses only until it expires.
        offset[0] = 61.0
        assert not await follower.is_revoked(ended)
    finally:
        await follower.aclose()
        await client.aclose()
    assert not follower.following


@pytest.mark.integration
async def test_a_follower_catches_up_with_a_backlog_larger_than_one_read(redis_url: str) -> None:
    client = create_redis(redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    writer = RevocationList(client, key_prefix=prefix)
    follower = RevocationList(client, stream_client=_stream_client(redis_url), key_prefix=prefix)
    sessions = [uuid.uuid4().hex for _ in range(2500)]
    try:
        for start in range(0, len(sessions), 500):
            await writer.revoke_sessions(sessions[start : start + 500], ttl_seconds=60)
        await client.delete(*(writer.session_key(s) for s in sessions))
        follower.start()
        await _until(lambda: follower.following)
        for session_id in (sessions[0], sessions[999], sessions[1000], sessions[-1]):
            assert await follower.is_revoked(_principal(session_id=session_id)), session_id
    finally:
        await follower.aclose()
        await client.aclose()


@pytest.mark.integration
async def test_a_stale_follower_asks_redis_and_a_dead_one_says_unknown(redis_url: str) -> None:
    client = create_redis(redis_url)
    dead = create_redis(f"redis://127.0.0.1:{_closed_port()}/0")
    prefix = f"test:{uuid.uuid4().hex}:"
    writer = RevocationList(client, key_prefix=prefix)
    follower = RevocationList(client, stream_client=_stream_client(redis_url), key_prefix=prefix)
    cut_off = RevocationList(dead, stream_client=dead, key_prefix=prefix)
    try:
        follower.start()
        await _until(lambda: follower.following)
        await follower.aclose()  # no longer fresh: every check goes to Redis
        assert not follower.following
        ended = _principal()
        await writer.revoke_sessions([ended.session_id], ttl_seconds=60)
        assert await follower.is_revoked(ended)
        # What a follower learnt it keeps when it is no longer fresh (here: stopped).
        assert not follower.following
        await client.delete(writer.session_key(ended.session_id))
        assert await follower.is_revoked(ended) is False  # never read from the stream
        learnt = _principal()
        await follower.revoke_sessions([learnt.session_id], ttl_seconds=60)
        await client.delete(writer.session_key(learnt.session_id))
        assert await follower.is_revoked(learnt)
        # A follower that cannot reach Redis is never fresh, and never says "not revoked".
        cut_off.start()
        await asyncio.sleep(0.3)
        assert not cut_off.following
        with pytest.raises(RevocationUnavailable):
            await cut_off.is_revoked(ended)
    finally:
        await cut_off.aclose()  # closes `dead` too
        await follower.aclose()
        await client.aclose()


async def test_a_malformed_stream_entry_is_ignored_not_fatal() -> None:
    client = create_redis(f"redis://127.0.0.1:{_closed_port()}/0")
    revocations = RevocationList(client)
    try:
        for fields in ({b"key": b"sid:x"}, {b"exp": b"1"}, {b"key": b"sid:y", b"exp": b"soon"}):
            revocations._apply(fields)  # what a hostile or broken writer could put there
        revocations._apply({b"key": b"sid:z", b"exp": str(time.time() + 60).encode()})
        assert len(revocations._known) == 1
    finally:
        await client.aclose()


class _CancelToErrorStream:
    """A stream client whose blocking read turns a cancellation into a connection error, or
    (``swallow``) into an empty answer, as a Redis client may when a read is cut mid-way."""

    def __init__(self, *, swallow: bool = False) -> None:
        self.reads = 0
        self.swallow = swallow

    async def xread(self, *args: object, **kwargs: object) -> None:
        self.reads += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if self.swallow:
                return None
            raise redis.exceptions.ConnectionError("Connection closed by server.") from None

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("swallow", [False, True], ids=["as-an-error", "as-an-answer"])
async def test_a_follower_stops_when_the_client_turns_its_cancellation_into_something_else(
    swallow: bool,
) -> None:
    stream = _CancelToErrorStream(swallow=swallow)
    client = create_redis(f"redis://127.0.0.1:{_closed_port()}/0")
    follower = RevocationList(client, stream_client=stream)  # type: ignore[arg-type]
    try:
        follower.start()
        async with asyncio.timeout(5):
            while stream.reads == 0:  # noqa: ASYNC110 - the follower task's state
                await asyncio.sleep(0.01)
        # Without the check it would log the error, back off and read again, forever.
        closing = asyncio.ensure_future(follower.aclose())
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert done == {closing}, "the follower ignored its cancellation"
        assert stream.reads == 1
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_closing_a_follower_does_not_swallow_the_callers_cancellation(
    redis_url: str,
) -> None:
    client = create_redis(redis_url)
    follower = RevocationList(client, stream_client=_stream_client(redis_url))
    try:
        follower.start()
        await _until(lambda: follower.following)
        closing = asyncio.ensure_future(follower.aclose())
        await asyncio.sleep(0)  # aclose has cancelled the follower and awaits it
        closing.cancel()
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert done == {closing}
        assert closing.cancelled(), "aclose swallowed the cancellation of its caller"
    finally:
        await follower.aclose()
        await client.aclose()
