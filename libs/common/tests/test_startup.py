"""``StartUp``, the clean-up every composition root shares: what a start opened closes in
reverse order, whether the start fails half way (a real port that is taken, a worker that
fails to start) or the server stops; workers start once the server serves."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import weakref
from collections.abc import Iterator

import grpc
import pytest
from cake_common.grpc_server import DATABASE_CHECK, GrpcServerBuilder
from cake_common.service_runtime import (
    StartUp,
    database_check,
    process_client_id,
    serve_until_signal,
)
from cake_common.settings import ServiceSettings
from cake_common.token_auth import required_token_verifier
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

URL = "postgresql+psycopg://cake:secret@127.0.0.1:5432/cake"


class Example(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_EXAMPLE_")
    service_name: str = "example"
    grpc_port: int = 0


class Journal:
    def __init__(self) -> None:
        self.entries: list[str] = []

    def closer(self, name: str) -> object:
        async def close() -> None:
            self.entries.append(f"close {name}")

        return close

    def starter(self, name: str) -> object:
        def start() -> None:
            self.entries.append(f"start {name}")

        return start


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        yield blocker.getsockname()[1]


def builder(port: int = 0) -> GrpcServerBuilder:
    return GrpcServerBuilder(service_names=["cake.test.v1.Probe"], port=port, grace_seconds=0)


async def test_a_start_failing_half_way_closes_what_it_opened_in_reverse() -> None:
    journal = Journal()
    with pytest.raises(ConnectionError):
        async with StartUp() as start_up:
            start_up.closes(journal.closer("database"))  # type: ignore[arg-type]
            start_up.closes(journal.closer("redis"))  # type: ignore[arg-type]
            raise ConnectionError("kafka never answered")
    assert journal.entries == ["close redis", "close database"]


async def test_a_taken_port_closes_everything_and_starts_no_worker(taken_port: int) -> None:
    journal = Journal()
    with pytest.raises(RuntimeError, match="bind"):
        async with StartUp() as start_up:
            start_up.closes(journal.closer("database"))  # type: ignore[arg-type]
            start_up.runs(journal.starter("consumer"), journal.closer("consumer"))  # type: ignore[arg-type]
            await start_up.serve(builder(taken_port))
    assert journal.entries == ["close consumer", "close database"]


async def test_workers_start_once_serving_and_stop_before_the_resources_close() -> None:
    journal = Journal()
    async with StartUp() as start_up:
        start_up.closes(journal.closer("database"))  # type: ignore[arg-type]
        start_up.runs(journal.starter("sweep"), journal.closer("sweep"))  # type: ignore[arg-type]
        start_up.runs(journal.starter("consumer"), journal.closer("consumer"))  # type: ignore[arg-type]
        running = await start_up.serve(builder())
    assert journal.entries == ["start sweep", "start consumer"]
    assert running.port > 0
    await running.stop()
    assert journal.entries[2:] == ["close consumer", "close sweep", "close database"]
    await running.stop()  # once only
    assert len(journal.entries) == 5


async def test_a_worker_failing_to_start_stops_the_server_and_closes_everything() -> None:
    journal = Journal()

    def broken() -> None:
        raise RuntimeError("no such topic")

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(RuntimeError, match="no such topic"):
        async with StartUp() as start_up:
            start_up.closes(journal.closer("database"))  # type: ignore[arg-type]
            start_up.runs(journal.starter("sweep"), journal.closer("sweep"))  # type: ignore[arg-type]
            start_up.runs(broken, journal.closer("consumer"))  # type: ignore[arg-type]
            await start_up.serve(builder(port))
    assert journal.entries == ["start sweep", "close consumer", "close sweep", "close database"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # the server let go of its port


async def test_a_close_that_fails_does_not_keep_the_others_from_running() -> None:
    journal = Journal()

    async def failing() -> None:
        raise OSError("already closed")

    async with StartUp() as start_up:
        start_up.closes(journal.closer("database"))  # type: ignore[arg-type]
        start_up.closes(failing)
        start_up.closes(journal.closer("redis"))  # type: ignore[arg-type]
    await start_up.close()
    assert journal.entries == ["close redis", "close database"]


async def test_a_worker_process_stops_on_request_and_closes_in_reverse() -> None:
    journal = Journal()
    async with StartUp() as start_up:
        start_up.closes(journal.closer("database"))  # type: ignore[arg-type]
        start_up.runs(journal.starter("relay"), journal.closer("relay"))  # type: ignore[arg-type]
        worker = await start_up.work(
            ServiceSettings(
                service_name="probe", grpc_port=0, database_url="postgresql+psycopg://x/y"
            )
        )
    serving = asyncio.create_task(worker.serve_until_signal())
    await asyncio.sleep(0)
    assert journal.entries == ["start relay"]
    start_up.request_stop(RuntimeError("the relay failed for good"))
    await asyncio.wait_for(serving, 5)
    assert journal.entries == ["start relay", "close relay", "close database"]


class FakeConsumer:
    """Records what the start-up does with a consumer (the real one needs Kafka)."""

    def __init__(self, *, consuming: bool) -> None:
        self.consuming = consuming
        self.on_failure: object = None
        self.stopped = False

    def start(self, on_failure: object = None) -> None:
        self.on_failure = on_failure

    async def stop(self) -> None:
        self.stopped = True

    async def is_consuming(self) -> bool:
        return self.consuming


async def test_a_consumer_is_a_non_critical_dependency_and_its_failure_stops_the_process() -> None:
    consumer = FakeConsumer(consuming=False)
    async with StartUp() as start_up:
        server = builder().with_check_interval(0.01)
        start_up.runs_consumer(consumer, health=server)
        running = await start_up.serve(server)
    stub = health_pb2_grpc.HealthStub(
        channel := grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    )
    async with channel:
        for _ in range(200):  # the first probe runs in the background
            answer = await stub.Check(health_pb2.HealthCheckRequest(service="kafka_consumer"))
            if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        overall = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == health_pb2.HealthCheckResponse.SERVING  # not critical
    assert callable(consumer.on_failure)
    consumer.on_failure(RuntimeError("consumer failed for good"))
    await asyncio.wait_for(running.serve_until_signal(), timeout=10)
    assert consumer.stopped


async def test_a_consumer_without_a_server_reports_its_failure_to_the_caller() -> None:
    failures: list[BaseException] = []
    consumer = FakeConsumer(consuming=True)
    async with StartUp() as start_up:
        start_up.runs_consumer(consumer, on_failure=failures.append)
        worker = await start_up.work(Example(database_url=URL))  # type: ignore[arg-type]
    assert consumer.on_failure == failures.append
    worker.request_stop()
    await asyncio.wait_for(worker.serve_until_signal(), timeout=10)
    assert consumer.stopped


def test_client_ids_tell_processes_apart() -> None:
    assert process_client_id("promotions") == (
        f"cake-promotions-{socket.gethostname()}-{os.getpid()}"
    )


def test_a_service_without_a_jwks_file_refuses_to_start_naming_its_variable() -> None:
    with pytest.raises(SystemExit, match="CAKE_EXAMPLE_JWKS_FILE must name"):
        required_token_verifier(Example(database_url=URL))  # type: ignore[arg-type]


def test_every_service_reports_its_database_under_one_critical_check() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    check = database_check(create_async_engine(URL))
    assert (check.name, check.critical) == ("postgres", True)
    assert check.name == DATABASE_CHECK


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_what_the_start_up_leaves_alive_is_left_out_of_later_collections() -> None:
    """``serve_until_signal`` freezes the heap once the process is started: the start-up's
    live objects leave the collector's generations, its garbage cycles are collected first."""
    kept: list[object] = []
    garbage = _Cycle()
    garbage_ref = weakref.ref(garbage)
    seen: dict[str, object] = {}

    class Served:
        async def serve_until_signal(self) -> None:
            tracked = gc.get_objects()
            seen["kept tracked"] = any(obj is kept for obj in tracked)
            seen["garbage alive"] = garbage_ref() is not None
            seen["frozen"] = gc.get_freeze_count()

        def request_stop(self) -> None:
            raise AssertionError("not asked to stop")

    async def start(_settings: Example) -> Served:
        assert any(obj is kept for obj in gc.get_objects())  # tracked until the freeze
        return Served()

    del garbage
    was_enabled = gc.isenabled()
    gc.disable()  # only the freeze's own collection may collect the cycle
    try:
        await serve_until_signal(Example(database_url=URL), start)  # type: ignore[arg-type]
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
    assert seen["kept tracked"] is False
    assert seen["garbage alive"] is False
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 0
