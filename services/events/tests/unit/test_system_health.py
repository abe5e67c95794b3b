"""Unit tests of the health verdict and the reporter (fake probes, no I/O)."""

from __future__ import annotations

import asyncio

import pytest
from cake_events.domain.health import ComponentCheck, HealthStatus, overall_status
from cake_events.service.ports import ComponentProbe, ProbeResult
from cake_events.service.system_health import SystemHealthReporter


def check(name: str, healthy: bool, critical: bool) -> ComponentCheck:
    return ComponentCheck(name=name, healthy=healthy, critical=critical)


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ([], HealthStatus.HEALTHY),
        ([check("auth", True, True), check("redis", True, False)], HealthStatus.HEALTHY),
        ([check("auth", True, True), check("redis", False, False)], HealthStatus.DEGRADED),
        (
            [check("auth_database", False, True), check("redis", True, False)],
            HealthStatus.UNHEALTHY,
        ),
        ([check("kafka", False, False), check("auth", False, True)], HealthStatus.UNHEALTHY),
    ],
)
def test_overall_status(checks: list[ComponentCheck], expected: HealthStatus) -> None:
    assert overall_status(checks) == expected


def fixed(result: ProbeResult, calls: list[str], name: str):  # type: ignore[no-untyped-def]
    async def probe() -> ProbeResult:
        calls.append(name)
        return result

    return probe


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_report_names_failed_components_and_caches() -> None:
    calls: list[str] = []
    clock = FakeClock()
    reporter = SystemHealthReporter(
        [
            ComponentProbe("auth", True, fixed((True, "SERVING"), calls, "auth")),
            ComponentProbe("redis", False, fixed((False, "ConnectionError"), calls, "redis")),
        ],
        timeout_seconds=1,
        cache_seconds=5,
        memory_mb=lambda: (42, 64),
        clock=clock,
    )
    report = await reporter.report()
    assert report.status is HealthStatus.DEGRADED
    assert [(c.name, c.status) for c in report.checks] == [
        ("auth", HealthStatus.HEALTHY),
        ("redis", HealthStatus.UNHEALTHY),
    ]
    assert report.problems == ("redis: ConnectionError",)
    assert (report.memory_used_mb, report.memory_peak_mb) == (42, 64)

    await reporter.report()
    assert calls == ["auth", "redis"], "a second call within cache_seconds must not probe"
    clock.now += 6
    await reporter.report()
    assert calls == ["auth", "redis", "auth", "redis"]


async def test_a_hanging_probe_times_out_without_hiding_the_others() -> None:
    async def hangs() -> ProbeResult:
        await asyncio.sleep(60)
        return True, "never"

    async def fine() -> ProbeResult:
        return True, "ok"

    reporter = SystemHealthReporter(
        [ComponentProbe("kafka", False, hangs), ComponentProbe("auth", True, fine)],
        timeout_seconds=0.05,
        cache_seconds=0,
        memory_mb=lambda: (1, 1),
    )
    report = await reporter.report()
    assert report.status is HealthStatus.DEGRADED
    kafka = next(c for c in report.checks if c.name == "kafka")
    assert not kafka.healthy
    assert "no answer within" in kafka.detail
