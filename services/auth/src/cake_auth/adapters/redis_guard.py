"""Redis is optional for Cake: its failures are counted, logged and turned into fallbacks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cake_common.logging import get_logger
from redis.exceptions import RedisError

from cake_auth.metrics import AuthMetrics

REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError)

T = TypeVar("T")

_log = get_logger(__name__)


class RedisUnavailableError(Exception):
    """Redis did not answer (or failed recently); the caller falls back."""


class RedisGuard:
    """Runs the Redis commands of optional features (cache, throttle, denylist).

    After a failure, Redis is skipped for ``cooldown_seconds``: an unreachable server
    would otherwise cost a connect timeout on every call of every request. That also
    bounds the warnings to about one per cooldown, while every bypassed call is counted.
    """

    def __init__(
        self,
        metrics: AuthMetrics,
        *,
        cooldown_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._skip_until = float("-inf")

    async def run(self, operation: str, command: Callable[[], Awaitable[T]]) -> T:
        """``command()``'s result, or ``RedisUnavailableError`` if Redis fails or failed lately."""
        if self._clock() < self._skip_until:
            self._metrics.redis_bypassed.labels(operation).inc()
            raise RedisUnavailableError(operation)
        try:
            return await command()
        except REDIS_FAILURES as error:
            self._skip_until = self._clock() + self._cooldown
            self._metrics.redis_bypassed.labels(operation).inc()
            _log.warning(
                "redis failed; bypassing it",
                operation=operation,
                retry_in_seconds=self._cooldown,
                error=repr(error),
            )
            raise RedisUnavailableError(operation) from error
