"""Composition root of the events service: the one place that builds and wires everything.
Its shape, the same in every service, is described in ``cake_common.service_runtime``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
import redis.asyncio
from cake.events.v1 import admin_pb2, admin_pb2_grpc, health_pb2, health_pb2_grpc
from cake_common.db import create_async_engine_for, create_session_factory
from cake_common.grpc_server import DATABASE_CHECK, GrpcServerBuilder, RunningGrpcServer
from cake_common.retry import RetryPolicy
from cake_common.service_runtime import (
    RunningWorker,
    StartUp,
    database_check,
    serve_until_signal,
)
from cake_common.token_auth import followed_revocation_list, token_verifier
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_events.adapters import health_probes
from cake_events.adapters.health_probes import KafkaProbe
from cake_events.adapters.kafka_publisher import KafkaPublisher
from cake_events.adapters.outbox_source import OutboxAdministration, acquire_leadership
from cake_events.adapters.unit_of_work import SqlEventsUnitOfWork
from cake_events.domain.envelope import EnvelopeBuilder
from cake_events.domain.relay import FailurePolicy, TopicRoutes
from cake_events.entrypoints.grpc.admin import EventAdminServicer
from cake_events.entrypoints.grpc.health import SystemHealthServicer
from cake_events.metrics import RelayMetrics
from cake_events.service.admin import EventAdministration, SourceOutbox
from cake_events.service.ports import ComponentProbe, UnitOfWorkFactory
from cake_events.service.relay import OutboxRelay, RelayGroup, RelayTiming
from cake_events.service.system_health import SystemHealthReporter
from cake_events.settings import EventsSettings

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["EventAdminService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["SystemHealthService"].full_name
MIGRATIONS = "cake_events:migrations"


@dataclass(frozen=True, slots=True)
class RelayWiring:
    """The relays of this process and what must be closed after they stopped."""

    group: RelayGroup
    engines: list[AsyncEngine]


def build_relays(
    settings: EventsSettings, events_engine: AsyncEngine, metrics_registry: CollectorRegistry
) -> RelayWiring:
    """One relay per configured source, each with its own leader session and producer."""
    session_factory = create_session_factory(events_engine)
    metrics = RelayMetrics(metrics_registry)
    routes = TopicRoutes(settings.topic_routes)
    failure_policy = FailurePolicy(
        max_attempts=settings.relay_max_attempts,
        backoff=RetryPolicy(
            base_seconds=settings.relay_backoff_base_seconds,
            max_seconds=settings.relay_backoff_max_seconds,
        ),
    )
    timing = RelayTiming(
        batch_size=settings.relay_batch_size,
        poll_interval_seconds=settings.relay_poll_interval_seconds,
        leader_retry_seconds=settings.relay_leader_retry_seconds,
        metrics_refresh_seconds=settings.relay_metrics_refresh_seconds,
        retention_seconds=settings.published_retention_seconds,
        retention_sweep_seconds=settings.retention_sweep_interval_seconds,
        idle_poll_max_seconds=settings.relay_idle_poll_max_seconds,
    )
    envelopes = EnvelopeBuilder()
    relays: list[OutboxRelay] = []
    engines: list[AsyncEngine] = []
    for source in settings.sources:
        client_name = f"cake-events-relay-{source.name}"
        # One session at a time: it holds the relay lock for as long as it lives.
        # No session timeouts on the leader: its claim transaction stays open while Kafka
        # acknowledges the batch, and a cancelled statement would hand the relay over in the
        # middle of a batch (measured: a 10 s statement limit cut a 4,000-row claim on a busy
        # 2-core box and the standby took over mid-stream).
        leader_engine = create_async_engine_for(
            source.outbox_url, pool_size=1, max_overflow=0, application_name=client_name
        )
        engines.append(leader_engine)
        relays.append(
            OutboxRelay(
                source.name,
                leadership=functools.partial(acquire_leadership, leader_engine),
                publisher=KafkaPublisher(
                    settings.kafka_bootstrap_servers,
                    client_id=client_name,
                    timeout_seconds=settings.relay_kafka_timeout_seconds,
                    max_batch_bytes=settings.relay_kafka_max_batch_bytes,
                    linger_ms=settings.relay_kafka_linger_ms,
                ),
                events_uow=lambda: SqlEventsUnitOfWork(session_factory),
                routes=routes,
                failure_policy=failure_policy,
                timing=timing,
                metrics=metrics,
                envelopes=envelopes,
            )
        )
    return RelayWiring(group=RelayGroup(relays), engines=engines)


@dataclass(frozen=True, slots=True)
class Resources:
    engine: AsyncEngine
    redis: redis.asyncio.Redis
    watched_channels: dict[str, tuple[grpc.aio.Channel, bool]]
    """Per watched service (the sources with a gRPC target, then ``health_services``): its
    channel (the health report asks it) and whether it is critical."""
    outbox_engines: dict[str, AsyncEngine]
    """Per source: its outbox database, for the admin RPCs and the backlog probe."""


@dataclass(frozen=True, slots=True)
class Adapters:
    events_uow: UnitOfWorkFactory
    outboxes: list[SourceOutbox]
    probes: list[ComponentProbe]


@dataclass(frozen=True, slots=True)
class UseCases:
    health: SystemHealthReporter
    administration: EventAdministration
    relays: RelayGroup


async def open_database(settings: EventsSettings, start_up: StartUp) -> AsyncEngine:
    return await start_up.open_database(settings, script_location=MIGRATIONS)


async def open_resources(settings: EventsSettings, start_up: StartUp) -> Resources:
    engine = await open_database(settings, start_up)
    # The other services, each with its database: the sources (critical), then the services
    # without an outbox, as critical as configured.
    watched = [(s.name, s.grpc_target, True) for s in settings.sources if s.grpc_target]
    watched += [(s.name, s.grpc_target, s.critical) for s in settings.health_services]
    channels: dict[str, tuple[grpc.aio.Channel, bool]] = {}
    for name, target, critical in watched:
        channel = grpc.aio.insecure_channel(target)
        start_up.closes(channel.close)
        channels[name] = (channel, critical)
    redis_client = start_up.open_redis(settings.redis_url)
    outbox_engines: dict[str, AsyncEngine] = {}
    for source in settings.sources:
        outbox_engines[source.name] = create_async_engine_for(
            source.outbox_url, pool_size=1, session_timeouts=settings.database_session_timeouts()
        )
        start_up.closes(outbox_engines[source.name].dispose)
    return Resources(
        engine=engine,
        redis=redis_client,
        watched_channels=channels,
        outbox_engines=outbox_engines,
    )


def build_adapters(settings: EventsSettings, resources: Resources, start_up: StartUp) -> Adapters:
    probes = [
        ComponentProbe("events", critical=True, probe=_serving_this_call),
        ComponentProbe(
            "events_database",
            critical=True,
            probe=health_probes.database_probe(resources.engine),
        ),
    ]
    for name, (channel, critical) in resources.watched_channels.items():
        # The process (gRPC liveness) and its own database as it reports it (no
        # cross-database reads).
        probes += [
            ComponentProbe(name, critical=critical, probe=health_probes.service_probe(channel)),
            ComponentProbe(
                f"{name}_database",
                critical=critical,
                probe=health_probes.grpc_health_probe(channel, DATABASE_CHECK),
            ),
        ]
    kafka_probe = KafkaProbe(
        settings.kafka_bootstrap_servers, timeout_seconds=settings.health_probe_timeout_seconds
    )
    start_up.closes(kafka_probe.close)
    probes += [
        ComponentProbe("redis", critical=False, probe=health_probes.redis_probe(resources.redis)),
        ComponentProbe("kafka", critical=False, probe=kafka_probe),
    ]
    outboxes: list[SourceOutbox] = []
    for source in settings.sources:
        outbox_engine = resources.outbox_engines[source.name]
        outboxes.append(
            SourceOutbox(source.name, source.topics, OutboxAdministration(outbox_engine))
        )
        probes.append(
            ComponentProbe(
                f"relay_backlog_{source.name}",
                critical=False,
                probe=health_probes.outbox_backlog_probe(
                    outbox_engine, degraded_after_seconds=settings.relay_lag_degraded_seconds
                ),
            )
        )
    session_factory = create_session_factory(resources.engine)
    return Adapters(
        events_uow=lambda: SqlEventsUnitOfWork(session_factory),
        outboxes=outboxes,
        probes=probes,
    )


def build_use_cases(
    settings: EventsSettings,
    resources: Resources,
    adapters: Adapters,
    start_up: StartUp,
    metrics_registry: CollectorRegistry,
) -> UseCases:
    relays = RelayGroup([])
    if settings.relay_enabled:
        wiring = build_relays(settings, resources.engine, metrics_registry)
        relays = wiring.group
        for leader_engine in wiring.engines:
            start_up.closes(leader_engine.dispose)
    return UseCases(
        health=SystemHealthReporter(
            adapters.probes,
            timeout_seconds=settings.health_probe_timeout_seconds,
            cache_seconds=settings.health_cache_seconds,
            memory_mb=health_probes.process_memory_mb,
        ),
        administration=EventAdministration(
            events_uow=adapters.events_uow,
            outboxes=adapters.outboxes,
            in_flight=relays.in_flight,
        ),
        relays=relays,
    )


def build_entry_points(
    settings: EventsSettings,
    resources: Resources,
    use_cases: UseCases,
    start_up: StartUp,
    metrics_registry: CollectorRegistry,
) -> GrpcServerBuilder:
    """The gRPC server (system health, admin) and beside it the relays."""
    # Stopped before the databases close: the batch in flight still has them while it ends.
    start_up.runs(use_cases.relays.start, use_cases.relays.stop)
    health_servicer = SystemHealthServicer(use_cases.health)
    admin_servicer = EventAdminServicer(use_cases.administration)
    builder = (
        GrpcServerBuilder.from_settings(
            settings,
            service_names=[HEALTH_SERVICE, ADMIN_SERVICE],
            metrics_registry=metrics_registry,
        )
        .add_servicer(
            lambda server: health_pb2_grpc.add_SystemHealthServiceServicer_to_server(
                health_servicer, server
            )
        )
        .add_servicer(
            lambda server: admin_pb2_grpc.add_EventAdminServiceServicer_to_server(
                admin_servicer, server
            )
        )
        .with_validation()
        .add_dependency_check(database_check(resources.engine))
    )
    # Without a JWKS no token can be verified: every admin call is then UNAUTHENTICATED.
    if settings.jwks_file is not None:
        revocations = followed_revocation_list(settings, resources.redis, start_up)
        builder.with_auth(
            token_verifier(settings, settings.jwks_file), is_revoked=revocations.is_revoked
        )
    return builder


async def start_server(
    settings: EventsSettings, *, metrics_registry: CollectorRegistry = REGISTRY
) -> RunningGrpcServer:
    """Migrate, wire, start the gRPC server and (if enabled) the relays; returns once
    serving. ``stop()`` on the result stops everything gracefully. Logging and tracing are
    the caller's (``serve``), as in every service's ``start_server``."""
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up)
        adapters = build_adapters(settings, resources, start_up)
        use_cases = build_use_cases(settings, resources, adapters, start_up, metrics_registry)
        builder = build_entry_points(settings, resources, use_cases, start_up, metrics_registry)
        return await start_up.serve(builder)


async def serve(settings: EventsSettings) -> None:
    """``cake-events serve``: the gRPC API and the relays until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)


async def start_relays(
    settings: EventsSettings, *, metrics_registry: CollectorRegistry = REGISTRY
) -> RunningWorker:
    """Migrate, then start the relays alone (no gRPC; metrics on ``metrics_port`` if set);
    ``serve_until_signal`` on the result runs them until SIGTERM/SIGINT, then stops them
    gracefully."""
    async with StartUp() as start_up:
        engine = await open_database(settings, start_up)
        wiring = build_relays(settings, engine, metrics_registry)
        for leader_engine in wiring.engines:
            start_up.closes(leader_engine.dispose)
        # Stopped before the databases close: the batch in flight still has them.
        start_up.runs(wiring.group.start, wiring.group.stop)
        return await start_up.work(settings, metrics_registry=metrics_registry)


async def relay(settings: EventsSettings) -> None:
    """``cake-events relay``: only the relays, until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_relays)


async def _serving_this_call() -> tuple[bool, str]:
    return True, "answering"
