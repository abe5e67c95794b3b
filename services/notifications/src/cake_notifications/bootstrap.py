"""Composition root of the notifications service: the one place that builds and wires everything."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from cake.events.v1 import registry
from cake.notifications.v1 import notifications_pb2_grpc
from cake_client import ClientCredentials
from cake_common.consumer import EventConsumer
from cake_common.db import create_session_factory, database_probe
from cake_common.grpc_server import DependencyCheck, GrpcServerBuilder, RunningGrpcServer
from cake_common.jwt import JwtVerifier
from cake_common.redis import create_redis
from cake_common.retry import RetryPolicy
from cake_common.service_runtime import open_migrated_database, serve_until_signal
from cake_common.token_auth import revocation_list, token_verifier
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_notifications.adapters.channels import RecordingSender, SmtpSender
from cake_notifications.adapters.contacts import (
    GrpcContactDirectory,
    TokenSource,
    client_credentials_source,
)
from cake_notifications.adapters.metrics import PrometheusNotificationMetrics
from cake_notifications.adapters.templates import JinjaRenderer
from cake_notifications.adapters.unit_of_work import SqlNotificationsUnitOfWork
from cake_notifications.domain.notifications import Channel, Kind
from cake_notifications.entrypoints.grpc.servicer import (
    PUBLIC_METHODS,
    SERVICE_NAME,
    NotificationsServicer,
)
from cake_notifications.entrypoints.kafka import (
    NotifyHandler,
    payment_facts,
    voucher_issued_facts,
    voucher_used_facts,
)
from cake_notifications.service.dispatch import Dispatcher
from cake_notifications.service.inbox import UserNotifications
from cake_notifications.service.notify import NotifyUsers
from cake_notifications.service.ports import ContactDirectory, UnitOfWorkFactory
from cake_notifications.settings import NotificationsSettings

MIGRATIONS = "cake_notifications:migrations"
CONTACTS_SCOPE = "users:read-contacts"
"""The scope of auth's GetUserContacts (the contract's access option)."""

TEMPLATE_SAMPLES = {
    Kind.VOUCHER_ISSUED: {
        "code": "CAKE-SAMPLE01",
        "discount_percentage": "30.00",
        "expires_on": "2026-12-31",
        "campaign_id": "1",
        "fullname": "",
    },
    Kind.VOUCHER_USED: {
        "code": "CAKE-SAMPLE01",
        "transaction_id": "TXN-1",
        "used_amount": "100.00",
        "discount_amount": "30.00",
        "fullname": "",
    },
    Kind.PAYMENT_PROCESSED: {
        "transaction_id": "TXN-1",
        "phone_number": "0900000000",
        "original_amount": "100.00",
        "discount_amount": "30.00",
        "final_amount": "70.00",
        "voucher_code": "CAKE-SAMPLE01",
        "succeeded": "yes",
        "fullname": "",
    },
}
"""One event of each kind: every template is rendered with it at start-up."""


def unit_of_work_factory(engine: AsyncEngine) -> UnitOfWorkFactory:
    session_factory = create_session_factory(engine)
    return lambda: SqlNotificationsUnitOfWork(session_factory)


def directory_credentials(
    settings: NotificationsSettings,
) -> tuple[TokenSource, ClientCredentials]:
    """How this service proves itself to auth: its service account's client credentials
    (short-lived tokens from auth, refused once the account is disabled or re-keyed). There
    is no long-lived token to mount instead: that would bypass revocation."""
    if not settings.auth_client_id or settings.auth_client_secret_file is None:
        raise SystemExit(
            "set CAKE_NOTIFICATIONS_AUTH_CLIENT_ID and CAKE_NOTIFICATIONS_AUTH_CLIENT_SECRET_FILE "
            "(a service account with scope users:read-contacts: cake-auth "
            "create-service-account)"
        )
    secret = settings.auth_client_secret_file.read_text().strip()
    credentials = ClientCredentials(settings.auth_client_id, secret, scopes=[CONTACTS_SCOPE])
    return client_credentials_source(credentials), credentials


def build_verifier(settings: NotificationsSettings) -> JwtVerifier:
    if settings.jwks_file is None:
        raise SystemExit("CAKE_NOTIFICATIONS_JWKS_FILE must name the auth service's JWKS file")
    return token_verifier(settings, settings.jwks_file)


@dataclass(frozen=True, slots=True)
class Wiring:
    notify: NotifyUsers
    dispatcher: Dispatcher
    user_notifications: UserNotifications
    smtp: SmtpSender


def build_wiring(
    settings: NotificationsSettings,
    engine: AsyncEngine,
    directory: ContactDirectory,
    metrics: PrometheusNotificationMetrics,
) -> Wiring:
    uow_factory = unit_of_work_factory(engine)
    renderer = JinjaRenderer()
    renderer.check(TEMPLATE_SAMPLES)
    recorder = RecordingSender(create_session_factory(engine))
    smtp = SmtpSender(
        host=settings.smtp_host,
        port=settings.smtp_port,
        sender=settings.smtp_sender,
        timeout_seconds=settings.smtp_timeout_seconds,
        username=settings.smtp_username,
        password=(settings.smtp_password.get_secret_value() if settings.smtp_password else None),
        start_tls=settings.smtp_start_tls,
        connections=settings.smtp_connections,
    )
    dispatcher = Dispatcher(
        uow_factory,
        directory,
        renderer,
        {Channel.EMAIL: smtp, Channel.SMS: recorder, Channel.PUSH: recorder},
        metrics,
        retry=RetryPolicy(
            base_seconds=settings.send_retry_base_seconds,
            max_seconds=settings.send_retry_max_seconds,
        ),
        batch_size=settings.dispatch_batch_size,
        concurrency=settings.dispatch_concurrency,
        workers=settings.dispatch_workers,
        lease_seconds=settings.dispatch_lease_seconds,
        idle_poll_seconds=settings.dispatch_poll_seconds,
    )
    notify = NotifyUsers(
        uow_factory,
        renderer,
        metrics,
        on_committed=dispatcher.wake,
        max_event_age=timedelta(seconds=settings.max_event_age_seconds),
    )
    return Wiring(notify, dispatcher, UserNotifications(uow_factory), smtp)


def build_consumer(
    settings: NotificationsSettings,
    notify: NotifyUsers,
    metrics: PrometheusNotificationMetrics,
    *,
    topics: dict[str, str] | None = None,
) -> EventConsumer:
    """The Kafka consumer with the three handlers (``topics``: a test's topic per event
    type name instead of the registry's)."""
    chosen = topics or {}
    consumer = EventConsumer(
        name="notifications",
        metrics=metrics.consumer,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.consumer_group,
        client_id=f"cake-notifications-{socket.gethostname()}-{os.getpid()}",
        max_batch=settings.consumer_max_batch,
        retry=RetryPolicy(max_seconds=settings.consumer_retry_max_seconds),
    )
    consumer.register(
        registry.VOUCHER_ISSUED,
        NotifyHandler(notify, voucher_issued_facts),
        topic=chosen.get(registry.VOUCHER_ISSUED.name),
        span_name="notifications voucher issued",
    )
    consumer.register(
        registry.VOUCHER_USED,
        NotifyHandler(notify, voucher_used_facts),
        topic=chosen.get(registry.VOUCHER_USED.name),
        span_name="notifications voucher used",
    )
    consumer.register(
        registry.PAYMENT_PROCESSED,
        NotifyHandler(notify, payment_facts),
        topic=chosen.get(registry.PAYMENT_PROCESSED.name),
        span_name="notifications payment processed",
    )
    return consumer


async def start_server(
    settings: NotificationsSettings,
    *,
    metrics_registry: CollectorRegistry = REGISTRY,
    directory: ContactDirectory | None = None,
    topics: dict[str, str] | None = None,
) -> RunningGrpcServer:
    """The notifications gRPC server, the consumer and the dispatcher (``directory``: a
    test's contact directory instead of auth's; ``topics``: see :func:`build_consumer`)."""
    verifier = build_verifier(settings)
    engine = await open_migrated_database(settings, script_location=MIGRATIONS)
    redis_client = create_redis(settings.redis_url)
    try:
        metrics = PrometheusNotificationMetrics(metrics_registry)
        grpc_directory = None
        if directory is None:
            token_source, credentials = directory_credentials(settings)
            grpc_directory = GrpcContactDirectory(
                settings.auth_directory_target,
                token_source,
                ttl_seconds=settings.contacts_cache_seconds,
                on_refused=credentials.forget,
            )
            directory = grpc_directory
        wiring = build_wiring(settings, engine, directory, metrics)
        servicer = NotificationsServicer(wiring.user_notifications)
        revocations = revocation_list(settings, redis_client)
        builder = (
            GrpcServerBuilder.from_settings(
                settings, service_names=[SERVICE_NAME], metrics_registry=metrics_registry
            )
            .add_servicer(
                lambda server: notifications_pb2_grpc.add_NotificationsServiceServicer_to_server(
                    servicer, server
                )
            )
            .with_auth(verifier, public_methods=PUBLIC_METHODS, is_revoked=revocations.is_revoked)
            .with_validation()
            .add_dependency_check(
                DependencyCheck("postgres", database_probe(engine), critical=True)
            )
            .add_dependency_check(
                DependencyCheck("dispatcher", wiring.dispatcher.is_running, critical=False)
            )
            .add_shutdown_hook(engine.dispose)
            .add_shutdown_hook(redis_client.aclose)
            .add_shutdown_hook(revocations.aclose)
        )
        if grpc_directory is not None:
            builder.add_shutdown_hook(grpc_directory.close)
        builder.add_shutdown_hook(wiring.smtp.close)
        # Hooks run in reverse: the dispatcher stops before the engine is disposed and the
        # SMTP connections close.
        builder.add_shutdown_hook(wiring.dispatcher.stop)
        consumer = None
        if settings.consumer_enabled:
            consumer = build_consumer(settings, wiring.notify, metrics, topics=topics)
            builder.add_dependency_check(
                DependencyCheck("kafka_consumer", consumer.is_consuming, critical=False)
            )
            builder.add_shutdown_hook(consumer.stop)
        running = await builder.start()
    except BaseException:
        await redis_client.aclose()
        await engine.dispose()
        raise
    revocations.start()
    wiring.dispatcher.start()
    if consumer is not None:
        consumer.start(on_failure=lambda _error: running.request_stop())
    return running


async def serve(settings: NotificationsSettings) -> None:
    """gRPC, the consumer and the dispatcher until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)
