"""Composition root of the events service: the one place that builds and wires everything."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from cake.events.v1 import admin_pb2, admin_pb2_grpc, health_pb2, health_pb2_grpc
from cake_common.db import create_async_engine_for, database_probe
from cake_common.grpc_server import DependencyCheck, run_grpc_server
from cake_common.redis import create_redis
from cake_common.service_runtime import open_migrated_database, start_logging

from cake_events.adapters import health_probes
from cake_events.adapters.health_probes import ComponentProbe, KafkaProbe
from cake_events.api.admin import EventAdminServicer
from cake_events.api.health import SystemHealthServicer
from cake_events.service.system_health import SystemHealthReporter
from cake_events.settings import EventsSettings

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["EventAdminService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["SystemHealthService"].full_name
MIGRATIONS = "cake_events:migrations"

# GET /health must answer without a token (load balancers, Cake's clients).
PUBLIC_METHODS = (f"/{HEALTH_SERVICE}/GetSystemHealth",)


async def serve(settings: EventsSettings) -> None:
    start_logging(settings)
    engine = await open_migrated_database(settings, script_location=MIGRATIONS)
    shutdown_hooks: list[Callable[[], Awaitable[None]]] = [engine.dispose]

    probes = [
        ComponentProbe("events", critical=True, probe=_serving_this_call),
        ComponentProbe(
            "events_database", critical=True, probe=health_probes.database_probe(engine)
        ),
    ]
    for name, target in (
        ("auth", settings.auth_grpc_target),
        ("promotions", settings.promotions_grpc_target),
    ):
        channel = grpc.aio.insecure_channel(target)
        shutdown_hooks.append(channel.close)  # type: ignore[arg-type]
        probes += [
            ComponentProbe(name, critical=True, probe=health_probes.service_probe(channel)),
            ComponentProbe(
                f"{name}_database",
                critical=True,
                probe=health_probes.grpc_health_probe(channel, "postgres"),
            ),
        ]

    redis_client = create_redis(settings.redis_url)
    shutdown_hooks.append(redis_client.aclose)
    kafka_probe = KafkaProbe(
        settings.kafka_bootstrap_servers, timeout_seconds=settings.health_probe_timeout_seconds
    )
    shutdown_hooks.append(kafka_probe.close)
    probes += [
        ComponentProbe("redis", critical=False, probe=health_probes.redis_probe(redis_client)),
        ComponentProbe("kafka", critical=False, probe=kafka_probe),
    ]
    for source, url in (
        ("auth", settings.auth_outbox_url),
        ("promotions", settings.promotions_outbox_url),
    ):
        if url is None:
            continue
        outbox_engine = create_async_engine_for(url, pool_size=1)
        shutdown_hooks.append(outbox_engine.dispose)
        probes.append(
            ComponentProbe(
                f"relay_backlog_{source}",
                critical=False,
                probe=health_probes.outbox_backlog_probe(
                    outbox_engine, degraded_after_seconds=settings.relay_lag_degraded_seconds
                ),
            )
        )

    reporter = SystemHealthReporter(
        probes,
        timeout_seconds=settings.health_probe_timeout_seconds,
        cache_seconds=settings.health_cache_seconds,
        memory_mb=health_probes.process_memory_mb,
    )
    health_servicer = SystemHealthServicer(reporter)
    admin_servicer = EventAdminServicer()  # type: ignore[abstract]  # RPCs UNIMPLEMENTED until built
    await run_grpc_server(
        settings,
        service_names=[HEALTH_SERVICE, ADMIN_SERVICE],
        registrations=[
            lambda server: health_pb2_grpc.add_SystemHealthServiceServicer_to_server(
                health_servicer, server
            ),
            lambda server: admin_pb2_grpc.add_EventAdminServiceServicer_to_server(
                admin_servicer, server
            ),
        ],
        public_methods=PUBLIC_METHODS,
        dependency_checks=[DependencyCheck("postgres", database_probe(engine), critical=True)],
        shutdown_hooks=shutdown_hooks,
    )


async def _serving_this_call() -> tuple[bool, str]:
    return True, "answering"
