"""Failed-login counting per account in Redis (``cake:auth:login-failures:<sha256>``).

The window starts at an account's first failure: after ``max_failures`` failures within
``window_seconds`` the account is refused until the window ends; a successful login
clears the count. Account names are hashed so the keys hold no personal data.
"""

from __future__ import annotations

import contextlib
import hashlib

import redis.asyncio

from cake_auth.adapters.redis_guard import RedisGuard, RedisUnavailableError
from cake_auth.domain.login import ThrottleStatus


class RedisLoginThrottle:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        guard: RedisGuard,
        *,
        max_failures: int,
        window_seconds: int,
        key_prefix: str = "cake:auth:",
    ) -> None:
        self._key_prefix = f"{key_prefix}login-failures:"
        self._redis = client
        self._guard = guard
        self._max_failures = max_failures
        self._window = window_seconds

    def _key(self, account_key: str) -> str:
        return self._key_prefix + hashlib.sha256(account_key.encode()).hexdigest()

    async def check(self, account_key: str) -> ThrottleStatus:
        key = self._key(account_key)

        async def count_and_ttl() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.ttl(key)
                result: list[object] = await pipe.execute()
                return result

        try:
            count, ttl = await self._guard.run("login_throttle_check", count_and_ttl)
        except RedisUnavailableError:
            return ThrottleStatus()
        failures = int(count) if isinstance(count, bytes) else 0
        if failures < self._max_failures:
            return ThrottleStatus(failures=failures)
        return ThrottleStatus(
            failures=failures,
            retry_after_seconds=ttl if isinstance(ttl, int) and ttl > 0 else 1,
        )

    async def record_failure(self, account_key: str) -> None:
        key = self._key(account_key)

        async def increment() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                # NX: the window runs from the first failure, later ones do not extend it.
                pipe.expire(key, self._window, nx=True)
                await pipe.execute()

        with contextlib.suppress(RedisUnavailableError):
            await self._guard.run("login_throttle_record", increment)

    async def reset(self, account_key: str) -> None:
        with contextlib.suppress(RedisUnavailableError):
            await self._guard.run(
                "login_throttle_reset", lambda: self._redis.delete(self._key(account_key))
            )
