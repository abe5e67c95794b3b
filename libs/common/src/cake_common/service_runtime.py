"""The start-up steps every service runs before it serves, in one place.

Every composition root (``bootstrap.py``) has one shape (``tests/contracts/test_bootstrap.py``
checks it): its ``start_server`` takes the settings, then inside ``async with StartUp() as
start_up:`` opens the resources (:func:`open_migrated_database`, Redis, Kafka clients, gRPC
channels; each registered with :meth:`StartUp.closes`), builds the adapters, the use cases and
the entry points (the gRPC server; consumers and workers registered with
:meth:`StartUp.runs`) and returns :meth:`StartUp.serve`. Its ``serve`` command is
:func:`serve_until_signal` around that, which turns logging and tracing on first.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

import redis.asyncio
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_common.db import create_async_engine_for, database_probe, wait_for_database
from cake_common.lifecycle import STOP_SIGNALS, ShutdownHook, run_shutdown_hooks, wait_for_stop
from cake_common.logging import configure_logging, get_logger
from cake_common.metrics import MetricsServer, start_metrics_server
from cake_common.migrations import run_alembic_upgrade
from cake_common.redis import create_redis
from cake_common.settings import ServiceSettings
from cake_common.tracing import TracingHandle, configure_tracing, instrument_engine

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from cake_common.grpc_server import DependencyCheck, GrpcServerBuilder, RunningGrpcServer

_log = get_logger(__name__)

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def start_logging(settings: ServiceSettings) -> None:
    configure_logging(settings.log_level, settings.log_json, service_name=settings.service_name)


def start_tracing(settings: ServiceSettings) -> TracingHandle:
    """Tracing as configured (off unless ``otlp_endpoint`` is set). Call it before opening
    the database and building the gRPC server, so both are instrumented; register the
    handle's ``aclose`` as the server's FIRST shutdown hook (hooks run in reverse, so it
    runs last and flushes the spans of the shutdown itself)."""
    return configure_tracing(
        settings.service_name, settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio
    )


async def open_migrated_database(
    settings: ServiceSettings, *, script_location: str, relay_role: str | None = None
) -> AsyncEngine:
    """An engine for the service's own database, once it answers and is migrated to head.

    Waits (with backoff, up to ``startup_retry_seconds``) instead of crashing when the
    database is not up yet, so services can start in any order.
    """
    engine = create_async_engine_for(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_timeout_seconds=settings.database_pool_timeout_seconds,
        session_timeouts=settings.database_session_timeouts(),
    )
    instrument_engine(engine)  # no-op unless start_tracing turned tracing on
    _log.info("connecting to database", url=settings.database_url_for_display())
    await wait_for_database(engine, settings.startup_retry_seconds)
    # Alembic is synchronous: run it in a worker thread so the event loop stays free.
    await asyncio.to_thread(run_alembic_upgrade, settings.database_url, script_location, relay_role)
    return engine


def process_client_id(name: str) -> str:
    """A Kafka client id naming the service and this very process (host and pid), so the
    broker's view of a consumer group tells the replicas apart."""
    return f"cake-{name}-{socket.gethostname()}-{os.getpid()}"


def database_check(engine: AsyncEngine) -> DependencyCheck:
    """The service's own database as its critical dependency check (gRPC health), under the
    name every service reports it by (:data:`~cake_common.grpc_server.DATABASE_CHECK`)."""
    from cake_common.grpc_server import DATABASE_CHECK, DependencyCheck

    return DependencyCheck(DATABASE_CHECK, database_probe(engine), critical=True)


class BackgroundConsumer(Protocol):
    """A Kafka consumer run beside the server (``cake_common.consumer.EventConsumer``)."""

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None: ...

    async def stop(self) -> None: ...

    async def is_consuming(self) -> bool: ...


class Serving(Protocol):
    """A started server or worker: :class:`RunningGrpcServer` or :class:`RunningWorker`."""

    async def serve_until_signal(self) -> None: ...

    def request_stop(self) -> None: ...


class RunningWorker:
    """A started background worker without a gRPC server (a relay or consumer replica):
    runs until SIGTERM/SIGINT or :meth:`request_stop`, then runs its shutdown hooks in
    reverse order of registration and stops its metrics endpoint last."""

    def __init__(
        self,
        shutdown_hooks: Sequence[ShutdownHook],
        *,
        metrics_server: MetricsServer | None = None,
    ) -> None:
        self._shutdown_hooks = tuple(shutdown_hooks)
        self._metrics_server = metrics_server
        self._stop_requested = asyncio.Event()

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def serve_until_signal(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        await wait_for_stop(self._stop_requested, signals)
        await run_shutdown_hooks(self._shutdown_hooks)
        if self._metrics_server is not None:
            await self._metrics_server.stop()


class StartUp:
    """One start of a service process: what it opened and what runs in the background, closed
    in reverse order of registration, whether the start fails half way or the process stops.

    ``async with StartUp() as start_up:`` around the start: an exception inside the block
    (a database that never answered, a port that is taken, a worker that fails to start)
    closes everything registered so far, then propagates. Register a resource's close right
    after opening it (:meth:`closes`), and background workers (:meth:`runs`) after the
    resources they use: they are stopped before those close. :meth:`serve` (a gRPC server)
    or :meth:`work` (a process without one) then starts the workers once the process serves
    and hands the closing over to the running server or worker.
    """

    def __init__(self) -> None:
        self._closes: list[ShutdownHook] = []
        self._starts: list[Callable[[], None]] = []
        self._running: Serving | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            await self.close()

    def closes(self, close: ShutdownHook) -> None:
        """Run ``close`` when the process stops (or the start fails), before the closes
        registered earlier."""
        self._closes.append(close)

    async def open_database(
        self, settings: ServiceSettings, *, script_location: str, relay_role: str | None = None
    ) -> AsyncEngine:
        """The service's own database, migrated (:func:`open_migrated_database`); disposed of
        when the process stops."""
        engine = await open_migrated_database(
            settings, script_location=script_location, relay_role=relay_role
        )
        self.closes(engine.dispose)
        return engine

    def open_redis(self, url: str | SecretStr) -> redis.asyncio.Redis:
        """A Redis client (:func:`cake_common.redis.create_redis`), closed when the process
        stops."""
        client = create_redis(url)
        self.closes(client.aclose)
        return client

    def runs(self, start: Callable[[], None], stop: ShutdownHook) -> None:
        """A background worker (a consumer, a sweep, a relay): ``start`` once the process
        serves, ``stop`` before any resource registered earlier closes."""
        self._starts.append(start)
        self._closes.append(stop)

    def runs_consumer(
        self,
        consumer: BackgroundConsumer,
        *,
        health: GrpcServerBuilder | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """A Kafka consumer as a background worker (:meth:`runs`). With ``health`` (the
        gRPC server's builder) it is reported as the non-critical ``kafka_consumer``
        dependency: without Kafka the API still serves (health degraded) and the events
        wait. It restarts itself after transient failures; one that fails for good calls
        ``on_failure`` (default :meth:`request_stop`: the process stops)."""
        if health is not None:
            from cake_common.grpc_server import DependencyCheck

            health.add_dependency_check(
                DependencyCheck("kafka_consumer", consumer.is_consuming, critical=False)
            )
        self.runs(
            functools.partial(consumer.start, on_failure=on_failure or self.request_stop),
            consumer.stop,
        )

    def request_stop(self, _error: BaseException | None = None) -> None:
        """Stop the process (e.g. a worker's ``on_failure``): the running server or worker
        shuts down as on SIGTERM."""
        if self._running is not None:
            self._running.request_stop()

    async def close(self) -> None:
        """Everything registered, in reverse order; once (later calls find nothing)."""
        closes, self._closes = self._closes, []
        await run_shutdown_hooks(closes)

    async def serve(self, builder: GrpcServerBuilder) -> RunningGrpcServer:
        """Start the gRPC server ``builder`` describes, then the workers; ``stop()`` on the
        result stops the server, then closes everything registered here."""
        builder.add_shutdown_hook(self.close)
        running = await builder.start()
        self._running = running
        await self._start_workers(running.stop)
        return running

    async def work(
        self,
        settings: ServiceSettings,
        *,
        metrics_registry: CollectorRegistry | None = None,
    ) -> RunningWorker:
        """A process without a gRPC server (a relay or consumer replica): its metrics on
        ``metrics_port`` if set, then the workers; it runs until SIGTERM/SIGINT or
        :meth:`request_stop`."""
        metrics_server = None
        if settings.metrics_port is not None:
            if metrics_registry is None:
                from prometheus_client import REGISTRY

                metrics_registry = REGISTRY
            metrics_server = start_metrics_server(
                settings.metrics_port, settings.grpc_host, metrics_registry
            )
        worker = RunningWorker([self.close], metrics_server=metrics_server)
        self._running = worker

        async def stop() -> None:
            await self.close()
            if metrics_server is not None:
                await metrics_server.stop()

        await self._start_workers(stop)
        return worker

    async def _start_workers(self, stop: Callable[[], Awaitable[None]]) -> None:
        try:
            for start in self._starts:
                start()
        except BaseException:
            await stop()
            raise


async def serve_until_signal(
    settings: SettingsT, start: Callable[[SettingsT], Awaitable[Serving]]
) -> None:
    """A service's ``serve`` command (or a worker's): logging and tracing on, the server or
    worker ``start`` builds running until SIGTERM/SIGINT with its start-up heap frozen
    (:func:`freeze_start_up_objects`), then the remaining spans flushed."""
    start_logging(settings)
    tracing = start_tracing(settings)
    try:
        running = await start(settings)
        freeze_start_up_objects()
        await running.serve_until_signal()
    finally:
        await tracing.aclose()


def freeze_start_up_objects() -> None:
    """Collect the start-up's garbage, then leave every object alive at this point (modules,
    settings, clients, servicers: nearly all of a process's heap) out of later collections.

    A full (generation 2) collection walks every tracked object, most of them made by the
    imports and the start-up; in an auth worker serving profile reads each one stopped the
    worker for 70-120 ms (measured with a ``gc.callbacks`` probe at 1,759 reads/s,
    docs/performance.md): the slowest reads of a run. Frozen, the objects stay alive as they
    would have (the start-up's are never garbage), and a full collection walks only what was
    made since (3-16 ms under the same load). What CPython's documentation of
    ``gc.freeze()`` describes for pre-forked servers, done once the process is ready.
    """
    gc.collect()
    gc.freeze()


def kill_this_process() -> None:
    """End this process the way a crash does (SIGKILL: no clean-up, no answer to callers);
    the deterministic fault hooks of the drills use it."""
    os.kill(os.getpid(), signal.SIGKILL)


def run_service_cli(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str | None,
    settings: Callable[[], SettingsT],
    processes: Mapping[str, tuple[str, Callable[[SettingsT], Coroutine[Any, Any, None]]]],
    migrate: Callable[[SettingsT], None],
) -> None:
    """A service's command line: one command per long-running process (``serve`` and any
    worker, each ``name: (help, run)``) plus ``migrate``, all reading the service's own
    settings. Parsed with argparse; a service with operator commands of its own (auth)
    builds its parser itself."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _run) in processes.items():
        commands.add_parser(name, help=help_text)
    commands.add_parser("migrate", help="apply database migrations and exit")
    args = parser.parse_args(argv)

    loaded = settings()
    if args.command == "migrate":
        start_logging(loaded)
        migrate(loaded)
        return
    _help, run = processes[args.command]
    asyncio.run(run(loaded))
