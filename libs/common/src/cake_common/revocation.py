"""Revoked sessions and access tokens, shared by every service through Redis.

The auth service writes the marks (logout, logout-all, refresh reuse, an admin ending a
user's sessions, the old token of a Cake-style refresh); every service's token check reads
them with one ``EXISTS`` of two keys per call, so a revocation holds everywhere as soon as
the write returns (no local cache, no propagation delay).

Keys (``key_prefix`` default ``cake:revoked:``):

- ``<prefix>sid:<session id>``: every token of that session is refused;
- ``<prefix>jti:<token id>``: that one token is refused.

A mark only has to outlive the access tokens it refuses: the session itself is ended in
auth's database, so no new token is ever issued for it.

Redis failures raise :class:`RevocationUnavailable`; what a caller does then is the
caller's policy (the gRPC auth interceptor: admins fail closed, users fail open). After a
failure Redis is skipped for ``cooldown_seconds``, so a dead server costs one timeout per
cooldown rather than one per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis.asyncio
from redis.exceptions import RedisError

from cake_common.jwt import Principal
from cake_common.logging import get_logger

DEFAULT_KEY_PREFIX = "cake:revoked:"

_log = get_logger(__name__)


class RevocationUnavailable(Exception):  # noqa: N818 - a state, like the gRPC status names
    """Redis did not answer: whether a token is revoked is unknown."""


class RevocationList:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        cooldown_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._skip_until = float("-inf")

    def session_key(self, session_id: str) -> str:
        return f"{self._prefix}sid:{session_id}"

    def token_key(self, jti: str) -> str:
        return f"{self._prefix}jti:{jti}"

    def _available(self) -> None:
        if self._clock() < self._skip_until:
            raise RevocationUnavailable("redis skipped after a recent failure")

    def _failed(self, error: BaseException, operation: str) -> RevocationUnavailable:
        self._skip_until = self._clock() + self._cooldown
        _log.warning(
            "revocation list unavailable",
            operation=operation,
            retry_in_seconds=self._cooldown,
            error=repr(error),
        )
        return RevocationUnavailable(operation)

    async def is_revoked(self, principal: Principal) -> bool:
        """True if the token's session or the token itself was revoked (one round trip)."""
        self._available()
        try:
            found = await self._redis.exists(
                self.session_key(principal.session_id), self.token_key(principal.jti)
            )
        except (RedisError, OSError) as error:
            raise self._failed(error, "check") from error
        return bool(found)

    async def revoke_sessions(self, session_ids: Iterable[str], *, ttl_seconds: int) -> None:
        """Refuse every token of these sessions for ``ttl_seconds``; raises if not stored."""
        await self._set([self.session_key(sid) for sid in session_ids], ttl_seconds)

    async def revoke_token(self, jti: str, *, ttl_seconds: int) -> None:
        """Refuse one token for ``ttl_seconds``; raises if not stored."""
        await self._set([self.token_key(jti)], ttl_seconds)

    async def _set(self, keys: list[str], ttl_seconds: int) -> None:
        if not keys or ttl_seconds <= 0:
            return
        # Writes are not skipped during the cooldown: a revocation is worth one more try.
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(key, b"1", ex=ttl_seconds)
                await pipe.execute()
        except (RedisError, OSError) as error:
            raise self._failed(error, "revoke") from error
        # Redis answered: checks need not wait for the cooldown any more.
        self._skip_until = float("-inf")
