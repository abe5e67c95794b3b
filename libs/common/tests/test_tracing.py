"""Tracing set-up and W3C trace-context helpers, and a real in-process gRPC server traced
end to end (client span → SERVER span, one trace id). Broker/database hops are in
``test_tracing_integration.py``."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from cake_common.errors import NotFound
from cake_common.grpc_server import GrpcServerBuilder, RunningGrpcServer
from cake_common.kafka import (
    header_value,
    kafka_headers,
    start_span_from_headers,
    trace_context_from_headers,
    with_current_trace,
)
from cake_common.service_runtime import start_tracing
from cake_common.settings import ServiceSettings
from cake_common.tracing import (
    SpanKind,
    configure_tracing,
    context_from_traceparent,
    current_traceparent,
    get_tracer,
    grpc_server_interceptor,
    span_trace_id,
    start_span_from_traceparent,
    tracing_enabled,
)
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

# A caller's trace (W3C example ids), as Envoy or another service would send it.
UPSTREAM_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
UPSTREAM_SPAN_ID = "00f067aa0ba902b7"
UPSTREAM = f"00-{UPSTREAM_TRACE_ID}-{UPSTREAM_SPAN_ID}-01"

SERVICE = "cake.test.v1.TracedService"
WHOAMI = f"/{SERVICE}/WhoAmI"
MISSING = f"/{SERVICE}/Missing"
BROKEN = f"/{SERVICE}/Broken"
StringValue = wrappers_pb2.StringValue


def _hex_ids(span: ReadableSpan | trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def _parent_span_id(span: ReadableSpan) -> str | None:
    return trace.format_span_id(span.parent.span_id) if span.parent else None


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    handle = configure_tracing("cake-test", None, exporter=memory)
    yield memory
    handle.shutdown()


def _spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


# --- off unless configured ---------------------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter
def test_importing_installs_and_imports_no_tracing_machinery() -> None:
    check = """
import sys, threading
import cake_common.tracing, cake_common.outbox, cake_common.kafka, cake_common.grpc_server
from opentelemetry import trace
heavy = sorted(m for m in sys.modules if m.startswith(
    ("opentelemetry.sdk", "opentelemetry.instrumentation", "opentelemetry.exporter")))
problems = []
if heavy:
    problems.append(f"imported {heavy}")
if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
    problems.append("global tracer provider set")
if threading.active_count() != 1:
    problems.append("threads started")
print("; ".join(problems))
sys.exit(1 if problems else 0)
"""
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_endpoint_or_exporter_tracing_stays_off() -> None:
    handle = configure_tracing("cake-test", None)
    assert not handle.enabled
    assert not tracing_enabled()
    assert grpc_server_interceptor() is None
    assert current_traceparent() is None
    handle.shutdown()


def test_off_still_passes_an_upstream_trace_on() -> None:
    # The relay with tracing off must not drop the trace the producing service recorded.
    assert not tracing_enabled()
    with start_span_from_traceparent("publish", UPSTREAM, SpanKind.PRODUCER) as span:
        assert not span.is_recording()
        assert current_traceparent() == UPSTREAM
        headers = with_current_trace(kafka_headers("e-1", "USER_FIRST_LOGIN"))
    assert header_value(headers, "traceparent") == UPSTREAM
    assert current_traceparent() is None


def test_sample_ratio_is_validated() -> None:
    with pytest.raises(ValueError, match="sample_ratio"):
        configure_tracing("cake-test", None, exporter=InMemorySpanExporter(), sample_ratio=1.5)
    assert not tracing_enabled()


# --- W3C trace context --------------------------------------------------------------------------


def test_current_traceparent_names_the_current_span(exporter: InMemorySpanExporter) -> None:
    with get_tracer(__name__).start_as_current_span("request") as request:
        trace_id, span_id = _hex_ids(request)
        traceparent = current_traceparent()
        assert traceparent is not None
        version, traced_id, parent_id, flags = traceparent.split("-")
        assert (version, traced_id, parent_id) == ("00", trace_id, span_id)
        assert int(flags, 16) & 0x01, "sampled"
        assert span_trace_id(request) == trace_id
    assert current_traceparent() is None


def test_span_from_traceparent_continues_that_trace(exporter: InMemorySpanExporter) -> None:
    with start_span_from_traceparent("publish", UPSTREAM, SpanKind.PRODUCER):
        pass
    (published,) = _spans(exporter)
    assert _hex_ids(published)[0] == UPSTREAM_TRACE_ID
    assert _parent_span_id(published) == UPSTREAM_SPAN_ID
    assert published.parent is not None and published.parent.is_remote
    assert published.kind is SpanKind.PRODUCER
    assert published.resource.attributes["service.name"] == "cake-test"


@pytest.mark.parametrize("traceparent", [None, "", "garbage", "00-" + "0" * 32 + "-" + "0" * 16])
def test_missing_or_malformed_traceparent_starts_a_new_trace(
    exporter: InMemorySpanExporter, traceparent: str | None
) -> None:
    assert context_from_traceparent(traceparent) == {}
    with start_span_from_traceparent("publish", traceparent) as span:
        assert span.get_span_context().is_valid
    (published,) = _spans(exporter)
    assert published.parent is None


def test_unsampled_traces_propagate_without_recording() -> None:
    memory = InMemorySpanExporter()
    handle = configure_tracing("cake-test", None, exporter=memory, sample_ratio=0.0)
    try:
        with get_tracer(__name__).start_as_current_span("request") as request:
            assert not request.is_recording()
            traceparent = current_traceparent()
            assert traceparent is not None
            assert not int(traceparent.rsplit("-", 1)[1], 16) & 0x01, "not sampled"
        # ParentBased: a trace sampled upstream is recorded here too, never half a trace.
        with start_span_from_traceparent("publish", UPSTREAM) as publish:
            assert publish.is_recording()
        assert [span.name for span in memory.get_finished_spans()] == ["publish"]
    finally:
        handle.shutdown()


def test_reconfiguring_replaces_the_previous_setup() -> None:
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    first_handle = configure_tracing("cake-test", None, exporter=first)
    second_handle = configure_tracing("cake-test", None, exporter=second)
    assert not first_handle.enabled and second_handle.enabled
    first_handle.shutdown()  # a replaced handle must not turn the new setup off
    assert tracing_enabled()
    tracer = get_tracer(__name__)  # also the global API's tracers follow the configuration
    with tracer.start_as_current_span("one"), trace.get_tracer("x").start_as_current_span("two"):
        pass
    assert first.get_finished_spans() == ()
    assert [span.name for span in second.get_finished_spans()] == ["two", "one"]
    second_handle.shutdown()
    second_handle.shutdown()
    assert not tracing_enabled()
    with tracer.start_as_current_span("after shutdown") as span:
        assert not span.is_recording()


async def test_aclose_from_async_code_flushes_and_turns_tracing_off() -> None:
    memory = InMemorySpanExporter()
    handle = configure_tracing("cake-test", None, exporter=memory)
    with get_tracer(__name__).start_as_current_span("last request"):
        pass
    await handle.aclose()
    await handle.aclose()
    assert not handle.enabled and not tracing_enabled()
    assert [span.name for span in memory.get_finished_spans()] == ["last request"]


# --- Kafka headers ----------------------------------------------------------------------------


def test_with_current_trace_replaces_the_trace_headers(exporter: InMemorySpanExporter) -> None:
    headers = kafka_headers("e-1", "USER_FIRST_LOGIN", UPSTREAM)
    assert with_current_trace(headers) == headers, "no current span: unchanged"
    with start_span_from_traceparent("publish", UPSTREAM, SpanKind.PRODUCER):
        traced = with_current_trace(headers)
        expected = current_traceparent()
    assert [key for key, _ in traced] == ["ce_id", "ce_type", "traceparent"]
    assert header_value(traced, "traceparent") == expected != UPSTREAM
    assert headers == kafka_headers("e-1", "USER_FIRST_LOGIN", UPSTREAM), "input not mutated"


def test_consumer_span_continues_the_message_trace(exporter: InMemorySpanExporter) -> None:
    older = "00-11111111111111111111111111111111-2222222222222222-01"
    headers: list[tuple[str, bytes | None]] = [
        ("traceparent", older.encode()),
        ("other", None),
        ("traceparent", UPSTREAM.encode()),  # the last one wins
    ]
    assert header_value(headers, "traceparent") == UPSTREAM
    assert header_value(headers, "missing") is None
    assert header_value(None, "traceparent") is None
    assert trace_context_from_headers([]) == {}
    with start_span_from_headers("enroll", headers, attributes={"cake.event_type": "T"}):
        pass
    (enroll,) = _spans(exporter)
    assert _hex_ids(enroll)[0] == UPSTREAM_TRACE_ID
    assert _parent_span_id(enroll) == UPSTREAM_SPAN_ID
    assert enroll.kind is SpanKind.CONSUMER
    assert enroll.attributes == {"cake.event_type": "T"}


# --- settings ---------------------------------------------------------------------------------


class ExampleSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_EXAMPLE_")
    service_name: str = "example"
    grpc_port: int = 0


def test_settings_tracing_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    assert ExampleSettings().otlp_endpoint is None
    assert ExampleSettings().trace_sample_ratio == 1.0
    monkeypatch.setenv("CAKE_EXAMPLE_OTLP_ENDPOINT", "http://otel-collector:4317")
    monkeypatch.setenv("CAKE_EXAMPLE_TRACE_SAMPLE_RATIO", "0.25")
    settings = ExampleSettings()
    assert settings.otlp_endpoint == "http://otel-collector:4317"
    assert settings.trace_sample_ratio == 0.25
    monkeypatch.setenv("CAKE_EXAMPLE_OTLP_ENDPOINT", " ")
    assert ExampleSettings().otlp_endpoint is None, "blank means off"
    monkeypatch.setenv("CAKE_EXAMPLE_TRACE_SAMPLE_RATIO", "2")
    with pytest.raises(ValidationError):
        ExampleSettings()


def test_start_tracing_follows_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    off = start_tracing(ExampleSettings())
    assert not off.enabled and grpc_server_interceptor() is None
    # An OTLP endpoint turns it on (batching exporter; nothing is sent until spans end).
    monkeypatch.setenv("CAKE_EXAMPLE_OTLP_ENDPOINT", "http://127.0.0.1:1")
    on = start_tracing(ExampleSettings())
    try:
        assert on.enabled and tracing_enabled()
        assert grpc_server_interceptor() is not None
    finally:
        on.shutdown()
    assert not tracing_enabled()


# --- gRPC -------------------------------------------------------------------------------------


async def _who_am_i(request: StringValue, context: Any) -> StringValue:
    # What OutboxWriter.add would store for a row written by this handler.
    return StringValue(value=current_traceparent() or "")


async def _missing(request: StringValue, context: Any) -> StringValue:
    raise NotFound("Campaign not found")


async def _broken(request: StringValue, context: Any) -> StringValue:
    raise RuntimeError("bug")


def _register(server: grpc.aio.Server) -> None:
    def unary(behaviour: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=StringValue.FromString,
            response_serializer=StringValue.SerializeToString,
        )

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"WhoAmI": unary(_who_am_i), "Missing": unary(_missing), "Broken": unary(_broken)},
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def traced_server(
    exporter: InMemorySpanExporter,
) -> AsyncIterator[tuple[RunningGrpcServer, CollectorRegistry]]:
    registry = CollectorRegistry()
    running = await (
        GrpcServerBuilder(service_names=[SERVICE])
        .add_servicer(_register)
        .with_metrics(registry)
        .with_validation()
        .start()
    )
    yield running, registry
    await running.stop()


def _unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(
        method,
        request_serializer=StringValue.SerializeToString,
        response_deserializer=StringValue.FromString,
    )


async def test_rpc_is_a_server_span_in_the_callers_trace(
    traced_server: tuple[RunningGrpcServer, CollectorRegistry], exporter: InMemorySpanExporter
) -> None:
    running, _ = traced_server
    # Created after configure_tracing: the channel is instrumented and sends traceparent.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        response = await _unary(channel, WHOAMI)(StringValue())
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest())

    spans = _spans(exporter)
    server = [span for span in spans if span.kind is SpanKind.SERVER]
    client = [span for span in spans if span.kind is SpanKind.CLIENT]
    assert [span.name for span in server] == [WHOAMI], "health checks are not traced"
    assert [span.name for span in client] == [WHOAMI]
    (server_span,), (client_span,) = server, client
    client_trace_id, client_span_id = _hex_ids(client_span)
    server_trace_id, server_span_id = _hex_ids(server_span)
    assert server_trace_id == client_trace_id
    assert _parent_span_id(server_span) == client_span_id
    assert server_span.attributes is not None
    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    # Inside the handler the SERVER span is current: that is what outbox rows record.
    assert response.value.split("-")[1:3] == [server_trace_id, server_span_id]


async def test_a_traced_caller_continues_its_upstream_trace(
    traced_server: tuple[RunningGrpcServer, CollectorRegistry], exporter: InMemorySpanExporter
) -> None:
    running, _ = traced_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with start_span_from_traceparent("caller", UPSTREAM):
            response = await _unary(channel, WHOAMI)(StringValue())
    server_span = next(s for s in _spans(exporter) if s.kind is SpanKind.SERVER)
    assert _hex_ids(server_span)[0] == UPSTREAM_TRACE_ID
    assert response.value.split("-")[1] == UPSTREAM_TRACE_ID


async def test_traceparent_metadata_from_an_untraced_caller_is_honoured() -> None:
    # E.g. Envoy forwarding a client's header. The channel is made BEFORE tracing is on,
    # so it is not instrumented: only the metadata sent here carries the trace.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    memory = InMemorySpanExporter()
    handle = configure_tracing("cake-test", None, exporter=memory)
    running = await (
        GrpcServerBuilder(service_names=[SERVICE], port=port).add_servicer(_register).start()
    )
    try:
        async with channel:
            response = await _unary(channel, WHOAMI)(
                StringValue(), metadata=(("traceparent", UPSTREAM),)
            )
    finally:
        await running.stop()
        handle.shutdown()
    (server_span,) = memory.get_finished_spans()
    assert server_span.kind is SpanKind.SERVER
    assert _hex_ids(server_span)[0] == UPSTREAM_TRACE_ID
    assert _parent_span_id(server_span) == UPSTREAM_SPAN_ID
    assert response.value.split("-")[1] == UPSTREAM_TRACE_ID


async def test_status_codes_reach_the_span_and_the_metrics(
    traced_server: tuple[RunningGrpcServer, CollectorRegistry], exporter: InMemorySpanExporter
) -> None:
    running, registry = traced_server
    codes = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        for method in (MISSING, BROKEN):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _unary(channel, method)(StringValue())
            codes[method] = caught.value.code()
    assert codes == {MISSING: grpc.StatusCode.NOT_FOUND, BROKEN: grpc.StatusCode.INTERNAL}
    server_spans = {s.name: s for s in _spans(exporter) if s.kind is SpanKind.SERVER}
    for method, code in codes.items():
        attributes = server_spans[method].attributes
        assert attributes is not None
        assert attributes["rpc.grpc.status_code"] == code.value[0]
    # OpenTelemetry's gRPC conventions: a client error (NOT_FOUND) is not a server fault.
    assert server_spans[MISSING].status.status_code is StatusCode.UNSET
    assert server_spans[BROKEN].status.status_code is StatusCode.ERROR
    # The metrics interceptor reads the codes through the tracing wrapper of the context.
    for method, code in codes.items():
        labels = {
            "grpc_type": "unary",
            "grpc_service": SERVICE,
            "grpc_method": method.rsplit("/", 1)[1],
        }
        handled = registry.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_code": code.name}
        )
        assert handled == 1
