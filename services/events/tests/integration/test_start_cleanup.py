"""A start of the events service that fails half way closes what it had opened: its
database connections, the relays' and probes' clients, the ports it had bound."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from cake_events.bootstrap import start_relays, start_server
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration


def connections_to(admin_url: str, database: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on for the length of the test."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        yield blocker.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def other_tasks() -> set[str]:
    current = asyncio.current_task()
    return {task.get_name() for task in asyncio.all_tasks() if task is not current}


async def test_a_running_service_holds_connections_that_a_stop_gives_back(
    stack: Any, make_source_db: Any, relay_settings: Any
) -> None:
    """The control for the test below: the database check can see this service's sessions."""
    events, auth = make_source_db(), make_source_db()
    settings = relay_settings(auth=auth, database_url=events.owner_url, grpc_port=0)

    running = await start_server(settings, metrics_registry=CollectorRegistry())
    try:
        assert connections_to(stack.postgres_admin_url, events.name) >= 1
    finally:
        await running.stop()

    assert connections_to(stack.postgres_admin_url, events.name) == 0


@pytest.mark.parametrize("late_step", ["grpc_port", "metrics_port"])
async def test_a_start_failing_half_way_leaves_nothing_open(
    stack: Any, make_source_db: Any, relay_settings: Any, taken_port: int, late_step: str
) -> None:
    events, auth = make_source_db(), make_source_db()
    metrics_port = socket.create_server(("127.0.0.1", 0))
    free_port = metrics_port.getsockname()[1]
    metrics_port.close()
    # Either the gRPC port or (bound after the gRPC server started) the metrics port is
    # taken: both come after the database, the probes' clients and the relays were built.
    ports = (
        {"grpc_port": taken_port, "metrics_port": None}
        if late_step == "grpc_port"
        else {"grpc_port": free_port, "metrics_port": taken_port}
    )
    settings = relay_settings(auth=auth, database_url=events.owner_url, relay_enabled=True, **ports)
    tasks_before = other_tasks()

    with pytest.raises((RuntimeError, OSError)):
        await start_server(settings, metrics_registry=CollectorRegistry())

    assert connections_to(stack.postgres_admin_url, events.name) == 0
    assert connections_to(stack.postgres_admin_url, auth.name) == 0
    await asyncio.sleep(0)
    assert other_tasks() == tasks_before
    if late_step == "metrics_port":
        assert port_is_free(free_port)  # the gRPC server it had started let go of its port


async def test_a_relay_worker_failing_to_start_leaves_nothing_open(
    stack: Any, make_source_db: Any, relay_settings: Any, taken_port: int
) -> None:
    events, auth = make_source_db(), make_source_db()
    settings = relay_settings(auth=auth, database_url=events.owner_url, metrics_port=taken_port)

    with pytest.raises(OSError):
        await start_relays(settings, metrics_registry=CollectorRegistry())

    assert connections_to(stack.postgres_admin_url, events.name) == 0


async def test_a_relay_worker_stops_its_relays_and_closes_its_databases(
    stack: Any, make_source_db: Any, relay_settings: Any, kit: Any
) -> None:
    events, auth = make_source_db(), make_source_db()
    settings = relay_settings(auth=auth, database_url=events.owner_url)
    worker = await start_relays(settings, metrics_registry=CollectorRegistry())
    serving = asyncio.create_task(worker.serve_until_signal())

    async def leading() -> bool:
        return connections_to(stack.postgres_admin_url, auth.name) >= 1

    await kit.wait_until(leading, within=30, what="the relay to take the lead")
    worker.request_stop()
    await asyncio.wait_for(serving, 10)

    assert connections_to(stack.postgres_admin_url, auth.name) == 0
    assert connections_to(stack.postgres_admin_url, events.name) == 0
