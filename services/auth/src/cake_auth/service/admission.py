"""Admission control in front of the password-hash queue.

A bcrypt check costs ~50 ms of CPU, so a burst of logins beyond what the hashing threads
can serve would only queue up, every caller waiting longer until they all time out. Instead,
when the queue is full, a login or registration is refused at once with UNAVAILABLE (HTTP 503
through the gateway) and a ``retry-after`` header: the callers who are admitted keep a short
wait, the others learn immediately when to come back.

"Full" is measured, not guessed: by default a call is admitted while its expected wait for a
thread (the calls ahead of it times the measured time between two completed hashes while
every thread is busy, :class:`HashThroughput`) is within ``max_wait_seconds``: a near-ceiling
burst queues briefly, only a lasting excess is refused. The bound follows what this box
really serves, slow or fast, shared with other load or not: a fixed count refuses too early
on a fast box (the threads idle between bursts) and too late on a slow one (the admitted wait
into their deadline). An operator can still fix the count (``max_waiting``).

The throughput is measured on the hashes themselves (:meth:`HashAdmission.metered` wraps the
hasher), not on the whole admitted call: an admitted login also reads the account and counts
the attempt in Redis before its hash, and that time is not the threads' (counted as busy, it
made a saturated pool look slower than it is, and the queue shorter than it should be).

The count is of calls between admission and the end of their hash (the whole service runs on
one event loop, so plain numbers suffice). A refused login happens *before* the login
throttle counts the attempt, so overload never makes an account look attacked.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

from cake_common.errors import Unavailable
from cake_common.logging import get_logger

from cake_auth.metrics import AuthMetrics
from cake_auth.service.ports import PasswordHasher

SERVER_BUSY = "The server is busy, try again in a moment"
SERVER_BUSY_REASON = "SERVER_BUSY"
Operation = Literal["login", "register"]

# Weight of the newest completion interval in the moving average of the hash throughput.
_SMOOTHING = 0.1
_log = get_logger(__name__)


class HashThroughput:
    """The mean time between two completed hashes while every hashing thread is busy: the
    inverse of what the threads really serve (pure logic: the caller reports the start and
    the end of each hash with the count of hashes submitted and not done, and the time).

    Hand-written (a moving average over a few lines): the admission libraries on PyPI are
    rate limiters with a configured rate, and the rate here is what has to be measured.
    """

    def __init__(self, *, workers: int, initial_hash_seconds: float) -> None:
        if workers < 1 or initial_hash_seconds <= 0:
            raise ValueError("workers must be >= 1 and initial_hash_seconds > 0")
        self.workers = workers
        self.interval_seconds = initial_hash_seconds / workers
        # Since when every thread has been busy without a gap (None: some thread is idle).
        self._busy_since: float | None = None

    def started(self, now: float, in_flight: int) -> None:
        """A hash was handed to the threads; ``in_flight`` counts it."""
        if self._busy_since is None and in_flight >= self.workers:
            self._busy_since = now

    def completed(self, now: float, in_flight: int) -> None:
        """A hash ended; ``in_flight`` no longer counts it."""
        if self._busy_since is not None:
            # Every thread was busy from the previous completion (or from the moment the
            # last one filled) until now: one interval of the saturated pool.
            interval = max(now - self._busy_since, 0.0)
            self.interval_seconds += _SMOOTHING * (interval - self.interval_seconds)
        self._busy_since = now if in_flight >= self.workers else None

    @property
    def per_second(self) -> float:
        return 1.0 / max(self.interval_seconds, 1e-6)

    def waiting_for(self, max_wait_seconds: float) -> int:
        """How many calls can wait for a thread and still start within ``max_wait_seconds``
        (at least one, so a thread never idles between two arrivals)."""
        # Rounded: the interval is a moving average, "about 50" must not become 49.
        return max(1, round(max_wait_seconds / max(self.interval_seconds, 1e-6)))

    def seconds_until_done(self, in_flight: int) -> float:
        """About how long until the ``in_flight`` calls are all done."""
        return in_flight * self.interval_seconds


class HashAdmission:
    """Admits the hash-bound calls the threads can finish within ``max_wait_seconds`` of
    waiting (the default), or at most ``workers + max_waiting`` when that count is fixed."""

    def __init__(
        self,
        *,
        workers: int,
        metrics: AuthMetrics,
        max_waiting: int | None = None,
        max_wait_seconds: float = 1.5,
        initial_hash_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1 or (max_waiting is not None and max_waiting < 0):
            raise ValueError("workers must be >= 1 and max_waiting >= 0")
        if max_wait_seconds <= 0:
            raise ValueError("max_wait_seconds must be > 0")
        self.workers = workers
        self._fixed_waiting = max_waiting
        self._max_wait = max_wait_seconds
        self._throughput = HashThroughput(
            workers=workers, initial_hash_seconds=initial_hash_seconds
        )
        self._metrics = metrics
        self._clock = clock
        self._in_flight = 0
        self._hashing = 0
        # Since when every thread has had a hash to run (None: some thread is idle).
        self._saturated_since: float | None = None
        self._metrics.hash_admission_limit.set(self.limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def limit(self) -> int:
        """Calls admitted at most right now: the threads' and the queue's."""
        if self._fixed_waiting is not None:
            return self.workers + self._fixed_waiting
        return self.workers + self._throughput.waiting_for(self._max_wait)

    @property
    def hashes_per_second(self) -> float:
        """The measured throughput of the hashing threads when all are busy."""
        return self._throughput.per_second

    def retry_after_seconds(self) -> int:
        """Whole seconds until the calls in flight now are done (at least 1)."""
        return max(1, math.ceil(self._throughput.seconds_until_done(self._in_flight)))

    @asynccontextmanager
    async def admitted(self, operation: Operation) -> AsyncIterator[None]:
        """Run the block as one of the admitted calls, or raise ``Unavailable`` at once."""
        limit = self.limit
        if self._in_flight >= limit:
            retry_after = self.retry_after_seconds()
            self._metrics.hash_admission.labels(operation, "refused").inc()
            _log.warning(
                "hash queue full, call refused",
                operation=operation,
                in_flight=self._in_flight,
                limit=limit,
                retry_after_seconds=retry_after,
            )
            raise Unavailable(
                SERVER_BUSY,
                reason=SERVER_BUSY_REASON,
                metadata={"retry_after_seconds": str(retry_after)},
                retry_after_seconds=retry_after,
            )
        self._metrics.hash_admission.labels(operation, "admitted").inc()
        self._in_flight += 1
        self._metrics.hash_in_flight.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._metrics.hash_in_flight.dec()

    @asynccontextmanager
    async def hashing(self) -> AsyncIterator[None]:
        """Run the block as one hash handed to the threads: what measures their throughput
        (and the seconds during which all of them were busy)."""
        self._hashing += 1
        now = self._clock()
        self._throughput.started(now, self._hashing)
        if self._saturated_since is None and self._hashing >= self.workers:
            self._saturated_since = now
        try:
            yield
        finally:
            self._hashing -= 1
            now = self._clock()
            self._throughput.completed(now, self._hashing)
            if self._saturated_since is not None and self._hashing < self.workers:
                self._metrics.hash_saturated_seconds.inc(max(now - self._saturated_since, 0.0))
                self._saturated_since = None
            self._metrics.hash_admission_limit.set(self.limit)

    def metered(self, hasher: PasswordHasher) -> PasswordHasher:
        """``hasher`` with every hash and check measured by :meth:`hashing`."""
        return _MeteredHasher(hasher, self)


class _MeteredHasher:
    """A :class:`PasswordHasher` whose calls the admission measures."""

    def __init__(self, hasher: PasswordHasher, admission: HashAdmission) -> None:
        self._hasher = hasher
        self._admission = admission

    @property
    def concurrency(self) -> int:
        return self._hasher.concurrency

    async def hash(self, password: str) -> str:
        async with self._admission.hashing():
            return await self._hasher.hash(password)

    async def verify(self, password: str, password_hash: str) -> bool:
        async with self._admission.hashing():
            return await self._hasher.verify(password, password_hash)

    async def close(self) -> None:
        await self._hasher.close()
