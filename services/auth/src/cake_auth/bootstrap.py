"""Composition root of the auth service: the one place that builds and wires everything.
Its shape, the same in every service, is described in ``cake_common.service_runtime``.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio
import uvloop
from cake.auth.v1 import auth_pb2_grpc
from cake_common.db import create_session_factory
from cake_common.grpc_server import DependencyCheck, GrpcServerBuilder, RunningGrpcServer
from cake_common.outbox import OutboxWriter
from cake_common.redis import redis_probe
from cake_common.revocation import RevocationList
from cake_common.service_runtime import (
    StartUp,
    database_check,
    serve_until_signal,
    start_logging,
)
from cake_common.token_auth import revocation_list, stream_redis, token_verifier
from cake_common.workers import (
    Ready,
    WorkerPool,
    refuse_sockets_in_use,
    supervise,
    worker_socket_path,
)
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_auth.adapters.login_records import SqlLoginRecords
from cake_auth.adapters.login_throttle import RedisLoginThrottle
from cake_auth.adapters.password_hashers import (
    LanesHasher,
    available_cpus,
    odd_2a_verifier,
    open_password_hasher,
)
from cake_auth.adapters.profile_cache import RedisProfileCache
from cake_auth.adapters.redis_guard import RedisGuard
from cake_auth.adapters.revocations import SharedRevocations
from cake_auth.adapters.shared_hasher import HashServer, RemoteLanesHasher, hasher_socket_path
from cake_auth.adapters.signing_keys import (
    Es256TokenIssuer,
    JwksFile,
    SigningKey,
    SigningKeyError,
    ensure_published,
    load_signing_key,
)
from cake_auth.adapters.unit_of_work import SqlAuthUnitOfWork
from cake_auth.domain.login import DelayPolicy
from cake_auth.domain.tokens import AccessToken
from cake_auth.entrypoints.grpc.servicer import AUTH_SERVICE, AuthServicer
from cake_auth.metrics import AuthMetrics
from cake_auth.service.accounts import UserAccounts
from cake_auth.service.admission import HashAdmission
from cake_auth.service.discovery import OpenIdConfiguration
from cake_auth.service.ports import PasswordHasher, UnitOfWorkFactory
from cake_auth.service.service_accounts import ServiceAccounts, ServiceAccountUnitOfWorkFactory
from cake_auth.service.use_cases import AuthUseCases
from cake_auth.settings import AuthSettings

T = TypeVar("T")

SERVICE_NAME = AUTH_SERVICE
MIGRATIONS = "cake_auth:migrations"


def _required_file(value: Path | None, variable: str) -> Path:
    if value is None:
        raise SigningKeyError(
            f"{variable} is not set; run `cake-auth gen-keys --dir DIR` and point "
            "CAKE_AUTH_JWT_PRIVATE_KEY_FILE and CAKE_AUTH_JWKS_FILE at the files written in DIR"
        )
    return value


def _signing_key(settings: AuthSettings) -> tuple[SigningKey, Path]:
    signing_key = load_signing_key(
        _required_file(settings.jwt_private_key_file, "CAKE_AUTH_JWT_PRIVATE_KEY_FILE")
    )
    jwks_file = _required_file(settings.jwks_file, "CAKE_AUTH_JWKS_FILE")
    ensure_published(signing_key, jwks_file)
    return signing_key, jwks_file


@dataclass(frozen=True, slots=True)
class Resources:
    engine: AsyncEngine
    redis: redis.asyncio.Redis
    hasher: PasswordHasher
    """The password hashing workers (threads or processes)."""


@dataclass(frozen=True, slots=True)
class Adapters:
    """What both the server and the operator commands need."""

    metrics: AuthMetrics
    unit_of_work: UnitOfWorkFactory
    login_records: SqlLoginRecords
    service_accounts_unit_of_work: ServiceAccountUnitOfWorkFactory
    hasher: PasswordHasher
    redis: redis.asyncio.Redis
    guard: RedisGuard
    profile_cache: RedisProfileCache
    revocations: RevocationList
    accounts: UserAccounts
    checks: list[DependencyCheck]


async def open_resources(
    settings: AuthSettings, start_up: StartUp, *, shared_hasher: Path | None = None
) -> Resources:
    """The database, Redis and the hasher: the supervisor's engines at ``shared_hasher`` (a
    worker of a unit that shares them), else engines of this process's own."""
    engine = await start_up.open_database(
        settings, script_location=MIGRATIONS, relay_role=settings.relay_role
    )
    redis_client = start_up.open_redis(settings.redis_url)
    hasher: PasswordHasher
    if shared_hasher is not None:
        remote = RemoteLanesHasher(
            shared_hasher,
            settings.bcrypt_cost,
            # This worker's share of the lanes: what its admission control counts on.
            concurrency=(settings.password_hash_workers or 1) * settings.password_hash_lanes,
            odd_2a_verify=odd_2a_verifier(),
        )
        start_up.closes(remote.close)
        await remote.connect()
        hasher = remote
    else:
        hasher = await open_password_hasher(
            settings.password_hasher,
            cost=settings.bcrypt_cost,
            workers=settings.password_hash_workers,
            lanes=settings.password_hash_lanes,
            fallback=settings.password_hasher_fallback,
            partner_wait_seconds=settings.password_hash_partner_wait_ms / 1000,
        )
        start_up.closes(hasher.close)
    return Resources(engine=engine, redis=redis_client, hasher=hasher)


def build_adapters(
    settings: AuthSettings, resources: Resources, metrics_registry: CollectorRegistry
) -> Adapters:
    metrics = AuthMetrics(metrics_registry)
    session_factory = create_session_factory(resources.engine)
    outbox_writer = OutboxWriter()

    def unit_of_work() -> SqlAuthUnitOfWork:
        return SqlAuthUnitOfWork(session_factory, outbox_writer)

    guard = RedisGuard(metrics)
    profile_cache = RedisProfileCache(
        resources.redis,
        guard,
        metrics,
        ttl_seconds=settings.profile_cache_ttl_seconds,
        key_prefix=settings.redis_key_prefix,
        stream_client=stream_redis(settings.redis_url),
        memory_seconds=settings.profile_memory_seconds,
    )
    return Adapters(
        metrics=metrics,
        unit_of_work=unit_of_work,
        login_records=SqlLoginRecords(resources.engine),
        service_accounts_unit_of_work=unit_of_work,
        hasher=resources.hasher,
        redis=resources.redis,
        guard=guard,
        profile_cache=profile_cache,
        revocations=revocation_list(settings, resources.redis),
        accounts=UserAccounts(
            unit_of_work=unit_of_work,
            hasher=resources.hasher,
            profile_cache=profile_cache,
            metrics=metrics,
        ),
        checks=[
            database_check(resources.engine),
            # Redis is optional: its outage degrades the service, it does not stop it.
            DependencyCheck("redis", redis_probe(resources.redis), critical=False),
        ],
    )


@asynccontextmanager
async def _operator_adapters(settings: AuthSettings) -> AsyncIterator[Adapters]:
    """The adapters on a migrated database for one operator command, closed after it."""
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up)
        adapters = build_adapters(settings, resources, CollectorRegistry())
        # Their stream connections close before the Redis client (closes run in reverse).
        start_up.closes(adapters.revocations.aclose)
        start_up.closes(adapters.profile_cache.aclose)
        try:
            yield adapters
        finally:
            await start_up.close()


@asynccontextmanager
async def open_accounts(settings: AuthSettings) -> AsyncIterator[UserAccounts]:
    """User administration for operator commands (``create-admin``), on a migrated database."""
    async with _operator_adapters(settings) as adapters:
        yield adapters.accounts


def hash_admission(
    settings: AuthSettings,
    metrics: AuthMetrics,
    *,
    concurrency: int,
    initial_hash_seconds: float,
) -> HashAdmission:
    """The admission in front of a hasher computing ``concurrency`` hashes at once;
    ``initial_hash_seconds`` (one hash timed at start) sizes its queue until the hasher's
    real throughput has been measured."""
    return HashAdmission(
        workers=concurrency,
        max_waiting=settings.hash_queue_max_waiting,
        max_wait_seconds=settings.hash_queue_max_wait_seconds,
        initial_hash_seconds=initial_hash_seconds,
        metrics=metrics,
    )


def _token_issuer(settings: AuthSettings, signing_key: SigningKey) -> Es256TokenIssuer:
    return Es256TokenIssuer(
        signing_key,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_seconds=settings.access_token_ttl_seconds,
        service_ttl_seconds=settings.service_token_ttl_seconds,
    )


def _shared_revocations(settings: AuthSettings, infrastructure: Adapters) -> SharedRevocations:
    return SharedRevocations(
        infrastructure.revocations,
        infrastructure.metrics,
        access_ttl_seconds=settings.access_token_ttl_seconds,
        leeway_seconds=settings.jwt_leeway_seconds,
    )


def _service_accounts(
    settings: AuthSettings, infrastructure: Adapters, signing_key: SigningKey | None
) -> ServiceAccounts:
    return ServiceAccounts(
        unit_of_work=infrastructure.service_accounts_unit_of_work,
        tokens=_token_issuer(settings, signing_key) if signing_key is not None else _NoTokens(),
        revocations=_shared_revocations(settings, infrastructure),
        metrics=infrastructure.metrics,
    )


class _NoTokens:
    """Operator commands manage accounts; they never sign a token."""

    def issue_service(
        self, client_id: str, scopes: Sequence[str], *, session_id: str
    ) -> AccessToken:
        raise RuntimeError("operator commands do not issue tokens")


@asynccontextmanager
async def open_service_accounts(settings: AuthSettings) -> AsyncIterator[ServiceAccounts]:
    """Service-account administration for operator commands, on a migrated database."""
    async with _operator_adapters(settings) as adapters:
        yield _service_accounts(settings, adapters, None)


async def build_use_cases(
    settings: AuthSettings, infrastructure: Adapters, signing_key: SigningKey, jwks: Path
) -> AuthUseCases:
    # Unknown accounts are checked against this, at the cost of a real hash; timed, it
    # also gives the admission its first idea of the hash cost on this box.
    started = time.perf_counter()
    dummy_password_hash = await infrastructure.hasher.hash(secrets.token_urlsafe(16))
    initial_hash_seconds = max(time.perf_counter() - started, 1e-3)
    admission = hash_admission(
        settings,
        infrastructure.metrics,
        concurrency=infrastructure.hasher.concurrency,
        initial_hash_seconds=initial_hash_seconds,
    )
    # The RPCs' hashes go through the admission's meter (registrations' too): it measures
    # what the threads serve. Operator commands keep the plain hasher (no admission).
    hasher = admission.metered(infrastructure.hasher)
    return AuthUseCases(
        accounts=UserAccounts(
            unit_of_work=infrastructure.unit_of_work,
            hasher=hasher,
            profile_cache=infrastructure.profile_cache,
            metrics=infrastructure.metrics,
        ),
        unit_of_work=infrastructure.unit_of_work,
        login_records=infrastructure.login_records,
        hasher=hasher,
        admission=admission,
        tokens=_token_issuer(settings, signing_key),
        profile_cache=infrastructure.profile_cache,
        login_throttle=RedisLoginThrottle(
            infrastructure.redis,
            infrastructure.guard,
            account_policy=DelayPolicy(
                free_failures=settings.login_max_failures,
                base_delay_seconds=settings.login_delay_base_seconds,
                max_delay_seconds=settings.login_delay_max_seconds,
                window_seconds=settings.login_failure_window_seconds,
            ),
            ip_policy=DelayPolicy(
                free_failures=settings.login_ip_max_failures,
                base_delay_seconds=settings.login_delay_base_seconds,
                max_delay_seconds=settings.login_ip_delay_max_seconds,
                window_seconds=settings.login_failure_window_seconds,
            ),
            key_prefix=settings.redis_key_prefix,
        ),
        revocations=_shared_revocations(settings, infrastructure),
        session_lifetime_seconds=settings.session_lifetime_seconds,
        published_keys=JwksFile(jwks, signing_key.kid),
        dummy_password_hash=dummy_password_hash,
        metrics=infrastructure.metrics,
    )


def build_entry_points(
    settings: AuthSettings,
    adapters: Adapters,
    use_cases: AuthUseCases,
    start_up: StartUp,
    *,
    signing_key: SigningKey,
    jwks_file: Path,
    metrics_registry: CollectorRegistry,
) -> GrpcServerBuilder:
    """The gRPC server, and beside it the followers of the revocation and profile streams."""
    start_up.runs(adapters.revocations.start, adapters.revocations.aclose)
    start_up.runs(adapters.profile_cache.start, adapters.profile_cache.aclose)
    servicer = AuthServicer(
        use_cases,
        _service_accounts(settings, adapters, signing_key),
        OpenIdConfiguration.for_gateway(issuer=settings.jwt_issuer, public_url=settings.public_url),
    )
    builder = (
        GrpcServerBuilder.from_settings(
            settings,
            service_names=[SERVICE_NAME],
            metrics_registry=metrics_registry,
            # The request id rides on the status (no extra batch per call: measurably
            # cheaper profile reads, bench/login_profile.py); REST clients get it from
            # Envoy, which echoes the id it set, either way.
            request_id_echo="trailing_metadata",
        )
        .add_servicer(
            lambda server: auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
        )
        .with_auth(token_verifier(settings, jwks_file), is_revoked=adapters.revocations.is_revoked)
        .with_validation()
    )
    for check in adapters.checks:
        builder.add_dependency_check(check)
    return builder


async def start_server(
    settings: AuthSettings,
    *,
    metrics_registry: CollectorRegistry = REGISTRY,
    listen_addresses: Sequence[str] | None = None,
    shared_hasher: Path | None = None,
) -> RunningGrpcServer:
    """The auth gRPC server, listening on ``grpc_host:grpc_port`` (port 0: any free port)
    or on ``listen_addresses`` (a worker process: its socket, worker 0 also the port);
    hashing on the supervisor's engines at ``shared_hasher`` when given.

    Stop it with ``await running.stop()``; that also closes the database, Redis and the
    hashing workers.
    """
    # Keys first: a misconfigured key fails in milliseconds, not after a migration.
    signing_key, jwks_file = _signing_key(settings)
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up, shared_hasher=shared_hasher)
        adapters = build_adapters(settings, resources, metrics_registry)
        use_cases = await build_use_cases(settings, adapters, signing_key, jwks_file)
        builder = build_entry_points(
            settings,
            adapters,
            use_cases,
            start_up,
            signing_key=signing_key,
            jwks_file=jwks_file,
            metrics_registry=metrics_registry,
        )
        if listen_addresses is not None:
            builder.listen_on(listen_addresses)
        return await start_up.serve(builder)


def worker_settings(settings: AuthSettings) -> AuthSettings:
    """One worker process's settings: its share of the hashing threads and of the admission
    queue (rounded up), so the service admits what the settings say in total."""
    processes = settings.workers
    threads = settings.password_hash_workers or available_cpus()
    waiting = settings.hash_queue_max_waiting
    return settings.model_copy(
        update={
            "password_hash_workers": max(1, -(-threads // processes)),
            # Measured (None): each worker measures its own threads' throughput.
            "hash_queue_max_waiting": None if waiting is None else -(-waiting // processes),
        }
    )


def worker_addresses(settings: AuthSettings, index: int) -> list[str]:
    """Worker ``index`` listens on its socket; worker 0 also on ``grpc_host:grpc_port``."""
    assert settings.worker_socket_dir is not None  # the settings validator requires it
    socket = worker_socket_path(settings.worker_socket_dir, settings.service_name, index)
    addresses = [f"unix:{socket}"]
    if index == 0:
        addresses.append(f"{settings.grpc_host}:{settings.grpc_port}")
    return addresses


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop's event loop (libuv, in C) instead of asyncio's own.

    An auth process spends most of a profile read in its event loop and in gRPC's wake-ups
    of it (py-spy of a worker: asyncio's Python frames and the loop's socket I/O ≈ 15 % of
    its busy time); on uvloop, ``bench/profile_reads.py --profile dev --vegeta`` at
    saturation measured auth's CPU per read 5-10 % lower in three pairs of runs back to back
    with asyncio's loop (0.522 / 0.485 / 0.532 ms against 0.570 / 0.538 / 0.562 ms, a shared
    box at load average 2.7-11.7). Only the auth processes run on it so far.
    """
    return uvloop.run(main)


def shared_hasher_path(settings: AuthSettings) -> Path | None:
    """Where the supervisor serves the hashing engines to its workers, or None when each
    process runs its own (one process, another hasher, or ``password_hash_shared`` off)."""
    if (
        settings.workers == 1
        or settings.password_hasher != "lanes"  # noqa: S105 (the hasher's name)
        or not settings.password_hash_shared
    ):
        return None
    assert settings.worker_socket_dir is not None  # the settings validator requires it
    return hasher_socket_path(settings.worker_socket_dir, settings.service_name)


def serve_worker(settings: AuthSettings, index: int, ready: Ready) -> None:
    """The body of worker process ``index`` (spawned by :func:`serve`)."""
    addresses = worker_addresses(settings, index)
    shared_hasher = shared_hasher_path(settings)

    async def start(own: AuthSettings) -> RunningGrpcServer:
        running = await start_server(own, listen_addresses=addresses, shared_hasher=shared_hasher)
        ready()
        return running

    run_event_loop(serve_until_signal(worker_settings(settings), start))


async def _serve_shared_hasher(
    settings: AuthSettings, path: Path
) -> tuple[HashServer, LanesHasher]:
    """The supervisor's hashing engines (every hashing thread of the unit), served on ``path``."""
    hasher = LanesHasher(
        settings.bcrypt_cost,
        settings.password_hash_workers or available_cpus(),
        settings.password_hash_lanes,
        odd_2a_verify=odd_2a_verifier(),
        partner_wait_seconds=settings.password_hash_partner_wait_ms / 1000,
    )
    server = HashServer(hasher, path)
    try:
        await server.start()
    except BaseException:
        await hasher.close()
        raise
    return server, hasher


async def serve(settings: AuthSettings) -> None:
    if settings.workers == 1:
        await serve_until_signal(settings, start_server)
        return
    start_logging(settings)
    assert settings.worker_socket_dir is not None  # the settings validator requires it
    settings.worker_socket_dir.mkdir(parents=True, exist_ok=True)
    refuse_sockets_in_use(
        worker_socket_path(settings.worker_socket_dir, settings.service_name, index)
        for index in range(settings.workers)
    )
    shared = shared_hasher_path(settings)
    if shared is not None:
        refuse_sockets_in_use([shared])
    engines = None if shared is None else await _serve_shared_hasher(settings, shared)
    try:
        await supervise(
            WorkerPool(
                name=settings.service_name,
                count=settings.workers,
                target=functools.partial(serve_worker, settings),
                metrics_host=settings.grpc_host,
                metrics_port=settings.metrics_port,
                grace_seconds=settings.shutdown_grace_seconds,
            )
        )
    finally:
        if engines is not None:
            server, hasher = engines
            await server.close()  # after the workers: nothing asks any more
            await hasher.close()
