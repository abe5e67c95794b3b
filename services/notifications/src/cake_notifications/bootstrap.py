"""Composition root of the notifications service: the one place that builds and wires everything.
Its shape, the same in every service, is described in ``cake_common.service_runtime``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

import redis.asyncio
from cake.events.v1 import registry
from cake.notifications.v1 import notifications_pb2_grpc
from cake_client import ClientCredentials
from cake_common.consumer import EventConsumer
from cake_common.db import create_session_factory
from cake_common.grpc_server import DependencyCheck, GrpcServerBuilder, RunningGrpcServer
from cake_common.jwt import JwtVerifier
from cake_common.retry import RetryPolicy
from cake_common.service_runtime import (
    StartUp,
    database_check,
    process_client_id,
    serve_until_signal,
)
from cake_common.token_auth import followed_revocation_list, required_token_verifier
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


@dataclass(frozen=True, slots=True)
class Resources:
    engine: AsyncEngine
    redis: redis.asyncio.Redis
    directory: ContactDirectory
    """auth's contacts (a gRPC channel), or a test's directory."""


@dataclass(frozen=True, slots=True)
class Adapters:
    unit_of_work: UnitOfWorkFactory
    directory: ContactDirectory
    metrics_registry: CollectorRegistry
    metrics: PrometheusNotificationMetrics
    renderer: JinjaRenderer
    recorder: RecordingSender
    smtp: SmtpSender


@dataclass(frozen=True, slots=True)
class UseCases:
    notify: NotifyUsers
    dispatcher: Dispatcher
    user_notifications: UserNotifications


async def open_resources(
    settings: NotificationsSettings, start_up: StartUp, *, directory: ContactDirectory | None
) -> Resources:
    engine = await start_up.open_database(settings, script_location=MIGRATIONS)
    redis_client = start_up.open_redis(settings.redis_url)
    if directory is None:
        token_source, credentials = directory_credentials(settings)
        grpc_directory = GrpcContactDirectory(
            settings.auth_directory_target,
            token_source,
            ttl_seconds=settings.contacts_cache_seconds,
            on_refused=credentials.forget,
        )
        start_up.closes(grpc_directory.close)
        directory = grpc_directory
    return Resources(engine=engine, redis=redis_client, directory=directory)


def build_adapters(
    settings: NotificationsSettings,
    resources: Resources,
    start_up: StartUp,
    metrics_registry: CollectorRegistry,
) -> Adapters:
    renderer = JinjaRenderer()
    renderer.check(TEMPLATE_SAMPLES)
    recorder = RecordingSender(create_session_factory(resources.engine))
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
    start_up.closes(smtp.close)
    return Adapters(
        unit_of_work=unit_of_work_factory(resources.engine),
        directory=resources.directory,
        metrics_registry=metrics_registry,
        metrics=PrometheusNotificationMetrics(metrics_registry),
        renderer=renderer,
        recorder=recorder,
        smtp=smtp,
    )


def build_use_cases(settings: NotificationsSettings, adapters: Adapters) -> UseCases:
    uow_factory, directory, renderer = adapters.unit_of_work, adapters.directory, adapters.renderer
    smtp, recorder, metrics = adapters.smtp, adapters.recorder, adapters.metrics
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
        max_in_hand=settings.dispatch_max_in_hand,
    )
    notify = NotifyUsers(
        uow_factory,
        renderer,
        metrics,
        on_committed=dispatcher.wake,
        hand_off=dispatcher,
        max_event_age=timedelta(seconds=settings.max_event_age_seconds),
    )
    return UseCases(notify, dispatcher, UserNotifications(uow_factory))


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
        client_id=process_client_id("notifications"),
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


def build_entry_points(
    settings: NotificationsSettings,
    resources: Resources,
    adapters: Adapters,
    use_cases: UseCases,
    start_up: StartUp,
    *,
    verifier: JwtVerifier,
    topics: dict[str, str] | None,
) -> GrpcServerBuilder:
    """The gRPC server, and beside it the dispatcher and (unless disabled) the consumer."""
    revocations = followed_revocation_list(settings, resources.redis, start_up)
    servicer = NotificationsServicer(use_cases.user_notifications)
    builder = (
        GrpcServerBuilder.from_settings(
            settings, service_names=[SERVICE_NAME], metrics_registry=adapters.metrics_registry
        )
        .add_servicer(
            functools.partial(
                notifications_pb2_grpc.add_NotificationsServiceServicer_to_server, servicer
            )
        )
        .with_auth(verifier, public_methods=PUBLIC_METHODS, is_revoked=revocations.is_revoked)
        .with_validation()
        .add_dependency_check(database_check(resources.engine))
        .add_dependency_check(
            DependencyCheck("dispatcher", use_cases.dispatcher.is_running, critical=False)
        )
    )
    # Stopped before the engine is disposed and the SMTP connections close.
    start_up.runs(use_cases.dispatcher.start, use_cases.dispatcher.stop)
    if settings.consumer_enabled:
        consumer = build_consumer(settings, use_cases.notify, adapters.metrics, topics=topics)
        start_up.runs_consumer(consumer, health=builder)
    return builder


async def start_server(
    settings: NotificationsSettings,
    *,
    metrics_registry: CollectorRegistry = REGISTRY,
    directory: ContactDirectory | None = None,
    topics: dict[str, str] | None = None,
) -> RunningGrpcServer:
    """The notifications gRPC server, the consumer and the dispatcher (``directory``: a
    test's contact directory instead of auth's; ``topics``: see :func:`build_consumer`)."""
    verifier = required_token_verifier(settings)
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up, directory=directory)
        adapters = build_adapters(settings, resources, start_up, metrics_registry)
        use_cases = build_use_cases(settings, adapters)
        builder = build_entry_points(
            settings, resources, adapters, use_cases, start_up, verifier=verifier, topics=topics
        )
        return await start_up.serve(builder)


async def serve(settings: NotificationsSettings) -> None:
    """gRPC, the consumer and the dispatcher until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)
