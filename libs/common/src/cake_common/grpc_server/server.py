"""Build, run and gracefully stop a ``grpc.aio`` server with health, reflection and interceptors."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Self

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from cake_common.grpc_server.auth import AuthInterceptor, RevocationCheck
from cake_common.grpc_server.call_scope import ScopedInterceptorChain, ScopedServerInterceptor
from cake_common.grpc_server.health import DependencyCheck, DependencyWatcher, ServiceHealth
from cake_common.grpc_server.interceptors import (
    ErrorMappingInterceptor,
    RequestIdEcho,
    RequestIdInterceptor,
    ValidationInterceptor,
)
from cake_common.grpc_server.metrics import MetricsInterceptor
from cake_common.jwt import JwtVerifier
from cake_common.lifecycle import ShutdownHook, run_shutdown_hooks, wait_for_stop
from cake_common.logging import get_logger
from cake_common.metrics import MetricsServer, start_metrics_server
from cake_common.settings import ServiceSettings
from cake_common.tracing import grpc_server_interceptor
from cake_common.validation import RequestValidator
from cake_common.workers import multiprocess_metrics

ServicerRegistration = Callable[[grpc.aio.Server], None]
"""Adds one servicer, e.g. ``lambda s: add_AuthServiceServicer_to_server(servicer, s)``."""


_log = get_logger(__name__)

_SERVER_OPTIONS = (
    # gRPC enables SO_REUSEPORT by default, which lets a second process bind the same port
    # silently and steal half the traffic; a clash must fail loudly instead.
    ("grpc.so_reuseport", 0),
)


class RunningGrpcServer:
    """A started server; stop it with :meth:`stop` or let :meth:`serve_until_signal` do it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        *,
        port: int,
        health: ServiceHealth,
        watcher: DependencyWatcher | None,
        grace_seconds: float,
        shutdown_hooks: Sequence[ShutdownHook],
        metrics_server: MetricsServer | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health
        self.metrics_port = metrics_server.port if metrics_server is not None else None
        self._metrics_server = metrics_server
        self._watcher = watcher
        self._grace_seconds = grace_seconds
        self._shutdown_hooks = tuple(shutdown_hooks)
        self._stopped: asyncio.Future[None] | None = None
        self._stop_requested = asyncio.Event()

    async def stop(self) -> None:
        """Graceful shutdown; safe to call more than once or concurrently.

        Health goes NOT_SERVING first so balancers stop routing here, in-flight calls get
        ``grace_seconds`` to finish, then shutdown hooks run in reverse order of
        registration (close what was opened last first).
        """
        self._stop_requested.set()
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop_once())
        await asyncio.shield(self._stopped)

    async def _stop_once(self) -> None:
        _log.info("grpc server stopping", grace_seconds=self._grace_seconds)
        if self._watcher is not None:
            await self._watcher.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self._grace_seconds)
        await run_shutdown_hooks(self._shutdown_hooks)
        if self._metrics_server is not None:
            # Last, so the final counts can still be scraped while draining.
            await self._metrics_server.stop()
        _log.info("grpc server stopped")

    def request_stop(self) -> None:
        """Ask :meth:`serve_until_signal` to stop the server (e.g. after a fatal error)."""
        self._stop_requested.set()

    async def serve_until_signal(
        self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Serve until one of ``signals`` arrives or a stop is requested, then :meth:`stop`."""
        await wait_for_stop(self._stop_requested, signals)
        await self.stop()


class GrpcServerBuilder:
    """Collects servicers, interceptors, checks and hooks, then starts the server.

    Interceptors always run in this order (all but tracing and the added ones that are not
    :class:`ScopedServerInterceptor` as one :class:`ScopedInterceptorChain`): tracing (if
    :func:`~cake_common.tracing.configure_tracing` turned it on before :meth:`start`) →
    request id → metrics (if :meth:`with_metrics`) → error mapping → auth (if
    :meth:`with_auth`) → validation (if :meth:`with_validation`) → :meth:`add_interceptor`
    ones in the order added.
    """

    def __init__(
        self,
        *,
        service_names: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        grace_seconds: float = 10.0,
        request_id_echo: RequestIdEcho = "initial_metadata",
    ) -> None:
        self._service_names = tuple(service_names)
        self._request_id_echo: RequestIdEcho = request_id_echo
        self._host = host
        self._port = port
        self._grace_seconds = grace_seconds
        self._registrations: list[ServicerRegistration] = []
        self._auth: AuthInterceptor | None = None
        self._validation: ValidationInterceptor | None = None
        self._extra_interceptors: list[grpc.aio.ServerInterceptor] = []
        self._metrics_registry: CollectorRegistry | None = None
        self._metrics_port: int | None = None
        self._checks: list[DependencyCheck] = []
        self._check_interval = 5.0
        self._shutdown_hooks: list[ShutdownHook] = []
        self._reflection = True
        self._addresses: tuple[str, ...] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: ServiceSettings,
        *,
        service_names: Sequence[str],
        metrics_registry: CollectorRegistry = REGISTRY,
        request_id_echo: RequestIdEcho = "initial_metadata",
    ) -> Self:
        """Host, port and grace from settings; metrics on ``metrics_port`` if it is set."""
        builder = cls(
            service_names=service_names,
            host=settings.grpc_host,
            port=settings.grpc_port,
            grace_seconds=settings.shutdown_grace_seconds,
            request_id_echo=request_id_echo,
        )
        if settings.metrics_port is not None:
            # A worker of a multi-process service records only; its supervisor serves the
            # aggregate of every worker on the metrics port (cake_common.workers).
            port = None if multiprocess_metrics() else settings.metrics_port
            builder.with_metrics(metrics_registry, port=port)
        builder.with_reflection(settings.grpc_reflection)
        return builder

    def with_reflection(self, enabled: bool) -> Self:
        """Serve gRPC server reflection (tooling such as grpcurl); off in production, where
        it would hand every caller the full API surface."""
        self._reflection = enabled
        return self

    def listen_on(self, addresses: Sequence[str]) -> Self:
        """Listen on these gRPC addresses (``host:port``, ``unix:/path``) instead of
        ``host:port``; a worker of a multi-process service listens on its own socket."""
        if not addresses:
            raise ValueError("a gRPC server needs at least one address")
        self._addresses = tuple(addresses)
        return self

    def add_servicer(self, register: ServicerRegistration) -> Self:
        self._registrations.append(register)
        return self

    def with_auth(
        self,
        verifier: JwtVerifier,
        *,
        public_methods: Iterable[str] = (),
        optional_methods: Iterable[str] = (),
        is_revoked: RevocationCheck | None = None,
    ) -> Self:
        self._auth = AuthInterceptor(
            verifier,
            public_methods=public_methods,
            optional_methods=optional_methods,
            is_revoked=is_revoked,
        )
        return self

    def with_metrics(
        self, registry: CollectorRegistry = REGISTRY, *, port: int | None = None
    ) -> Self:
        """Record per-method call counts and latency on ``registry``; if ``port`` is given,
        also serve the registry at ``http://<host>:<port>/metrics``."""
        self._metrics_registry = registry
        self._metrics_port = port
        return self

    def with_validation(self, validator: RequestValidator | None = None) -> Self:
        self._validation = ValidationInterceptor(validator or RequestValidator())
        return self

    def add_interceptor(self, interceptor: grpc.aio.ServerInterceptor) -> Self:
        self._extra_interceptors.append(interceptor)
        return self

    def add_dependency_check(self, check: DependencyCheck) -> Self:
        self._checks.append(check)
        return self

    def with_check_interval(self, seconds: float) -> Self:
        self._check_interval = seconds
        return self

    def add_shutdown_hook(self, hook: ShutdownHook) -> Self:
        self._shutdown_hooks.append(hook)
        return self

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        chain: list[grpc.aio.ServerInterceptor] = []
        tracing = grpc_server_interceptor()
        if tracing is not None:
            # Outermost: the SERVER span covers the whole call, errors and auth included.
            chain.append(tracing)
        scoped: list[ScopedServerInterceptor] = [RequestIdInterceptor(echo=self._request_id_echo)]
        if self._metrics_registry is not None:
            scoped.append(MetricsInterceptor(self._metrics_registry))
        scoped.append(ErrorMappingInterceptor())
        if self._auth is not None:
            scoped.append(self._auth)
        if self._validation is not None:
            scoped.append(self._validation)
        extras = list(self._extra_interceptors)
        while extras and isinstance(first := extras[0], ScopedServerInterceptor):
            scoped.append(first)
            extras.pop(0)
        # One grpc.aio interceptor for all of them (same scopes, same order): see
        # ScopedInterceptorChain for what that saves per call.
        chain.append(ScopedInterceptorChain(scoped))
        return chain + extras

    async def start(self) -> RunningGrpcServer:
        """Bind, register everything and start serving; returns once listening.

        Overall health is SERVING only after the first round of dependency checks passes.
        """
        server = grpc.aio.server(interceptors=self._interceptors(), options=_SERVER_OPTIONS)
        for register in self._registrations:
            register(server)

        service_health = ServiceHealth(self._service_names)
        await service_health.initialize()
        health_pb2_grpc.add_HealthServicer_to_server(service_health.servicer, server)
        if self._reflection:
            reflection.enable_server_reflection(
                (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )

        addresses = self._addresses or (f"{self._host}:{self._port}",)
        port = 0
        for address in addresses:
            bound = server.add_insecure_port(address)
            if bound == 0:
                raise RuntimeError(f"could not bind gRPC server to {address}")
            if not address.startswith("unix:") and port == 0:
                port = bound
        await server.start()
        metrics_server = None
        watcher = None
        try:
            if self._metrics_registry is not None and self._metrics_port is not None:
                metrics_server = start_metrics_server(
                    self._metrics_port, self._host, self._metrics_registry
                )
            if self._checks:
                watcher = DependencyWatcher(
                    service_health, self._checks, interval_seconds=self._check_interval
                )
                await watcher.check_all()
                watcher.start()
        except BaseException:
            # Half-started: release the port (and the metrics port) before failing.
            await server.stop(None)
            if metrics_server is not None:
                await metrics_server.stop()
            raise
        await service_health.set_ready(True)
        _log.info(
            "grpc server started",
            address=f"{self._host}:{port}" if self._addresses is None else list(addresses),
            services=self._service_names,
        )
        return RunningGrpcServer(
            server,
            port=port,
            health=service_health,
            watcher=watcher,
            grace_seconds=self._grace_seconds,
            shutdown_hooks=self._shutdown_hooks,
            metrics_server=metrics_server,
        )


async def run_grpc_server(
    settings: ServiceSettings,
    *,
    service_names: Sequence[str],
    registrations: Iterable[ServicerRegistration],
    verifier: JwtVerifier | None = None,
    public_methods: Iterable[str] = (),
    is_revoked: RevocationCheck | None = None,
    validate_requests: bool = True,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    dependency_checks: Iterable[DependencyCheck] = (),
    shutdown_hooks: Iterable[ShutdownHook] = (),
) -> None:
    """Start a server from ``settings`` and serve until SIGTERM/SIGINT, then stop gracefully."""
    builder = GrpcServerBuilder.from_settings(settings, service_names=service_names)
    for register in registrations:
        builder.add_servicer(register)
    if verifier is not None:
        builder.with_auth(verifier, public_methods=public_methods, is_revoked=is_revoked)
    if validate_requests:
        builder.with_validation()
    for interceptor in interceptors:
        builder.add_interceptor(interceptor)
    for check in dependency_checks:
        builder.add_dependency_check(check)
    for hook in shutdown_hooks:
        builder.add_shutdown_hook(hook)
    running = await builder.start()
    await running.serve_until_signal()
