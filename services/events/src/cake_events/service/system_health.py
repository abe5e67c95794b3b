"""The ``GET /health`` use case: probe every component at once and judge the whole."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cake_events.domain.health import ComponentCheck, HealthStatus, overall_status
from cake_events.service.ports import ComponentProbe, ProbeResult


@dataclass(frozen=True, slots=True)
class HealthReport:
    status: HealthStatus
    checked_at: datetime
    uptime_seconds: float
    response_time_ms: float
    checks: Sequence[ComponentCheck]
    memory_used_mb: int = 0
    memory_peak_mb: int = 0
    problems: Sequence[str] = field(default_factory=tuple)


class SystemHealthReporter:
    """Runs all probes concurrently, each bounded by ``timeout_seconds``.

    Reports are reused for ``cache_seconds`` so a burst of ``/health`` calls (load
    balancers, dashboards) costs the dependencies one round of probes, not one per call.
    """

    def __init__(
        self,
        probes: Sequence[ComponentProbe],
        *,
        timeout_seconds: float,
        cache_seconds: float,
        memory_mb: Callable[[], tuple[int, int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = tuple(probes)
        self._timeout_seconds = timeout_seconds
        self._cache_seconds = cache_seconds
        self._memory_mb = memory_mb
        self._clock = clock
        self._started_at = clock()
        self._cached: tuple[float, HealthReport] | None = None
        self._lock = asyncio.Lock()

    async def report(self) -> HealthReport:
        async with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < self._cache_seconds:
                return self._cached[1]
            report = await self._probe_all(now)
            self._cached = (now, report)
            return report

    async def _probe_all(self, started: float) -> HealthReport:
        results = await asyncio.gather(*(self._bounded(p) for p in self._probes))
        checks = [
            ComponentCheck(name=p.name, healthy=ok, critical=p.critical, detail=detail)
            for p, (ok, detail) in zip(self._probes, results, strict=True)
        ]
        used, peak = self._memory_mb()
        finished = self._clock()
        return HealthReport(
            status=overall_status(checks),
            checked_at=datetime.now(UTC),
            uptime_seconds=finished - self._started_at,
            response_time_ms=(finished - started) * 1000,
            checks=checks,
            memory_used_mb=used,
            memory_peak_mb=peak,
            problems=tuple(f"{c.name}: {c.detail}" for c in checks if not c.healthy),
        )

    async def _bounded(self, component: ComponentProbe) -> ProbeResult:
        try:
            return await asyncio.wait_for(component.probe(), self._timeout_seconds)
        except TimeoutError:
            return False, f"no answer within {self._timeout_seconds:g}s"
