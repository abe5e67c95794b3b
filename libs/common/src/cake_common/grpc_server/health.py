"""Health reporting through the standard ``grpc.health.v1.Health`` service.

Names answered by the health servicer:

- ``""`` and every servicer name (``cake.auth.v1.AuthService``…): the overall status,
  SERVING iff the service is ready and every *critical* component is SERVING. Envoy's
  upstream health checks and k8s readiness probes use these.
- one name per component (``postgres``, ``redis``, ``kafka``…): that dependency alone,
  for dashboards and the gateway's ``/health`` detail.
- ``liveness``: SERVING until shutdown whatever the dependencies do, for k8s liveness
  probes (restarting a pod because its database is down only makes things worse).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from cake_common.logging import get_logger

OVERALL_HEALTH = ""
LIVENESS_HEALTH = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    serving: bool
    critical: bool


class ServiceHealth:
    """Owns the aio ``HealthServicer`` and derives the overall status from components.

    Starts not ready (overall NOT_SERVING); the server bootstrap calls
    ``set_ready(True)`` once listening, and :meth:`enter_graceful_shutdown` on SIGTERM.
    """

    def __init__(self, service_names: Sequence[str]) -> None:
        self._overall_names = (OVERALL_HEALTH, *service_names)
        self.servicer: Any = health_aio.HealthServicer()
        self._components: dict[str, ComponentStatus] = {}
        self._ready = False
        self._overall: bool | None = None
        self._shutting_down = False

    @property
    def is_serving(self) -> bool:
        """The overall status: ready and every critical component serving."""
        return (
            self._ready
            and not self._shutting_down
            and all(c.serving for c in self._components.values() if c.critical)
        )

    @property
    def components(self) -> Mapping[str, ComponentStatus]:
        return dict(self._components)

    async def initialize(self) -> None:
        """Publish the initial statuses; call before the server starts accepting calls."""
        await self.servicer.set(LIVENESS_HEALTH, SERVING)
        await self._publish_overall(force=True)

    async def set_ready(self, ready: bool) -> None:
        """Service-level switch (e.g. warming up); components still gate the overall status."""
        self._ready = ready
        await self._publish_overall()

    async def set_component(self, name: str, serving: bool, *, critical: bool = True) -> None:
        """Record one dependency's status; only ``critical`` ones affect the overall status."""
        if name in self._overall_names or name == LIVENESS_HEALTH:
            raise ValueError(f"{name!r} is reserved for the service's own status")
        self._components[name] = ComponentStatus(serving=serving, critical=critical)
        await self.servicer.set(name, SERVING if serving else NOT_SERVING)
        await self._publish_overall()

    async def enter_graceful_shutdown(self) -> None:
        """Every name NOT_SERVING for good, so balancers drain this instance."""
        self._shutting_down = True
        await self.servicer.enter_graceful_shutdown()

    async def _publish_overall(self, *, force: bool = False) -> None:
        serving = self.is_serving
        if serving == self._overall and not force:
            return
        self._overall = serving
        status = SERVING if serving else NOT_SERVING
        for name in self._overall_names:
            await self.servicer.set(name, status)


DATABASE_CHECK = "postgres"
"""The dependency check every service reports its own database under (the events service's
``GET /health`` asks each service for it by this name)."""

DependencyProbe = Callable[[], Awaitable[object]]
"""Async check of one dependency: healthy unless it raises or returns ``False``."""


@dataclass(frozen=True, slots=True)
class DependencyCheck:
    name: str
    probe: DependencyProbe
    critical: bool = True
    timeout_seconds: float = 2.0


class DependencyWatcher:
    """Runs dependency probes every ``interval_seconds`` and reports them to ``health``.

    Only transitions are logged (up→down, down→up, and the first result), so a long
    outage costs one log line, not one per interval.
    """

    def __init__(
        self,
        health: ServiceHealth,
        checks: Sequence[DependencyCheck],
        *,
        interval_seconds: float = 5.0,
    ) -> None:
        self._health = health
        self._checks = tuple(checks)
        self._interval = interval_seconds
        self._last: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    async def check_all(self) -> dict[str, bool]:
        """Probe every dependency once, concurrently; returns name → healthy."""
        results = await asyncio.gather(*(self._probe(check) for check in self._checks))
        outcome = {}
        for check, (healthy, error) in zip(self._checks, results, strict=True):
            outcome[check.name] = healthy
            self._log_transition(check, healthy, error)
            await self._health.set_component(check.name, healthy, critical=check.critical)
        return outcome

    @staticmethod
    async def _probe(check: DependencyCheck) -> tuple[bool, str | None]:
        try:
            async with asyncio.timeout(check.timeout_seconds):
                result = await check.probe()
        except TimeoutError:
            return False, f"no answer within {check.timeout_seconds}s"
        except Exception as error:
            return False, repr(error)
        if result is False:
            return False, "probe returned False"
        return True, None

    def _log_transition(self, check: DependencyCheck, healthy: bool, error: str | None) -> None:
        previous = self._last.get(check.name)
        self._last[check.name] = healthy
        if previous == healthy:
            return
        if healthy:
            _log.info("dependency up", dependency=check.name, critical=check.critical)
        else:
            _log.warning(
                "dependency down", dependency=check.name, critical=check.critical, error=error
            )

    def start(self) -> None:
        """Start probing in a background task (first round immediately)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cake-dependency-watcher")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                # A bug in reporting must not silently end health checking for good.
                _log.exception("dependency checks failed")
            await asyncio.sleep(self._interval)
