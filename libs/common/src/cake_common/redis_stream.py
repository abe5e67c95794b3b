"""Following a Redis stream from the background, with a bound on how stale the follower is.

:class:`StreamFollower` reads one stream with ``XREAD BLOCK`` on a connection of its own and
hands every entry, in order, to a callback; a write reaches every follower within
milliseconds. It also tells how fresh it is: the time of the last read that came back with
nothing more to read. A reader of what the follower built in memory uses it only while that
time is within ``max_staleness_seconds`` (:attr:`StreamFollower.following`) and asks Redis
otherwise, so a slow or unreachable Redis costs answers from memory, never correctness.

A follower that was not fresh may have missed entries that the writers trimmed off the stream
meanwhile; ``on_resync`` runs before it claims to be fresh again (and before the first
time), so what was built from an incomplete history can be dropped.

Used by the revocation list (``cake_common.revocation``) and the auth service's in-process
profile copies. Hand-written because no library follows a Redis stream into process memory
with a freshness bound (redis-py's client-side caching covers the synchronous client only and
gives no staleness guarantee when the invalidation connection drops).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

import redis.asyncio
from redis.exceptions import RedisError

from cake_common.logging import get_logger
from cake_common.retry import RetryPolicy

#: Entries read per XREAD; a full batch means there may be more, so freshness is not claimed.
READ_BATCH = 500
#: Command timeout of a follower's own connection: a blocked XREAD plus a full batch's
#: transfer must fit (the services' shared client gives up after 0.2 s).
STREAM_TIMEOUT_SECONDS = 2.0

_log = get_logger(__name__)
_FOLLOW_RETRY = RetryPolicy(base_seconds=0.1, max_seconds=2.0)
"""Waits between reads of the stream while Redis is away: 0.1 s doubling to 2 s, jittered."""

StreamEntries = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


def _cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class StreamFollower:
    """Reads ``stream`` in the background from its first entry on, calling ``apply`` with
    each entry's fields in order; ``after_read`` (if any) runs after every successful read."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        stream: str,
        apply: Callable[[dict[bytes, bytes]], None],
        *,
        name: str,
        max_staleness_seconds: float = 0.5,
        block_seconds: float = 0.1,
        on_resync: Callable[[], None] | None = None,
        after_read: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._stream = stream
        self._apply = apply
        self._name = name
        self._max_staleness = max_staleness_seconds
        self._block_ms = max(1, int(block_seconds * 1000))
        self._on_resync = on_resync
        self._after_read = after_read
        self._clock = clock
        #: When the follower last knew every entry written before it (clock()).
        self._current_at = float("-inf")
        self._task: asyncio.Task[None] | None = None

    @property
    def following(self) -> bool:
        """Whether the follower knows every entry written up to ``max_staleness`` ago."""
        return self._clock() - self._current_at <= self._max_staleness

    def start(self) -> None:
        """Follow the stream in the background (call from the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow(), name=self._name)

    async def stop(self) -> None:
        """Stop following; :attr:`following` is false from then on."""
        task, self._task = self._task, None
        self._current_at = float("-inf")
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if _cancel_requested():
                raise  # this caller was cancelled too: not ours to swallow
        finally:
            # Again once it has stopped: a read that was answered while the cancellation was
            # on its way may have marked the follower fresh after the line above.
            self._current_at = float("-inf")

    async def _follow(self) -> None:
        last_id = "0-0"  # everything still on the stream first
        failures = 0
        while True:
            if _cancel_requested():
                # The client swallowed this task's cancellation mid-read (it retries a read cut
                # short, and may answer normally): stop as asked instead of following forever.
                raise asyncio.CancelledError
            asked_at = self._clock()
            try:
                reply = cast(
                    "StreamEntries | None",
                    await self._client.xread(
                        {self._stream: last_id}, count=READ_BATCH, block=self._block_ms
                    ),
                )
            except (RedisError, OSError) as error:
                if _cancel_requested():
                    # The client turned this task's cancellation into a connection error
                    # (it can, mid-read): stop as asked instead of retrying forever.
                    raise asyncio.CancelledError from error
                failures += 1
                if failures == 1:
                    _log.warning("redis stream unavailable", stream=self._name, error=repr(error))
                # Cake's one retry policy; readers ask Redis meanwhile.
                await asyncio.sleep(_FOLLOW_RETRY.delay(failures))
                continue
            if failures:
                _log.info("redis stream followed again", stream=self._name, failed_reads=failures)
                failures = 0
            read = 0
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._apply(fields)
                    last_id = entry_id.decode()
                    read += 1
            if read < READ_BATCH:
                # Nothing more to read: every entry written before the request is known.
                if self._on_resync is not None and not self.following:
                    self._on_resync()
                self._current_at = asked_at
            if self._after_read is not None:
                self._after_read()
