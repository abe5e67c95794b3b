"""Cache-aside copies of user profiles in Redis (``cake:auth:profile:<id>``), and in each
process's memory in front of them.

Each Redis entry is a hash ``{version, role, user}`` where ``user`` is the serialized
``cake.auth.v1.User``. Writes go through a script that keeps the newest ``version`` (the
row's change counter), so a slow reader that fetched the row before an update cannot put
its stale copy back over the updated one. The same script appends ``{user, version}`` to the
stream ``cake:auth:profile:changes`` (trimmed to the last :data:`CHANGES_KEPT_SECONDS`).

In memory: a process keeps the profiles it read from Redis (or wrote) and answers them again
without a round trip, but only while it follows that stream (``StreamFollower``): a change
drops the older copy from every process within milliseconds, and a follower that fell behind
by more than half a second answers nothing from memory and forgets everything before it
answers again. A read with an access token (``fresh_after``: the token's issue time) is never
answered by a copy taken before it, so the login that issued a token shows in every profile
read made with it, whichever process answers. A copy is also re-read after
``memory_seconds`` whatever the stream says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis.asyncio
from cake.auth.v1 import user_pb2
from cake_common.logging import get_logger
from cake_common.redis_stream import StreamFollower
from google.protobuf.message import DecodeError

from cake_auth.adapters.redis_guard import RedisGuard, RedisUnavailableError
from cake_auth.domain.users import Role, User
from cake_auth.metrics import AuthMetrics
from cake_auth.user_proto import user_from_proto, user_to_proto

_PUT_IF_NEWER = """
local cached = redis.call('HGET', KEYS[1], 'version')
if cached and tonumber(cached) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'role', ARGV[2], 'user', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[6], '*', 'user', ARGV[5], 'version', ARGV[1])
return 1
"""

CHANGES_KEPT_SECONDS = 60
"""How long a change stays on the stream: far longer than a follower may lag and still
answer from memory (half a second); one that lagged more forgets what it had."""

MEMORY_ENTRIES = 20_000
"""Profiles a process keeps in memory (≈ 1 KB each), the oldest dropped first."""

_log = get_logger(__name__)

DECODED_ENTRIES = 4096
"""Cache entries whose decoded ``User`` a process keeps, keyed by the exact bytes Redis
returned: a read of an unchanged profile then skips the protobuf decoding and the three
timestamp conversions (≈ 9 µs of the ≈ 0.5 ms a profile read costs auth, measured with
timeit; py-spy showed protobuf and datetime work at 8 % of a worker's busy time). Nothing
can be stale: an updated profile is different bytes (and a new version), so a new key."""


_K = TypeVar("_K")
_V = TypeVar("_V")


def _store_bounded(entries: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """``entries[key] = value``; a new key past ``limit`` first drops the oldest entry (dicts
    keep insertion order: bounded, no LRU bookkeeping)."""
    if key not in entries and len(entries) >= limit:
        del entries[next(iter(entries))]
    entries[key] = value


@dataclass(frozen=True, slots=True)
class _InMemory:
    user: User
    read_at: float
    """Wall-clock time before the copy was read from (or written to) Redis: it holds every
    change written before then."""
    kept_at: float
    """Monotonic time it was kept."""


class RedisProfileCache:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        guard: RedisGuard,
        metrics: AuthMetrics,
        *,
        ttl_seconds: int,
        key_prefix: str = "cake:auth:",
        stream_client: redis.asyncio.Redis | None = None,
        memory_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_prefix = f"{key_prefix}profile:"
        self._changes_key = f"{key_prefix}profile:changes"
        self._redis = client
        self._guard = guard
        # Bound once: labels() takes a lock and builds a key on every call.
        self._hits = metrics.profile_cache.labels("hit")
        self._memory_hits = metrics.profile_cache.labels("memory")
        self._misses = metrics.profile_cache.labels("miss")
        self._bypassed = metrics.profile_cache.labels("bypassed")
        self._ttl = ttl_seconds
        self._put_script: Any = client.register_script(_PUT_IF_NEWER)
        self._decoded: dict[tuple[bytes, bytes, bytes], User] = {}
        #: The follower's connection (owned: :meth:`aclose` closes it).
        self._stream_redis = stream_client
        self._memory_seconds = memory_seconds if ttl_seconds else 0.0
        self._clock = clock
        self._wall = wall_clock
        self._memory: dict[int, _InMemory] = {}
        #: The newest version the stream announced per profile (bounded like the memory): a
        #: copy read from Redis before a change but returned after its entry arrived is
        #: older than that, and not kept.
        self._announced: dict[int, int] = {}
        #: Times the memory was forgotten: a copy read before one may predate a missed change.
        self._resyncs = 0
        self._changes = StreamFollower(
            stream_client or client,
            self._changes_key,
            self._apply_change,
            name="profile-changes",
            on_resync=self._forget_all,
            clock=clock,
        )

    def _key(self, user_id: int) -> str:
        return f"{self._key_prefix}{user_id}"

    # -- in memory ---------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the changes stream (call from the running event loop); until this process
        follows it, every read asks Redis."""
        if self._memory_seconds > 0:
            self._changes.start()

    async def aclose(self) -> None:
        await self._changes.stop()
        self._forget_all()
        if self._stream_redis is not None:
            await self._stream_redis.aclose()

    def _apply_change(self, fields: dict[bytes, bytes]) -> None:
        try:
            user_id, version = int(fields[b"user"]), int(fields[b"version"])
        except (KeyError, ValueError):
            _log.warning("profile change entry ignored", fields=repr(fields)[:200])
            return
        if version > self._announced.get(user_id, 0):
            _store_bounded(self._announced, user_id, version, MEMORY_ENTRIES)
        kept = self._memory.get(user_id)
        if kept is not None and kept.user.version < version:
            del self._memory[user_id]

    def _forget_all(self) -> None:
        self._resyncs += 1
        self._memory.clear()
        self._announced.clear()

    def _from_memory(self, user_id: int, fresh_after: datetime | None) -> User | None:
        kept = self._memory.get(user_id)
        if kept is None or not self._changes.following:
            return None
        if self._clock() - kept.kept_at > self._memory_seconds:
            del self._memory[user_id]
            return None
        if fresh_after is not None and kept.read_at < fresh_after.timestamp():
            return None
        return kept.user

    def _keep(self, user: User, read_at: float, resyncs: int) -> None:
        if self._memory_seconds <= 0 or resyncs != self._resyncs or not self._changes.following:
            return
        if user.version < self._announced.get(user.id, 0):
            return  # a newer version was announced while this copy was on its way
        kept = self._memory.get(user.id)
        if kept is not None and kept.user.version > user.version:
            return
        _store_bounded(
            self._memory, user.id, _InMemory(user, read_at, self._clock()), MEMORY_ENTRIES
        )

    # -- reads and writes --------------------------------------------------------------------

    async def get(self, user_id: int, *, fresh_after: datetime | None = None) -> User | None:
        if self._ttl == 0:
            return None
        remembered = self._from_memory(user_id, fresh_after)
        if remembered is not None:
            self._memory_hits.inc()
            return remembered
        resyncs, read_at = self._resyncs, self._wall()
        key = self._key(user_id)
        try:
            version, role, serialized = await self._guard.run(
                "profile_cache_get", lambda: self._redis.hmget(key, ["version", "role", "user"])
            )
        except RedisUnavailableError:
            self._bypassed.inc()
            return None
        if not (
            isinstance(version, bytes) and isinstance(role, bytes) and isinstance(serialized, bytes)
        ):
            self._misses.inc()
            return None
        entry = (version, role, serialized)
        user = self._decoded.get(entry)
        if user is None:
            try:
                user = user_from_proto(
                    user_pb2.User.FromString(serialized),
                    role=Role(role.decode()),
                    version=int(version),
                )
            except (DecodeError, ValueError):
                # Written by an incompatible version of this service: treat as absent.
                _log.warning("unreadable profile cache entry ignored", user_id=user_id)
                self._misses.inc()
                return None
            _store_bounded(self._decoded, entry, user, DECODED_ENTRIES)
        self._hits.inc()
        self._keep(user, read_at, resyncs)
        return user

    async def put(self, user: User) -> None:
        if self._ttl == 0:
            return
        resyncs, written_at = self._resyncs, self._wall()
        arguments = [
            user.version,
            user.role.value,
            user_to_proto(user).SerializeToString(),
            self._ttl,
            user.id,
            # Entries older than this are trimmed (Redis stream ids are Unix milliseconds).
            f"{int((written_at - CHANGES_KEPT_SECONDS) * 1000)}-0",
        ]
        try:
            stored = await self._guard.run(
                "profile_cache_put",
                lambda: self._put_script(
                    keys=[self._key(user.id), self._changes_key], args=arguments
                ),
            )
        except RedisUnavailableError:
            return
        if stored == 1:
            # The newest copy in Redis from then on: this process may answer it at once.
            self._keep(user, written_at, resyncs)
