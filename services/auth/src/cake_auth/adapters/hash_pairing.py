"""Where a password hash goes among the lanes engines, and when a lone one waits for a partner.

A bcrypt check alone leaves most of a core waiting on memory (see :mod:`cake_bcrypt`); two
interleaved on one engine cost about 1.15 times one (cost 10 on the 2-core Xeon Cake is
measured on: 59.3 ms of CPU for the pair against 51.8 for one alone), so every check that
finds a partner saves about 40 % of its CPU. Under load partners come by themselves. At a
moderate, steady rate they do not: a check is over before the next login arrives, and each
runs alone at full price. :class:`PairingPolicy` lets a check that would start alone on an
idle engine wait, at most ``max_wait_seconds``, for the next one, but only while the recent
arrivals say that one is due within that time (a smoothed gap between arrivals); a hash that
arrives while another runs alone joins it at once. What it costs: up to ``max_wait_seconds``
of latency for the first check of a pair, only in the band of rates where a partner is
expected (at a trickle nothing waits, under load nothing has to).

Pure logic (the caller brings the clock's readings and reports submissions and
completions), so the rules are unit-tested without threads. Hand-written: this is the
scheduling of Cake's own engines; no library knows their cost model. The same idea as
PostgreSQL's ``commit_delay`` with ``commit_siblings`` or Kafka's ``linger.ms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Weight of the newest gap in the smoothed gap between arrivals.
GAP_SMOOTHING = 0.3
#: A gap longer than this counts as this long (one quiet minute must not take minutes of
#: arrivals to forget).
GAP_CAP_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Placement:
    """Submit to ``engine`` now, or (``engine`` None) hold the hash for a partner."""

    engine: int | None


class PairingPolicy:
    """Chooses an engine for each hash among ``engines`` engines of ``lanes`` lanes.

    - A hash joins an engine that runs exactly one (a pair costs little more than one).
    - Otherwise it goes to the engine with the fewest in flight.
    - Unless that engine is idle, so the hash would run alone, and a partner is expected
      within ``max_wait_seconds``: then the caller holds it (:meth:`place` answers ``None``)
      until the next hash arrives (both go to one engine: :meth:`least_loaded`) or the wait
      is over (it goes alone).
    """

    def __init__(self, engines: int, lanes: int, *, max_wait_seconds: float) -> None:
        if engines < 1 or lanes < 1 or max_wait_seconds < 0:
            raise ValueError("engines and lanes must be >= 1 and max_wait_seconds >= 0")
        self._in_flight = [0] * engines
        self._lanes = lanes
        self.max_wait_seconds = max_wait_seconds
        self._last_arrival: float | None = None
        self._gap = math.inf

    @property
    def expected_gap_seconds(self) -> float:
        """The smoothed time between two arrivals (infinite until two have arrived)."""
        return self._gap

    def arrived(self, now: float) -> None:
        """A hash was asked for at ``now`` (monotonic seconds)."""
        if self._last_arrival is not None:
            gap = min(max(0.0, now - self._last_arrival), GAP_CAP_SECONDS)
            self._gap = (
                gap
                if math.isinf(self._gap)
                else (GAP_SMOOTHING * gap + (1 - GAP_SMOOTHING) * self._gap)
            )
        self._last_arrival = now

    def place(self) -> Placement:
        """Where the hash that just arrived goes (call :meth:`arrived` first)."""
        if self._lanes > 1:
            for index, count in enumerate(self._in_flight):
                if count == 1:
                    return Placement(index)
        least = self.least_loaded()
        if self._in_flight[least] == 0 and self._partner_expected():
            return Placement(None)
        return Placement(least)

    def least_loaded(self) -> int:
        """The engine with the fewest hashes in flight (the first of equals)."""
        return min(range(len(self._in_flight)), key=self._in_flight.__getitem__)

    def submitted(self, engine: int) -> None:
        self._in_flight[engine] += 1

    def finished(self, engine: int) -> None:
        self._in_flight[engine] -= 1

    def in_flight(self, engine: int) -> int:
        return self._in_flight[engine]

    def _partner_expected(self) -> bool:
        return self._lanes > 1 and self.max_wait_seconds > 0 and self._gap <= self.max_wait_seconds
