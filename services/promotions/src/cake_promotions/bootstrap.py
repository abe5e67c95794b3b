"""Composition root of the promotions service: the one place that builds and wires everything.
Its shape, the same in every service, is described in ``cake_common.service_runtime``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

import redis.asyncio
from cake.events.v1 import registry
from cake.promotions.v1 import promotions_pb2_grpc
from cake_common.consumer import EventConsumer
from cake_common.db import create_session_factory
from cake_common.grpc_server import GrpcServerBuilder, RunningGrpcServer
from cake_common.jwt import JwtVerifier
from cake_common.outbox import OutboxWriter
from cake_common.retry import RetryPolicy
from cake_common.service_runtime import (
    RunningWorker,
    StartUp,
    database_check,
    kill_this_process,
    process_client_id,
    serve_until_signal,
)
from cake_common.token_auth import followed_revocation_list, required_token_verifier
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_promotions.adapters.payments import GrpcBank, SimulatedBankTransfer
from cake_promotions.adapters.unit_of_work import SqlPromotionsUnitOfWork
from cake_promotions.entrypoints.grpc.servicer import SERVICE_NAME, PromotionsServicer
from cake_promotions.entrypoints.kafka import FirstLoginHandler
from cake_promotions.metrics import PromotionsMetrics
from cake_promotions.service.campaigns import CampaignAdministration
from cake_promotions.service.enrollment import FirstLoginEnrollment
from cake_promotions.service.housekeeping import IdempotencyKeyExpiry
from cake_promotions.service.ports import PaymentGateway, UnitOfWorkFactory
from cake_promotions.service.reconciler import TopupReconciler
from cake_promotions.service.topups import TopupProcessing
from cake_promotions.service.vouchers import VoucherQueries
from cake_promotions.settings import PromotionsSettings

MIGRATIONS = "cake_promotions:migrations"


@dataclass(frozen=True, slots=True)
class Resources:
    engine: AsyncEngine
    redis: redis.asyncio.Redis
    payments: PaymentGateway
    """The bank: a gRPC channel to payments, or the in-process simulation."""


@dataclass(frozen=True, slots=True)
class Adapters:
    metrics_registry: CollectorRegistry
    metrics: PromotionsMetrics
    unit_of_work: UnitOfWorkFactory
    payments: PaymentGateway


@dataclass(frozen=True, slots=True)
class UseCases:
    campaigns: CampaignAdministration
    enrollment: FirstLoginEnrollment
    vouchers: VoucherQueries
    topups: TopupProcessing


def unit_of_work_factory(engine: AsyncEngine) -> UnitOfWorkFactory:
    session_factory = create_session_factory(engine)
    outbox_writer = OutboxWriter()
    return lambda: SqlPromotionsUnitOfWork(session_factory, outbox_writer)


def payment_gateway(settings: PromotionsSettings) -> PaymentGateway:
    if settings.payments_target is not None:
        return GrpcBank(
            settings.payments_target, deadline_seconds=settings.payments_deadline_seconds
        )
    return SimulatedBankTransfer(
        decline_all=settings.payment_fail, decline_amount=settings.payment_fail_amount
    )


async def open_resources(settings: PromotionsSettings, start_up: StartUp) -> Resources:
    engine = await start_up.open_database(
        settings, script_location=MIGRATIONS, relay_role=settings.relay_role
    )
    # Read only for the revocation check: tokens of ended sessions are refused here too.
    redis_client = start_up.open_redis(settings.redis_url)
    payments = payment_gateway(settings)
    start_up.closes(payments.close)
    return Resources(engine=engine, redis=redis_client, payments=payments)


def build_adapters(resources: Resources, metrics_registry: CollectorRegistry) -> Adapters:
    return Adapters(
        metrics_registry=metrics_registry,
        metrics=PromotionsMetrics(metrics_registry),
        unit_of_work=unit_of_work_factory(resources.engine),
        payments=resources.payments,
    )


def build_use_cases(settings: PromotionsSettings, adapters: Adapters) -> UseCases:
    uow_factory = adapters.unit_of_work
    return UseCases(
        campaigns=CampaignAdministration(uow_factory),
        enrollment=FirstLoginEnrollment(uow_factory, adapters.metrics),
        vouchers=VoucherQueries(uow_factory),
        topups=TopupProcessing(
            uow_factory,
            adapters.payments,
            adapters.metrics,
            pending_timeout=timedelta(seconds=settings.topup_pending_timeout_seconds),
            reconcile_interval=timedelta(seconds=settings.reconcile_interval_seconds),
            charge_deadline=timedelta(seconds=settings.payments_deadline_seconds),
            after_charge=kill_this_process if settings.fault_kill_after_charge else None,
        ),
    )


def first_login_consumer(
    enrollment: FirstLoginEnrollment,
    metrics: PromotionsMetrics,
    *,
    bootstrap_servers: str,
    topic: str,
    group_id: str,
    client_id: str,
    max_batch: int = 500,
    retry_max_seconds: float = 10.0,
) -> EventConsumer:
    """The Kafka consumer with the first-login handler registered (tests and the enrollment
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
        FirstLoginHandler(enrollment),
        topic=topic,
        span_name="promotions enroll first login",
    )
    return consumer


def build_consumer(
    settings: PromotionsSettings, enrollment: FirstLoginEnrollment, metrics: PromotionsMetrics
) -> EventConsumer:
    return first_login_consumer(
        enrollment,
        metrics,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        topic=settings.user_events_topic,
        group_id=settings.consumer_group,
        client_id=process_client_id("promotions"),
        max_batch=settings.consumer_max_batch,
        retry_max_seconds=settings.consumer_retry_max_seconds,
    )


def build_entry_points(
    settings: PromotionsSettings,
    resources: Resources,
    adapters: Adapters,
    use_cases: UseCases,
    start_up: StartUp,
    *,
    verifier: JwtVerifier,
) -> GrpcServerBuilder:
    """The gRPC server, and beside it the top-up reconciler, the idempotency-key sweep and
    (unless disabled) the first-login consumer."""
    revocations = followed_revocation_list(settings, resources.redis, start_up)
    servicer = PromotionsServicer(
        campaigns=use_cases.campaigns,
        enrollment=use_cases.enrollment,
        vouchers=use_cases.vouchers,
        topups=use_cases.topups,
    )
    builder = (
        GrpcServerBuilder.from_settings(
            settings, service_names=[SERVICE_NAME], metrics_registry=adapters.metrics_registry
        )
        .add_servicer(
            functools.partial(promotions_pb2_grpc.add_PromotionsServiceServicer_to_server, servicer)
        )
        .with_auth(verifier, is_revoked=revocations.is_revoked)
        .with_validation()
        .add_dependency_check(database_check(resources.engine))
    )
    if settings.reconcile_enabled:
        reconciler = TopupReconciler(
            adapters.unit_of_work,
            adapters.payments,
            use_cases.topups.settlement,
            adapters.metrics,
            pending_timeout=timedelta(seconds=settings.topup_pending_timeout_seconds),
            interval=timedelta(seconds=settings.reconcile_interval_seconds),
        )
        start_up.runs(reconciler.start, reconciler.stop)
    expiry = IdempotencyKeyExpiry(
        adapters.unit_of_work,
        adapters.metrics,
        retention_seconds=settings.idempotency_key_retention_seconds,
        interval_seconds=settings.idempotency_key_sweep_seconds,
    )
    start_up.runs(expiry.start, expiry.stop)
    if settings.consumer_enabled:
        consumer = build_consumer(settings, use_cases.enrollment, adapters.metrics)
        # Kafka is not critical: without it gRPC still serves, and enrollments wait.
        start_up.runs_consumer(consumer, health=builder)
    return builder


async def start_server(
    settings: PromotionsSettings, *, metrics_registry: CollectorRegistry = REGISTRY
) -> RunningGrpcServer:
    """The promotions gRPC server (and, unless disabled, the first-login consumer), listening
    on ``grpc_host:grpc_port`` (port 0: any free port), with the idempotency-key sweep.

    ``await running.stop()`` stops the consumer and the sweeps, then closes the database.
    """
    # Keys first: a misconfiguration fails in milliseconds, not after a migration.
    verifier = required_token_verifier(settings)
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up)
        adapters = build_adapters(resources, metrics_registry)
        use_cases = build_use_cases(settings, adapters)
        return await start_up.serve(
            build_entry_points(
                settings, resources, adapters, use_cases, start_up, verifier=verifier
            )
        )


async def serve(settings: PromotionsSettings) -> None:
    """gRPC and the first-login consumer until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)


async def start_consumer(
    settings: PromotionsSettings,
    *,
    metrics_registry: CollectorRegistry = REGISTRY,
    failures: list[BaseException] | None = None,
) -> RunningWorker:
    """Only the first-login consumer (no gRPC; metrics on ``metrics_port`` if set); a
    consumer that fails for good is appended to ``failures`` and stops the process."""
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up)
        adapters = build_adapters(resources, metrics_registry)
        use_cases = build_use_cases(settings, adapters)
        consumer = build_consumer(settings, use_cases.enrollment, adapters.metrics)

        def fail(error: BaseException) -> None:
            if failures is not None:
                failures.append(error)
            start_up.request_stop()

        start_up.runs_consumer(consumer, on_failure=fail)
        return await start_up.work(settings, metrics_registry=metrics_registry)


async def consume(settings: PromotionsSettings) -> None:
    """Only the first-login consumer, until SIGTERM/SIGINT (e.g. extra consumer replicas)."""
    failures: list[BaseException] = []
    await serve_until_signal(settings, functools.partial(start_consumer, failures=failures))
    if failures:
        raise SystemExit("first-login consumer failed")
