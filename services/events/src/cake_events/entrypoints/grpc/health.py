"""``cake.events.v1.SystemHealthService``: the health report in Cake's ``GET /health`` shape."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from cake.events.v1 import health_pb2, health_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cake_events.domain.health import HealthStatus
from cake_events.service.system_health import SystemHealthReporter


class SystemHealthServicer(health_pb2_grpc.SystemHealthServiceServicer):
    """Always answers OK with the verdict in ``status``; the gateway turns an ``unhealthy``
    verdict into HTTP 503 for REST clients (a transcoded gRPC OK is HTTP 200 otherwise)."""

    def __init__(self, reporter: SystemHealthReporter) -> None:
        self._reporter = reporter

    async def GetSystemHealth(
        self,
        request: health_pb2.GetSystemHealthRequest,
        context: grpc.aio.ServicerContext[
            health_pb2.GetSystemHealthRequest, health_pb2.GetSystemHealthResponse
        ],
    ) -> health_pb2.GetSystemHealthResponse:
        report = await self._reporter.report()
        timestamp = Timestamp()
        timestamp.FromDatetime(report.checked_at)
        checks = {check.name: check.status.value for check in report.checks}
        # Cake's clients read `checks.database` and `checks.cache`: keep them as summaries.
        checks["database"] = _summary(
            c.healthy for c in report.checks if c.name.endswith("_database")
        )
        checks["cache"] = checks.get("redis", HealthStatus.UNHEALTHY.value)
        return health_pb2.GetSystemHealthResponse(
            status=report.status.value,
            timestamp=timestamp,
            uptime=round(report.uptime_seconds, 3),
            response_time=round(report.response_time_ms, 3),
            checks=checks,
            memory=health_pb2.MemoryUsage(
                used=report.memory_used_mb, total=report.memory_peak_mb, external=0
            ),
            error="; ".join(report.problems),
        )


def _summary(healthy: Iterable[bool]) -> str:
    return HealthStatus.HEALTHY.value if all(healthy) else HealthStatus.UNHEALTHY.value
