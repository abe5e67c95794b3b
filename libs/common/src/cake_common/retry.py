"""Cake's one retry policy: capped exponential backoff with jitter.

Every wait for a dependency in ``cake_common`` uses it: start-up (``startup_retry``, hence
``start_with_retry`` for Kafka clients and the database at start-up) and the Kafka consumer
(a batch retried while PostgreSQL or Kafka is down, a crashed loop restarted). Written by hand
because it is a few lines: tenacity waits (start-up) call :meth:`RetryPolicy.delay` through
:meth:`RetryPolicy.tenacity_wait`, and the consumer's loops, which must also wake up on a stop,
call it directly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import RetryCallState

Uniform = Callable[[float, float], float]
"""Draws a number between its two arguments (``random.uniform``; tests pass a fake)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """After the n-th failure in a row, wait between half and all of
    ``min(base_seconds * 2**(n-1), max_seconds)`` ("equal jitter": never less than half the
    ceiling, so a retry storm spreads out without retrying at once)."""

    base_seconds: float = 0.2
    max_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.max_seconds <= 0:
            raise ValueError("a retry policy needs positive base_seconds and max_seconds")

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` failures in a row (1 or more)."""
        exponent = min(max(failures, 1) - 1, 32)  # 2**32 * base is past any sane cap
        return min(self.base_seconds * float(2**exponent), self.max_seconds)

    def delay(self, failures: int, uniform: Uniform = random.uniform) -> float:
        """How long to wait after ``failures`` failures in a row."""
        ceiling = self.ceiling(failures)
        return uniform(ceiling / 2, ceiling)

    def tenacity_wait(self) -> Callable[[RetryCallState], float]:
        """This policy as a tenacity ``wait``."""
        return lambda state: self.delay(state.attempt_number)
