"""Revoked access tokens in Redis (``cake:auth:denylist:<jti>``) until they expire."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime

import redis.asyncio
from cake_common.errors import Unavailable

from cake_auth.adapters.redis_guard import RedisGuard, RedisUnavailableError


class RedisTokenDenylist:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        guard: RedisGuard,
        *,
        key_prefix: str = "cake:auth:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_prefix = f"{key_prefix}denylist:"
        self._redis = client
        self._guard = guard
        self._clock = clock

    async def revoke(self, jti: str, expires_at: datetime) -> None:
        remaining = math.ceil(expires_at.timestamp() - self._clock())
        if remaining <= 0:
            return  # already expired: nothing left to deny
        try:
            await self._guard.run(
                "token_denylist_add",
                lambda: self._redis.set(self._key_prefix + jti, b"1", ex=remaining),
            )
        except RedisUnavailableError:
            # Answering OK would tell the user a token is revoked while it still works.
            raise Unavailable(
                "Logout is temporarily unavailable, please try again",
                reason="TOKEN_REVOCATION_UNAVAILABLE",
            ) from None

    async def is_revoked(self, jti: str) -> bool:
        """Fails open: with Redis down, logout is degraded rather than every call refused."""
        try:
            found = await self._guard.run(
                "token_denylist_check", lambda: self._redis.exists(self._key_prefix + jti)
            )
        except RedisUnavailableError:
            return False
        return bool(found)
