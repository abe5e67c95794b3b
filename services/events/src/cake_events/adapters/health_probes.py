"""Probes that look at one component each, for the system health report.

A probe answers ``(healthy, detail)`` and never raises: the reporter runs them all at once
with a timeout, and one slow or dead component must not hide the state of the others.
"""

from __future__ import annotations

from typing import Any

import grpc
import redis.asyncio
import redis.exceptions
from aiokafka.admin import AIOKafkaAdminClient
from cake_common.grpc_server import LIVENESS_HEALTH
from cake_common.logging import get_logger
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_events.service.ports import ProbeFunction, ProbeResult

_log = get_logger(__name__)


def grpc_health_probe(channel: grpc.aio.Channel, health_name: str) -> ProbeFunction:
    """SERVING for ``health_name`` on a service's standard gRPC health service.

    ``liveness`` tells whether the process is up; a component name such as ``postgres``
    tells whether that service reaches its own database (no cross-database reads).
    """
    # typeshed's HealthStub declares no RPC methods (types-grpcio-health-checking).
    stub: Any = health_pb2_grpc.HealthStub(channel)

    async def probe() -> ProbeResult:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=health_name))
        except grpc.aio.AioRpcError as error:
            return False, f"{error.code().name}: {error.details() or 'no details'}"
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        return serving, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    return probe


def service_probe(channel: grpc.aio.Channel) -> ProbeFunction:
    return grpc_health_probe(channel, LIVENESS_HEALTH)


def database_probe(engine: AsyncEngine) -> ProbeFunction:
    async def probe() -> ProbeResult:
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as error:
            return False, type(error).__name__
        return True, "SELECT 1 ok"

    return probe


def redis_probe(client: redis.asyncio.Redis) -> ProbeFunction:
    async def probe() -> ProbeResult:
        try:
            await client.ping()
        except (redis.exceptions.RedisError, OSError) as error:
            return False, type(error).__name__
        return True, "PING ok"

    return probe


class KafkaProbe:
    """Asks the cluster for its brokers through one admin client, re-created after failures
    (a client whose bootstrap failed never recovers by itself)."""

    def __init__(self, bootstrap_servers: str, *, timeout_seconds: float) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._timeout_ms = int(timeout_seconds * 1000)
        self._admin: AIOKafkaAdminClient | None = None

    async def __call__(self) -> ProbeResult:
        try:
            if self._admin is None:
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=self._bootstrap_servers,
                    client_id="cake-events-health",
                    request_timeout_ms=self._timeout_ms,
                )
                await admin.start()
                self._admin = admin
            cluster = await self._admin.describe_cluster()
        except Exception as error:
            await self.close()
            return False, type(error).__name__
        brokers = cluster.get("brokers", [])
        return bool(brokers), f"{len(brokers)} broker(s)"

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except Exception:
                _log.debug("kafka admin client close failed", exc_info=True)


def outbox_backlog_probe(engine: AsyncEngine, *, degraded_after_seconds: float) -> ProbeFunction:
    """Healthy while the oldest unpublished outbox row is younger than the threshold:
    a growing lag means events wait (Kafka or the relay is down), requests still work."""

    async def probe() -> ProbeResult:
        try:
            async with engine.connect() as connection:
                row = (
                    await connection.execute(
                        text(
                            "SELECT count(*), "
                            "coalesce(extract(epoch FROM now() - min(created_at)), 0) "
                            "FROM outbox WHERE published_at IS NULL "
                            "AND dead_lettered_at IS NULL"
                        )
                    )
                ).one()
        except Exception as error:
            return False, type(error).__name__
        backlog, oldest_age = int(row[0]), float(row[1])
        detail = f"{backlog} waiting, oldest {oldest_age:.1f}s"
        return oldest_age < degraded_after_seconds, detail

    return probe


def process_memory_mb() -> tuple[int, int]:
    """(resident set size now, peak resident set size) of this process in MiB."""
    import resource

    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    page_size = resource.getpagesize()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return resident_pages * page_size // (1024 * 1024), peak_kib // 1024
