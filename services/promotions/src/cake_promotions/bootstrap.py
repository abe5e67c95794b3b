"""Composition root of the promotions service: the one place that builds and wires everything."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from cake.events.v1 import registry
from cake.promotions.v1 import promotions_pb2_grpc
from cake_common.consumer import EventConsumer
from cake_common.db import create_session_factory, database_probe
from cake_common.grpc_server import DependencyCheck, GrpcServerBuilder, RunningGrpcServer
from cake_common.jwt import JwtVerifier
from cake_common.lifecycle import ShutdownHook, run_shutdown_hooks
from cake_common.metrics import start_metrics_server
from cake_common.outbox import OutboxWriter
from cake_common.redis import create_redis
from cake_common.retry import RetryPolicy
from cake_common.service_runtime import (
    RunningWorker,
    kill_this_process,
    open_migrated_database,
    serve_until_signal,
)
from cake_common.token_auth import revocation_list, token_verifier
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_promotions.adapters.payments import GrpcBank, SimulatedBankTransfer
from cake_promotions.api.servicer import SERVICE_NAME, PromotionsServicer
from cake_promotions.consumer import FirstLoginHandler
from cake_promotions.domain.payments import PaymentGateway
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.campaigns import CampaignAdministration
from cake_promotions.service.enrolment import FirstLoginEnrolment
from cake_promotions.service.housekeeping import IdempotencyKeyExpiry
from cake_promotions.service.reconciler import TopupReconciler
from cake_promotions.service.topups import TopupProcessing
from cake_promotions.service.unit_of_work import PromotionsUnitOfWork, UnitOfWorkFactory
from cake_promotions.service.vouchers import VoucherQueries
from cake_promotions.settings import PromotionsSettings

MIGRATIONS = "cake_promotions:migrations"


@dataclass(frozen=True, slots=True)
class UseCases:
    campaigns: CampaignAdministration
    enrolment: FirstLoginEnrolment
    vouchers: VoucherQueries
    topups: TopupProcessing


def unit_of_work_factory(engine: AsyncEngine) -> UnitOfWorkFactory:
    session_factory = create_session_factory(engine)
    outbox_writer = OutboxWriter()
    return lambda: PromotionsUnitOfWork(session_factory, outbox_writer)


def payment_gateway(settings: PromotionsSettings) -> PaymentGateway:
    if settings.payments_target is not None:
        return GrpcBank(
            settings.payments_target, deadline_seconds=settings.payments_deadline_seconds
        )
    return SimulatedBankTransfer(
        decline_all=settings.payment_fail, decline_amount=settings.payment_fail_amount
    )


def build_use_cases(
    engine: AsyncEngine,
    metrics: PromotionsMetrics,
    payments: PaymentGateway,
    settings: PromotionsSettings,
) -> UseCases:
    uow_factory = unit_of_work_factory(engine)
    return UseCases(
        campaigns=CampaignAdministration(uow_factory),
        enrolment=FirstLoginEnrolment(uow_factory, metrics),
        vouchers=VoucherQueries(uow_factory),
        topups=TopupProcessing(
            uow_factory,
            payments,
            metrics,
            pending_timeout=timedelta(seconds=settings.topup_pending_timeout_seconds),
            reconcile_interval=timedelta(seconds=settings.reconcile_interval_seconds),
            charge_deadline=timedelta(seconds=settings.payments_deadline_seconds),
            after_charge=kill_this_process if settings.fault_kill_after_charge else None,
        ),
    )


def build_reconciler(
    settings: PromotionsSettings,
    engine: AsyncEngine,
    payments: PaymentGateway,
    use_cases: UseCases,
    metrics: PromotionsMetrics,
) -> TopupReconciler:
    return TopupReconciler(
        unit_of_work_factory(engine),
        payments,
        use_cases.topups.settlement,
        metrics,
        pending_timeout=timedelta(seconds=settings.topup_pending_timeout_seconds),
        interval=timedelta(seconds=settings.reconcile_interval_seconds),
    )


def build_servicer(use_cases: UseCases) -> PromotionsServicer:
    return PromotionsServicer(
        campaigns=use_cases.campaigns,
        enrolment=use_cases.enrolment,
        vouchers=use_cases.vouchers,
        topups=use_cases.topups,
    )


def build_verifier(settings: PromotionsSettings) -> JwtVerifier:
    if settings.jwks_file is None:
        # Every non-public call needs a token checked here: refuse to start without keys.
        raise SystemExit("CAKE_PROMOTIONS_JWKS_FILE must name the auth service's JWKS file")
    return token_verifier(settings, settings.jwks_file)


def first_login_consumer(
    enrolment: FirstLoginEnrolment,
    metrics: PromotionsMetrics,
    *,
    bootstrap_servers: str,
    topic: str,
    group_id: str,
    client_id: str,
    max_batch: int = 500,
    retry_max_seconds: float = 10.0,
) -> EventConsumer:
    """The Kafka consumer with the first-login handler registered (tests and the enrolment
    bench build it here too, on their own topics)."""
    consumer = EventConsumer(
        name="promotions",
        metrics=metrics.consumer,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        max_batch=max_batch,
        retry=RetryPolicy(max_seconds=retry_max_seconds),
    )
    consumer.register(
        registry.USER_FIRST_LOGIN,
        FirstLoginHandler(enrolment),
        topic=topic,
        span_name="promotions enrol first login",
    )
    return consumer


def build_consumer(
    settings: PromotionsSettings, enrolment: FirstLoginEnrolment, metrics: PromotionsMetrics
) -> EventConsumer:
    return first_login_consumer(
        enrolment,
        metrics,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        topic=settings.user_events_topic,
        group_id=settings.consumer_group,
        client_id=f"cake-promotions-{socket.gethostname()}-{os.getpid()}",
        max_batch=settings.consumer_max_batch,
        retry_max_seconds=settings.consumer_retry_max_seconds,
    )


async def start_server(
    settings: PromotionsSettings, *, metrics_registry: CollectorRegistry = REGISTRY
) -> RunningGrpcServer:
    """The promotions gRPC server (and, unless disabled, the first-login consumer), listening
    on ``grpc_host:grpc_port`` (port 0: any free port), with the idempotency-key sweep.

    ``await running.stop()`` stops the consumer, then closes the database.
    """
    # Keys first: a misconfiguration fails in milliseconds, not after a migration.
    verifier = build_verifier(settings)
    engine = await open_migrated_database(
        settings, script_location=MIGRATIONS, relay_role=settings.relay_role
    )
    # Read only for the revocation check: tokens of ended sessions are refused here too.
    redis_client = create_redis(settings.redis_url)
    try:
        metrics = PromotionsMetrics(metrics_registry)
        payments = payment_gateway(settings)
        use_cases = build_use_cases(engine, metrics, payments, settings)
        servicer = build_servicer(use_cases)
        revocations = revocation_list(settings, redis_client)
        builder = (
            GrpcServerBuilder.from_settings(
                settings, service_names=[SERVICE_NAME], metrics_registry=metrics_registry
            )
            .add_servicer(
                lambda server: promotions_pb2_grpc.add_PromotionsServiceServicer_to_server(
                    servicer, server
                )
            )
            .with_auth(
                verifier,
                is_revoked=revocations.is_revoked,
            )
            .with_validation()
            .add_dependency_check(
                DependencyCheck("postgres", database_probe(engine), critical=True)
            )
            .add_shutdown_hook(engine.dispose)
            .add_shutdown_hook(payments.close)
            .add_shutdown_hook(redis_client.aclose)
            # Hooks run in reverse: the follower stops before the Redis client closes.
            .add_shutdown_hook(revocations.aclose)
        )
        reconciler = None
        if settings.reconcile_enabled:
            reconciler = build_reconciler(settings, engine, payments, use_cases, metrics)
            # Hooks run in reverse: the reconciler stops before the bank's channel closes.
            builder.add_shutdown_hook(reconciler.stop)
        expiry = IdempotencyKeyExpiry(
            unit_of_work_factory(engine),
            metrics,
            retention_seconds=settings.idempotency_key_retention_seconds,
            interval_seconds=settings.idempotency_key_sweep_seconds,
        )
        # Hooks run in reverse: the sweep stops before the engine is disposed.
        builder.add_shutdown_hook(expiry.stop)
        consumer = None
        if settings.consumer_enabled:
            consumer = build_consumer(settings, use_cases.enrolment, metrics)
            # Kafka is not critical: without it gRPC still serves, and enrolments wait.
            builder.add_dependency_check(
                DependencyCheck("kafka_consumer", consumer.is_consuming, critical=False)
            )
            # Hooks run in reverse: the consumer stops before its engine is disposed.
            builder.add_shutdown_hook(consumer.stop)
        running = await builder.start()
    except BaseException:
        await redis_client.aclose()
        await engine.dispose()
        raise
    revocations.start()
    expiry.start()
    if reconciler is not None:
        reconciler.start()
    if consumer is not None:
        # Restarted by itself when it fails; the API keeps serving (health: degraded).
        consumer.start(on_failure=lambda _error: running.request_stop())
    return running


async def serve(settings: PromotionsSettings) -> None:
    """gRPC and the first-login consumer until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)


async def consume(settings: PromotionsSettings) -> None:
    """Only the first-login consumer, until SIGTERM/SIGINT (e.g. extra consumer replicas)."""
    failures: list[BaseException] = []

    async def start(settings: PromotionsSettings) -> RunningWorker:
        engine = await open_migrated_database(
            settings, script_location=MIGRATIONS, relay_role=settings.relay_role
        )
        shutdown_hooks: list[ShutdownHook] = [engine.dispose]
        try:
            metrics = PromotionsMetrics()
            payments = payment_gateway(settings)
            shutdown_hooks.append(payments.close)
            use_cases = build_use_cases(engine, metrics, payments, settings)
            consumer = build_consumer(settings, use_cases.enrolment, metrics)
            shutdown_hooks.append(consumer.stop)
            metrics_server = (
                start_metrics_server(settings.metrics_port, settings.grpc_host)
                if settings.metrics_port is not None
                else None
            )
        except BaseException:
            await run_shutdown_hooks(shutdown_hooks)
            raise
        worker = RunningWorker(shutdown_hooks, metrics_server=metrics_server)

        def fail(error: BaseException) -> None:
            failures.append(error)
            worker.request_stop()

        consumer.start(on_failure=fail)
        return worker

    await serve_until_signal(settings, start)
    if failures:
        raise SystemExit("first-login consumer failed")
