"""The standard OpenTelemetry variables (what the OpenTelemetry Operator injects) drive tracing,
with ``CAKE_<SVC>_OTLP_ENDPOINT`` as the fallback; and every log line written inside a span
carries that span's ids.

The OTLP/HTTP case exports to a small in-process receiver (a stdlib HTTP server that keeps
what is POSTed to it) and decodes the protobuf it got, so the whole path from the variables
to the bytes on the wire is exercised without a collector.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog
from cake_common.logging import configure_logging, get_logger
from cake_common.tracing import (
    OtlpExport,
    configure_tracing,
    get_tracer,
    otlp_export,
    span_trace_id,
    start_span_from_traceparent,
)
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

UPSTREAM_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
UPSTREAM = f"00-{UPSTREAM_TRACE_ID}-00f067aa0ba902b7-01"
CAKE_ENDPOINT = "http://collector.cake:4317"


# --- which export ------------------------------------------------------------------------------


def test_cake_endpoint_is_the_fallback() -> None:
    assert otlp_export(CAKE_ENDPOINT, {}) == OtlpExport(
        "grpc", CAKE_ENDPOINT, "CAKE_<SVC>_OTLP_ENDPOINT"
    )
    assert otlp_export(None, {}) is None
    assert otlp_export(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}) is None


def test_standard_endpoint_wins_and_the_exporter_reads_it() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}

    assert otlp_export(CAKE_ENDPOINT, environ) == OtlpExport(
        "grpc", None, "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    traces_only = {**environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://otel:4317"}
    assert otlp_export(None, traces_only) == OtlpExport(
        "grpc", None, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )


@pytest.mark.parametrize(
    ("variables", "protocol"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "http/protobuf"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            "grpc",
        ),
        ({}, "grpc"),
    ],
)
def test_protocol_follows_the_standard_variables(variables: dict[str, str], protocol: str) -> None:
    export = otlp_export(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", **variables})
    assert export is not None
    assert export.protocol == protocol


def test_unsupported_protocol_and_disabled_sdk() -> None:
    with pytest.raises(ValueError, match="http/json"):
        otlp_export(
            None,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://o:1",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            },
        )
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://o:1"}
    assert otlp_export(CAKE_ENDPOINT, disabled) is None
    handle = configure_tracing("auth", CAKE_ENDPOINT, environ=disabled)
    assert not handle.enabled


# --- resource and sampler ----------------------------------------------------------------------


def _one_span(environ: dict[str, str], **kwargs: Any) -> list[Any]:
    memory = InMemorySpanExporter()
    handle = configure_tracing("auth", None, exporter=memory, environ=environ, **kwargs)
    try:
        with get_tracer("cake.test").start_as_current_span("work"):
            pass
        return list(memory.get_finished_spans())
    finally:
        handle.shutdown()


def test_otel_service_name_and_resource_attributes_reach_the_resource() -> None:
    (span,) = _one_span(
        {
            "OTEL_SERVICE_NAME": "auth-eu",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging,k8s.pod.name=auth%2D7",
        }
    )
    attributes = span.resource.attributes

    assert attributes["service.name"] == "auth-eu"
    assert attributes["service.namespace"] == "cake"
    assert attributes["deployment.environment"] == "staging"
    assert attributes["k8s.pod.name"] == "auth-7"


def test_service_name_defaults_to_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    (span,) = _one_span({})
    assert span.resource.attributes["service.name"] == "auth"

    # Through the real process environment, as a service reads it.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-the-operator")
    memory = InMemorySpanExporter()
    handle = configure_tracing("auth", None, exporter=memory)
    with get_tracer("cake.test").start_as_current_span("work"):
        pass
    handle.shutdown()
    (span,) = memory.get_finished_spans()
    assert span.resource.attributes["service.name"] == "from-the-operator"


@pytest.mark.parametrize(
    ("environ", "recorded"),
    [
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, 0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}, 1),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, 1),
    ],
)
def test_otel_traces_sampler_wins_over_the_cake_ratio(
    environ: dict[str, str], recorded: int
) -> None:
    # The Cake ratio says the opposite of what the variable says whenever they differ.
    assert len(_one_span(environ, sample_ratio=1.0 - recorded)) == recorded


def test_bad_sampler_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER 'sometimes'"):
        _one_span({"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        _one_span({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"})


# --- export over OTLP/HTTP to a receiver -------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []  # type: ignore[attr-defined]
    # A short poll: shutdown() below waits for the loop to notice (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_spans_go_to_the_standard_endpoint_over_otlp_http(
    receiver: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = receiver.server_address[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "promotions-canary")

    handle = configure_tracing("promotions", CAKE_ENDPOINT)
    assert handle.enabled
    with get_tracer("cake.test").start_as_current_span("topup") as span:
        trace_id = span_trace_id(span)
    assert handle.force_flush(10_000)
    handle.shutdown()

    ((path, body),) = receiver.received  # type: ignore[attr-defined]
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "promotions-canary"
    (exported,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert exported.name == "topup"
    assert exported.trace_id.hex() == trace_id


# --- trace ids in log lines --------------------------------------------------------------------


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def read() -> list[dict[str, Any]]:
        lines = capsys.readouterr().out.splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if r.get("logger", "").startswith("cake.test.")]

    def start() -> Any:
        # The handler binds sys.stdout when configured, which must be capsys's: so configure
        # in the test's call phase, not during fixture setup.
        configure_logging("INFO", json=True, service_name="auth")
        return read

    yield start
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_log_lines_inside_a_span_carry_its_ids(json_logs: Any) -> None:
    read = json_logs()
    memory = InMemorySpanExporter()
    handle = configure_tracing("auth", None, exporter=memory, environ={})
    try:
        get_logger("cake.test.trace").info("before")
        with get_tracer("cake.test").start_as_current_span("outer"):
            get_logger("cake.test.trace").info("in outer")
            with get_tracer("cake.test").start_as_current_span("inner") as inner:
                get_logger("cake.test.trace").info("in inner")
                logging.getLogger("cake.test.stdlib").warning("stdlib too")
                inner_context = inner.get_span_context()
        get_logger("cake.test.trace").info("after")
    finally:
        handle.shutdown()

    before, outer, inner_line, stdlib, after = read()
    spans = {s.name: s.get_span_context() for s in memory.get_finished_spans()}
    assert "trace_id" not in before and "span_id" not in before
    assert "trace_id" not in after
    assert outer["trace_id"] == trace.format_trace_id(spans["outer"].trace_id)
    assert outer["span_id"] == trace.format_span_id(spans["outer"].span_id)
    assert inner_line["span_id"] == trace.format_span_id(inner_context.span_id)
    assert inner_line["trace_id"] == outer["trace_id"]
    assert inner_line["span_id"] != outer["span_id"]
    assert stdlib["span_id"] == inner_line["span_id"]
    assert inner_line["trace_sampled"] is True


def test_log_lines_carry_an_upstream_trace_while_tracing_is_off(json_logs: Any) -> None:
    read = json_logs()
    with start_span_from_traceparent("relay", UPSTREAM):
        get_logger("cake.test.relay").info("publishing")
    (line,) = read()
    assert line["trace_id"] == UPSTREAM_TRACE_ID
    assert len(line["span_id"]) == 16
