"""Admission control in front of the password-hash queue.

A bcrypt check costs ~50 ms of CPU, so a burst of logins beyond what the hashing threads
can serve would only queue up, every caller waiting longer until they all time out. Instead,
when more checks are in progress than ``workers + max_waiting``, a login or registration is
refused at once with UNAVAILABLE (HTTP 503 through the gateway) and a ``retry-after`` header:
the callers who are admitted keep a short wait, the others learn immediately when to come back.

The count is of calls between admission and the end of their hash (the whole service runs on
one event loop, so a plain integer suffices). A refused login happens *before* the login
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

SERVER_BUSY = "The server is busy, try again in a moment"
SERVER_BUSY_REASON = "SERVER_BUSY"
Operation = Literal["login", "register"]

# Weight of the newest hold time in the moving average that sizes retry-after.
_SMOOTHING = 0.2
_log = get_logger(__name__)


class HashAdmission:
    """Admits at most ``workers + max_waiting`` hash-bound calls at a time."""

    def __init__(
        self,
        *,
        workers: int,
        max_waiting: int,
        metrics: AuthMetrics,
        initial_hold_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1 or max_waiting < 0:
            raise ValueError("workers must be >= 1 and max_waiting >= 0")
        self.workers = workers
        self.limit = workers + max_waiting
        self._metrics = metrics
        self._clock = clock
        self._in_flight = 0
        self._mean_hold = initial_hold_seconds

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def retry_after_seconds(self) -> int:
        """Whole seconds until the calls in the queue now have finished (at least 1): the
        recent mean time from admission to the end of the hash, waiting included."""
        return max(1, math.ceil(self._mean_hold))

    @asynccontextmanager
    async def admitted(self, operation: Operation) -> AsyncIterator[None]:
        """Run the block as one of the admitted calls, or raise ``Unavailable`` at once."""
        if self._in_flight >= self.limit:
            retry_after = self.retry_after_seconds()
            self._metrics.hash_admission.labels(operation, "refused").inc()
            _log.warning(
                "hash queue full, call refused",
                operation=operation,
                in_flight=self._in_flight,
                limit=self.limit,
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
        started = self._clock()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._metrics.hash_in_flight.dec()
            held = self._clock() - started
            self._mean_hold += _SMOOTHING * (held - self._mean_hold)
