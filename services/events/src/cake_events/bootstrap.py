"""Composition root of the events service: the one place that builds and wires everything."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
import prometheus_client
from cake.events.v1 import admin_pb2, admin_pb2_grpc, health_pb2, health_pb2_grpc
from cake_common.db import create_async_engine_for, create_session_factory, database_probe
from cake_common.grpc_server import DependencyCheck, GrpcServerBuilder, RunningGrpcServer
from cake_common.lifecycle import ShutdownHook, run_shutdown_hooks
from cake_common.metrics import start_metrics_server
from cake_common.redis import create_redis
from cake_common.retry import RetryPolicy
from cake_common.service_runtime import (
    RunningWorker,
    open_migrated_database,
    serve_until_signal,
)
from cake_common.token_auth import revocation_list, token_verifier
from prometheus_client import CollectorRegistry
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
from cake_events.service.ports import ComponentProbe
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
        idle_poll_max_seconds=settings.relay_idle_poll_max_seconds,
        leader_retry_seconds=settings.relay_leader_retry_seconds,
        metrics_refresh_seconds=settings.relay_metrics_refresh_seconds,
        retention_seconds=settings.published_retention_seconds,
        retention_sweep_seconds=settings.retention_sweep_interval_seconds,
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


def _service_probes(
    name: str, target: str, *, critical: bool, hooks: list[ShutdownHook]
) -> list[ComponentProbe]:
    """``name`` (the process: gRPC liveness) and ``name_database`` (its own database, as it
    reports it: no cross-database reads), over one channel closed at shutdown."""
    channel = grpc.aio.insecure_channel(target)
    hooks.append(channel.close)
    return [
        ComponentProbe(name, critical=critical, probe=health_probes.service_probe(channel)),
        ComponentProbe(
            f"{name}_database",
            critical=critical,
            probe=health_probes.grpc_health_probe(channel, "postgres"),
        ),
    ]


async def start_server(
    settings: EventsSettings, *, metrics_registry: CollectorRegistry | None = None
) -> RunningGrpcServer:
    """Migrate, wire, start the gRPC server and (if enabled) the relays; returns once
    serving. ``stop()`` on the result stops everything gracefully. Logging and tracing are
    the caller's (``serve``), as in every service's ``start_server``."""
    registry = metrics_registry or prometheus_client.REGISTRY
    engine = await open_migrated_database(settings, script_location=MIGRATIONS)
    shutdown_hooks: list[ShutdownHook] = [engine.dispose]

    try:
        probes = [
            ComponentProbe("events", critical=True, probe=_serving_this_call),
            ComponentProbe(
                "events_database", critical=True, probe=health_probes.database_probe(engine)
            ),
        ]
        # The other services, each with its database: the sources (critical), then the
        # services without an outbox, as critical as configured.
        watched = [(s.name, s.grpc_target, True) for s in settings.sources if s.grpc_target]
        watched += [(s.name, s.grpc_target, s.critical) for s in settings.health_services]
        for name, target, critical in watched:
            probes += _service_probes(name, target, critical=critical, hooks=shutdown_hooks)

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
        outboxes: list[SourceOutbox] = []
        for source in settings.sources:
            outbox_engine = create_async_engine_for(
                source.outbox_url,
                pool_size=1,
                session_timeouts=settings.database_session_timeouts(),
            )
            shutdown_hooks.append(outbox_engine.dispose)
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

        reporter = SystemHealthReporter(
            probes,
            timeout_seconds=settings.health_probe_timeout_seconds,
            cache_seconds=settings.health_cache_seconds,
            memory_mb=health_probes.process_memory_mb,
        )
        health_servicer = SystemHealthServicer(reporter)

        relays = RelayGroup([])
        if settings.relay_enabled:
            wiring = build_relays(settings, engine, registry)
            relays = wiring.group
            shutdown_hooks += [leader_engine.dispose for leader_engine in wiring.engines]
        # Registered last, so it runs first at shutdown: the batch in flight still has its
        # databases while it finishes.
        shutdown_hooks.append(relays.stop)

        session_factory = create_session_factory(engine)
        admin_servicer = EventAdminServicer(
            EventAdministration(
                events_uow=lambda: SqlEventsUnitOfWork(session_factory),
                outboxes=outboxes,
                in_flight=relays.in_flight,
            )
        )

        builder = (
            GrpcServerBuilder.from_settings(
                settings, service_names=[HEALTH_SERVICE, ADMIN_SERVICE], metrics_registry=registry
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
            .add_dependency_check(
                DependencyCheck("postgres", database_probe(engine), critical=True)
            )
        )
        # Without a JWKS no token can be verified: every admin call is then UNAUTHENTICATED.
        revocations = None
        if settings.jwks_file is not None:
            revocations = revocation_list(settings, redis_client)
            # Hooks run in reverse: the follower stops before the Redis client closes.
            shutdown_hooks.append(revocations.aclose)
            builder.with_auth(
                token_verifier(settings, settings.jwks_file),
                is_revoked=revocations.is_revoked,
            )
        for hook in shutdown_hooks:
            builder.add_shutdown_hook(hook)
        running = await builder.start()
    except BaseException:
        # Failed half way (e.g. the port is taken): close what was opened so far.
        await run_shutdown_hooks(shutdown_hooks)
        raise
    try:
        if revocations is not None:
            revocations.start()
        relays.start()
    except BaseException:
        await running.stop()
        raise
    return running


async def serve(settings: EventsSettings) -> None:
    """``cake-events serve``: the gRPC API and the relays until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)


async def relay(settings: EventsSettings) -> None:
    """``cake-events relay``: only the relays (no gRPC; metrics on ``metrics_port`` if set),
    until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_relays)


async def start_relays(
    settings: EventsSettings, *, metrics_registry: CollectorRegistry | None = None
) -> RunningWorker:
    """Migrate, then start the relays alone; ``serve_until_signal`` on the result runs
    them until SIGTERM/SIGINT and then stops them gracefully."""
    registry = metrics_registry or prometheus_client.REGISTRY
    engine = await open_migrated_database(settings, script_location=MIGRATIONS)
    shutdown_hooks: list[ShutdownHook] = [engine.dispose]
    try:
        wiring = build_relays(settings, engine, registry)
        shutdown_hooks += [leader_engine.dispose for leader_engine in wiring.engines]
        # Last, so it runs first at shutdown: the batch in flight still has its databases.
        shutdown_hooks.append(wiring.group.stop)
        metrics_server = (
            start_metrics_server(settings.metrics_port, host=settings.grpc_host, registry=registry)
            if settings.metrics_port is not None
            else None
        )
    except BaseException:
        await run_shutdown_hooks(shutdown_hooks)
        raise
    wiring.group.start()
    return RunningWorker(shutdown_hooks, metrics_server=metrics_server)


async def _serving_this_call() -> tuple[bool, str]:
    return True, "answering"
