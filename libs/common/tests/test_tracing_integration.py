"""One trace id from a request to its consumer, through real PostgreSQL, Redis and Kafka.

The chain uses only the common building blocks the services are made of: a gRPC server from
GrpcServerBuilder whose handler writes an outbox row with OutboxWriter (no trace_parent
passed), a relay step that publishes the row to Kafka inside a span started from the row's
``trace_parent``, and a consumer that handles the message inside a span continued from its
headers and writes its own outbox row.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from aiokafka import ConsumerRecord
from cake.events.v1 import payloads_pb2, registry
from cake_common.db import UnitOfWork, create_async_engine_for, create_session_factory
from cake_common.grpc_server import GrpcServerBuilder
from cake_common.kafka import (
    create_consumer,
    create_producer,
    ensure_topics,
    kafka_headers,
    start_span_from_headers,
    start_with_retry,
    with_current_trace,
)
from cake_common.outbox import OutboxWriter, outbox_table
from cake_common.redis import create_redis
from cake_common.tracing import (
    SpanKind,
    configure_tracing,
    current_traceparent,
    get_tracer,
    instrument_engine,
    start_span_from_traceparent,
)
from google.protobuf import wrappers_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.integration

metadata = sa.MetaData()
outbox = outbox_table(metadata)

SERVICE = "cake.test.v1.TracedAuth"
LOGIN = f"/{SERVICE}/Login"
StringValue = wrappers_pb2.StringValue
OCCURRED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    handle = configure_tracing("cake-test", None, exporter=memory)
    yield memory
    handle.shutdown()


@pytest.fixture(scope="module")
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine_for(postgres_url, pool_size=4)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


def _trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id)


def _span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_span_id(span.context.span_id)


def _parent_id(span: ReadableSpan) -> str | None:
    return trace.format_span_id(span.parent.span_id) if span.parent else None


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    matching = [s for s in spans if s.name == name and (kind is None or s.kind is kind)]
    assert len(matching) == 1, (name, [(s.name, s.kind) for s in spans])
    return matching[0]


async def _add_event(engine: AsyncEngine, **overrides: Any) -> uuid.UUID:
    async with UnitOfWork(create_session_factory(engine)) as uow:
        event_id = await OutboxWriter().add(
            uow.session,
            overrides.pop("event", registry.USER_FIRST_LOGIN),
            aggregate_id=overrides.pop("aggregate_id", 42),
            payload=overrides.pop("payload", payloads_pb2.UserFirstLogin(user_id=42)),
            occurred_at=OCCURRED,
            **overrides,
        )
        await uow.commit()
    return event_id


async def _stored_trace_parent(engine: AsyncEngine, event_id: uuid.UUID) -> str | None:
    async with engine.connect() as connection:
        stored: str | None = await connection.scalar(
            sa.select(outbox.c.trace_parent).where(outbox.c.event_id == event_id)
        )
    return stored


async def test_outbox_rows_record_the_current_trace(
    engine: AsyncEngine, exporter: InMemorySpanExporter
) -> None:
    with get_tracer(__name__).start_as_current_span("request"):
        expected = current_traceparent()
        implicit = await _add_event(engine)
        explicit = await _add_event(engine, trace_parent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    outside = await _add_event(engine)

    assert expected is not None
    assert await _stored_trace_parent(engine, implicit) == expected
    assert await _stored_trace_parent(engine, explicit) == "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert await _stored_trace_parent(engine, outside) is None


async def test_outbox_rows_have_no_trace_while_tracing_is_off(engine: AsyncEngine) -> None:
    with start_span_from_traceparent("request", None):
        event_id = await _add_event(engine)
    assert await _stored_trace_parent(engine, event_id) is None


async def _consume_one(bootstrap: str, topic: str) -> ConsumerRecord[bytes, bytes]:
    consumer = await start_with_retry(
        lambda: create_consumer(
            bootstrap, [topic], f"cake-test-{secrets.token_hex(4)}", "cake-test-consumer"
        ),
        timeout_seconds=30,
    )
    try:
        async with asyncio.timeout(30):
            while True:
                # getmany, as the promotions consumer reads in batches.
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    (record,) = records
                    return record
    finally:
        await consumer.stop()


async def test_one_trace_from_request_through_outbox_and_kafka_to_the_consumer(
    engine: AsyncEngine,
    redis_url: str,
    kafka_bootstrap: str,
    exporter: InMemorySpanExporter,
) -> None:
    topic = f"cake.test.trace.{secrets.token_hex(4)}"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    instrument_engine(engine)
    instrument_engine(engine)  # idempotent: still one span per statement
    redis = create_redis(redis_url)
    written: list[uuid.UUID] = []

    # 1. The request: a login handler that reads Redis and writes its outbox row.
    async def login(request: StringValue, context: Any) -> StringValue:
        await redis.get(f"cake:test:{request.value}")
        written.append(await _add_event(engine, aggregate_id=request.value))
        return StringValue(value="ok")

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            login,
            request_deserializer=StringValue.FromString,
            response_serializer=StringValue.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Login": handler}),)
        )

    running = await GrpcServerBuilder(service_names=[SERVICE]).add_servicer(register).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = channel.unary_unary(
                LOGIN,
                request_serializer=StringValue.SerializeToString,
                response_deserializer=StringValue.FromString,
            )
            await call(StringValue(value="42"))
        await redis.ping()  # outside any trace, like a health probe: not recorded
    finally:
        await running.stop()
        await redis.aclose()
    assert trace.get_current_span() is trace.INVALID_SPAN, "the relay starts from nothing"

    # 2. The relay, another process in reality: only the row links it to the request.
    async with engine.connect() as connection:
        row = (
            await connection.execute(sa.select(outbox).where(outbox.c.event_id == written[0]))
        ).one()
    producer = await start_with_retry(
        lambda: create_producer(kafka_bootstrap, "cake-test-relay"), timeout_seconds=30
    )
    try:
        with start_span_from_traceparent("outbox publish", row.trace_parent, SpanKind.PRODUCER):
            headers = with_current_trace(
                kafka_headers(row.event_id, row.event_type, row.trace_parent)
            )
            await producer.send_and_wait(
                topic, value=bytes(row.payload), key=row.aggregate_id.encode(), headers=headers
            )
    finally:
        await producer.stop()

    # 3. The consumer: handles the message in a span continued from its headers; the row it
    # writes (e.g. VOUCHER_ISSUED) carries the same trace on.
    record = await _consume_one(kafka_bootstrap, topic)
    assert [key for key, _ in record.headers].count("traceparent") == 1
    with start_span_from_headers("enroll first login", record.headers):
        voucher_event = await _add_event(
            engine, event=registry.VOUCHER_ISSUED, payload=payloads_pb2.VoucherIssued(voucher_id=1)
        )

    spans = list(exporter.get_finished_spans())
    client = _one(spans, LOGIN, SpanKind.CLIENT)
    server = _one(spans, LOGIN, SpanKind.SERVER)
    redis_get = _one(spans, "GET", SpanKind.CLIENT)
    inserts = [s for s in spans if s.name.startswith("INSERT") and s.kind is SpanKind.CLIENT]
    publish = _one(spans, "outbox publish", SpanKind.PRODUCER)
    send = _one(spans, f"{topic} send", SpanKind.PRODUCER)
    # The aiokafka instrumentation's per-record span (its per-poll spans are separate traces).
    receive = [s for s in spans if s.name == f"{topic} receive" and _parent_id(s) == _span_id(send)]
    enroll = _one(spans, "enroll first login", SpanKind.CONSUMER)

    assert not [s for s in spans if s.name in {"PING", "SELECT"}], "no background spans"

    chain = [client, server, redis_get, *inserts, publish, send, *receive, enroll]
    assert len(receive) == 1
    assert len(inserts) == 2, "one statement span per insert (engine instrumented once)"
    assert {_trace_id(span) for span in chain} == {_trace_id(client)}, "ONE trace id"
    # ... and a tree: request → row → relay span → Kafka send → consumer's work.
    assert _parent_id(server) == _span_id(client)
    assert _parent_id(redis_get) == _span_id(server)
    assert _parent_id(inserts[0]) == _span_id(server)
    assert row.trace_parent.split("-")[2] == _span_id(server)
    assert _parent_id(publish) == _span_id(server)
    assert _parent_id(send) == _span_id(publish)
    assert _parent_id(enroll) == _span_id(send), "the innermost traceparent header won"
    assert _parent_id(inserts[1]) == _span_id(enroll)
    stored = await _stored_trace_parent(engine, voucher_event)
    assert stored is not None and stored.split("-")[1:3] == [_trace_id(enroll), _span_id(enroll)]
