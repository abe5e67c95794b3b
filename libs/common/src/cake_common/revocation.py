"""Revoked sessions and access tokens, shared by every service through Redis.

The auth service writes the marks (logout, logout-all, refresh reuse, an admin ending a
user's sessions, the old token of a Cake-style refresh). Each write does two things in one
Redis transaction: a key per mark with a TTL, and an entry on a Redis stream.

Every service's token check reads them without a network round trip: :meth:`start` follows
the stream in the background (``XREAD BLOCK``) and keeps the revoked ids of the last
``ttl`` in memory, so a check is a dictionary lookup. A mark reaches every follower within
milliseconds; the writer's own process knows it at once. The follower also tells how fresh
it is: the time of the last ``XREAD`` that came back with nothing more to read. If that is
older than ``max_staleness_seconds`` (Redis slow or gone, the follower not started) a check
asks Redis directly, one ``EXISTS`` of the two keys, as it would without a follower. So a
revocation holds everywhere at most ``max_staleness_seconds`` (0.5 s) after the write
returned, whatever happens to the stream.

Keys (``key_prefix`` default ``cake:revoked:``):

- ``<prefix>sid:<session id>``: every token of that session is refused;
- ``<prefix>jti:<token id>``: that one token is refused;
- ``<prefix>stream``: the stream of marks (fields ``key`` and ``exp``, a Unix time), trimmed
  to the last ``ttl`` on each write.

A mark only has to outlive the access tokens it refuses: the session itself is ended in
auth's database, so no new token is ever issued for it.

Redis failures of a direct check raise :class:`RevocationUnavailable`; what a caller does
then is the caller's policy (the gRPC auth interceptor: admins fail closed, users fail
open). After a failure Redis is skipped for ``cooldown_seconds``, so a dead server costs one
timeout per cooldown rather than one per call.

The stream is followed by ``cake_common.redis_stream.StreamFollower`` (why hand-written: there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis.asyncio
from redis.exceptions import RedisError

from cake_common.jwt import Principal
from cake_common.logging import get_logger
from cake_common.redis_stream import STREAM_TIMEOUT_SECONDS, StreamFollower

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "STREAM_TIMEOUT_SECONDS",
    "RevocationList",
    "RevocationUnavailable",
    "RevokedKeys",
]

DEFAULT_KEY_PREFIX = "cake:revoked:"

_log = get_logger(__name__)


class RevocationUnavailable(Exception):  # noqa: N818 - a state, like the gRPC status names
    """Redis did not answer: whether a token is revoked is unknown."""


class RevokedKeys:
    """Revocation keys known to this process, each until its mark expires (pure)."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}
        self._next_prune = 0.0

    def add(self, key: str, expires_at: float) -> None:
        self._expiry[key] = max(expires_at, self._expiry.get(key, expires_at))

    def contains(self, key: str, now: float) -> bool:
        expires_at = self._expiry.get(key)
        return expires_at is not None and expires_at > now

    def prune(self, now: float, every_seconds: float = 60.0) -> None:
        """Forget expired marks (at most once per ``every_seconds``)."""
        if now < self._next_prune:
            return
        self._next_prune = now + every_seconds
        for key in [key for key, expires_at in self._expiry.items() if expires_at <= now]:
            del self._expiry[key]

    def __len__(self) -> int:
        return len(self._expiry)


class RevocationList:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        stream_client: redis.asyncio.Redis | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        cooldown_seconds: float = 1.0,
        max_staleness_seconds: float = 0.5,
        block_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        #: The follower's connection (owned: :meth:`aclose` closes it); its command timeout
        #: must exceed ``block_seconds`` (see :data:`STREAM_TIMEOUT_SECONDS`).
        self._stream_redis = stream_client
        self._prefix = key_prefix
        self._stream = f"{key_prefix}stream"
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._wall = wall_clock
        self._skip_until = float("-inf")
        self._known = RevokedKeys()
        self._follower = StreamFollower(
            stream_client or client,
            self._stream,
            self._apply,
            name="revocation-stream",
            max_staleness_seconds=max_staleness_seconds,
            block_seconds=block_seconds,
            after_read=lambda: self._known.prune(self._wall()),
            clock=clock,
        )

    def session_key(self, session_id: str) -> str:
        return f"{self._prefix}sid:{session_id}"

    def token_key(self, jti: str) -> str:
        return f"{self._prefix}jti:{jti}"

    # -- following the stream ----------------------------------------------------------------

    def start(self) -> None:
        """Follow the stream in the background (call from the running event loop)."""
        self._follower.start()

    async def aclose(self) -> None:
        """Stop following and close the follower's connection; checks then ask Redis."""
        await self._follower.stop()
        if self._stream_redis is not None:
            await self._stream_redis.aclose()

    @property
    def following(self) -> bool:
        """Whether checks are answered from memory (the follower is fresh enough)."""
        return self._follower.following

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        try:
            self._known.add(fields[b"key"].decode(), float(fields[b"exp"]))
        except (KeyError, ValueError, UnicodeDecodeError):
            _log.warning("revocation stream entry ignored", fields=repr(fields)[:200])

    # -- checks ------------------------------------------------------------------------------

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
        """True if the token's session or the token itself was revoked: from memory while
        the follower is fresh, else one round trip to Redis."""
        keys = (self.session_key(principal.session_id), self.token_key(principal.jti))
        now = self._wall()
        # What is known stays known, fresh or not (a Redis outage forgets nothing here).
        if any(self._known.contains(key, now) for key in keys):
            return True
        if self.following:
            return False
        self._available()
        try:
            found = await self._redis.exists(*keys)
        except (RedisError, OSError) as error:
            raise self._failed(error, "check") from error
        return bool(found)

    # -- writes ------------------------------------------------------------------------------

    async def revoke_sessions(self, session_ids: Iterable[str], *, ttl_seconds: int) -> None:
        """Refuse every token of these sessions for ``ttl_seconds``; raises if not stored."""
        await self._set([self.session_key(sid) for sid in session_ids], ttl_seconds)

    async def revoke_token(self, jti: str, *, ttl_seconds: int) -> None:
        """Refuse one token for ``ttl_seconds``; raises if not stored."""
        await self._set([self.token_key(jti)], ttl_seconds)

    async def _set(self, keys: list[str], ttl_seconds: int) -> None:
        if not keys or ttl_seconds <= 0:
            return
        now = self._wall()
        expires_at = now + ttl_seconds
        # Entries older than one TTL refuse nothing any more (Redis stream ids are Unix ms).
        oldest_useful = f"{int((now - ttl_seconds) * 1000)}-0"
        # Writes are not skipped during the cooldown: a revocation is worth one more try.
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.set(key, b"1", ex=ttl_seconds)
                    pipe.xadd(
                        self._stream,
                        {"key": key, "exp": f"{expires_at:.3f}"},
                        minid=oldest_useful,
                        approximate=True,
                    )
                await pipe.execute()
        except (RedisError, OSError) as error:
            raise self._failed(error, "revoke") from error
        for key in keys:
            self._known.add(key, expires_at)
        # Redis answered: checks need not wait for the cooldown any more.
        self._skip_until = float("-inf")
