"""Composition root of the bank simulator: the one place that builds and wires everything."""

from __future__ import annotations

from cake.payments.v1 import payments_pb2_grpc
from cake_common.db import create_session_factory, database_probe
from cake_common.grpc_server import DependencyCheck, GrpcServerBuilder, RunningGrpcServer
from cake_common.service_runtime import (
    kill_this_process,
    open_migrated_database,
    serve_until_signal,
)
from prometheus_client import REGISTRY, CollectorRegistry

from cake_payments.adapters.unit_of_work import SqlPaymentsUnitOfWork
from cake_payments.entrypoints.grpc.servicer import SERVICE_NAME, PaymentsServicer
from cake_payments.service.charges import Bank, FaultSwitch, ProcessKiller
from cake_payments.settings import PaymentsSettings

MIGRATIONS = "cake_payments:migrations"


async def start_server(
    settings: PaymentsSettings,
    *,
    metrics_registry: CollectorRegistry = REGISTRY,
    crash: ProcessKiller = kill_this_process,
) -> RunningGrpcServer:
    """The bank's gRPC server on ``grpc_host:grpc_port`` (port 0: any free port), its
    database migrated first. Internal only: it sits behind promotions, never the gateway."""
    engine = await open_migrated_database(settings, script_location=MIGRATIONS)
    try:
        session_factory = create_session_factory(engine)
        faults = FaultSwitch(settings.fault_rules())
        bank = Bank(lambda: SqlPaymentsUnitOfWork(session_factory), faults, crash)
        servicer = PaymentsServicer(bank, faults)
        builder = (
            GrpcServerBuilder.from_settings(
                settings, service_names=[SERVICE_NAME], metrics_registry=metrics_registry
            )
            .add_servicer(
                lambda server: payments_pb2_grpc.add_PaymentsServiceServicer_to_server(
                    servicer, server
                )
            )
            .with_validation()
            .add_dependency_check(
                DependencyCheck("postgres", database_probe(engine), critical=True)
            )
            .add_shutdown_hook(engine.dispose)
        )
        return await builder.start()
    except BaseException:
        await engine.dispose()
        raise


async def serve(settings: PaymentsSettings) -> None:
    """gRPC until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)
