"""The shared revocation list: one round trip per check, marks that expire, failures that
say "unknown" rather than "not revoked"."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cake_common.jwt import Principal
from cake_common.redis import create_redis
from cake_common.revocation import RevocationList, RevocationUnavailable


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
