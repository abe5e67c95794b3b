"""How the health of the whole system is judged from the health of its parts (pure rules)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class HealthStatus(StrEnum):
    """Overall verdict, as Cake's ``GET /health`` reports it."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class ComponentCheck:
    """The outcome of probing one component.

    ``critical`` components (a service, its database) make the system unhealthy when down;
    the others (Redis: cache and throttling; Kafka and the relay: events wait in the outbox)
    only degrade it, because requests still succeed without them.
    """

    name: str
    healthy: bool
    critical: bool
    detail: str = ""

    @property
    def status(self) -> HealthStatus:
        return HealthStatus.HEALTHY if self.healthy else HealthStatus.UNHEALTHY


def overall_status(checks: Iterable[ComponentCheck]) -> HealthStatus:
    """Unhealthy if any critical part is down, degraded if any other part is, else healthy."""
    verdict = HealthStatus.HEALTHY
    for check in checks:
        if check.healthy:
            continue
        if check.critical:
            return HealthStatus.UNHEALTHY
        verdict = HealthStatus.DEGRADED
    return verdict
