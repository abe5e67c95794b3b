"""Composition root of the bank simulator: the one place that builds and wires everything.
Its shape, the same in every service, is described in ``cake_common.service_runtime``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cake.payments.v1 import payments_pb2_grpc
from cake_common.db import create_session_factory
from cake_common.grpc_server import GrpcServerBuilder, RunningGrpcServer
from cake_common.service_runtime import (
    StartUp,
    database_check,
    kill_this_process,
    serve_until_signal,
)
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from cake_payments.adapters.unit_of_work import SqlPaymentsUnitOfWork
from cake_payments.entrypoints.grpc.servicer import SERVICE_NAME, PaymentsServicer
from cake_payments.service.charges import Bank, FaultSwitch, ProcessKiller
from cake_payments.service.ports import UnitOfWorkFactory
from cake_payments.settings import PaymentsSettings

MIGRATIONS = "cake_payments:migrations"


@dataclass(frozen=True, slots=True)
class Resources:
    engine: AsyncEngine


@dataclass(frozen=True, slots=True)
class Adapters:
    unit_of_work: UnitOfWorkFactory
    faults: FaultSwitch


@dataclass(frozen=True, slots=True)
class UseCases:
    bank: Bank


async def open_resources(settings: PaymentsSettings, start_up: StartUp) -> Resources:
    return Resources(engine=await start_up.open_database(settings, script_location=MIGRATIONS))


def build_adapters(settings: PaymentsSettings, resources: Resources) -> Adapters:
    session_factory = create_session_factory(resources.engine)
    return Adapters(
        unit_of_work=lambda: SqlPaymentsUnitOfWork(session_factory),
        faults=FaultSwitch(settings.fault_rules()),
    )


def build_use_cases(adapters: Adapters, *, crash: ProcessKiller) -> UseCases:
    return UseCases(bank=Bank(adapters.unit_of_work, adapters.faults, crash))


def build_entry_points(
    settings: PaymentsSettings,
    resources: Resources,
    adapters: Adapters,
    use_cases: UseCases,
    metrics_registry: CollectorRegistry,
) -> GrpcServerBuilder:
    servicer = PaymentsServicer(use_cases.bank, adapters.faults)
    return (
        GrpcServerBuilder.from_settings(
            settings, service_names=[SERVICE_NAME], metrics_registry=metrics_registry
        )
        .add_servicer(
            lambda server: payments_pb2_grpc.add_PaymentsServiceServicer_to_server(servicer, server)
        )
        .with_validation()
        .add_dependency_check(database_check(resources.engine))
    )


async def start_server(
    settings: PaymentsSettings,
    *,
    metrics_registry: CollectorRegistry = REGISTRY,
    crash: ProcessKiller = kill_this_process,
) -> RunningGrpcServer:
    """The bank's gRPC server on ``grpc_host:grpc_port`` (port 0: any free port), its
    database migrated first. Internal only: it sits behind promotions, never the gateway."""
    async with StartUp() as start_up:
        resources = await open_resources(settings, start_up)
        adapters = build_adapters(settings, resources)
        use_cases = build_use_cases(adapters, crash=crash)
        builder = build_entry_points(settings, resources, adapters, use_cases, metrics_registry)
        return await start_up.serve(builder)


async def serve(settings: PaymentsSettings) -> None:
    """gRPC until SIGTERM/SIGINT."""
    await serve_until_signal(settings, start_server)
