"""OpenTelemetry tracing, off unless configured: one trace from a request to its consumers.

Nothing happens at import, and until a composition root calls :func:`configure_tracing`
with an OTLP endpoint every helper here is a cheap no-op: the OpenTelemetry SDK, exporter and
instrumentation packages are not even imported.

The standard variables (what the OpenTelemetry Operator injects) are honoured and win over
Cake's own: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` (with
``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` ``grpc`` or ``http/protobuf``, headers, TLS and
timeouts as the exporter reads them), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``, and ``OTEL_SDK_DISABLED=true``.
``CAKE_<SVC>_OTLP_ENDPOINT`` (OTLP/gRPC) and ``CAKE_<SVC>_TRACE_SAMPLE_RATIO`` are the
fallbacks when those are unset. Once configured, a trace crosses every hop of the system:

- gRPC: :class:`~cake_common.grpc_server.GrpcServerBuilder` puts the OpenTelemetry server
  interceptor first, so each RPC is a SERVER span continuing the caller's ``traceparent``
  metadata; ``grpc.aio`` channels created afterwards send theirs. Health and reflection
  calls (probes every few seconds) are not traced.
- PostgreSQL and Redis: statements of engines passed to :func:`instrument_engine`, and
  Redis commands, are CLIENT spans of the current trace (none outside a trace: probes and
  polling would flood the backend with one-span traces).
- Outbox: :meth:`cake_common.outbox.OutboxWriter.add` stores :func:`current_traceparent` in
  the row, so the trace survives the transaction.
- Relay → Kafka: one span per row, started with :func:`start_span_from_traceparent` from the
  row's ``trace_parent``; :func:`cake_common.kafka.with_current_trace` puts it in the
  message headers (the aiokafka instrumentation adds a ``send`` span under it).
- Consumer: :func:`cake_common.kafka.start_span_from_headers` continues it around the work.

Only the W3C ``traceparent`` (and ``tracestate``) travel between processes.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from typing_extensions import override

from cake_common.logging import get_logger

if TYPE_CHECKING:
    import grpc
    from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
        BaseInstrumentor,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_CONTEXT_KEYS = (TRACEPARENT, TRACESTATE)

# Not traced: Kubernetes probes and load balancers call Health every few seconds, and
# reflection is tooling; their spans would drown the useful ones.
_UNTRACED_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")

_W3C = TraceContextTextMapPropagator()
_log = get_logger(__name__)


class _Configuration:
    """What one :func:`configure_tracing` call set up, undone by its handle's shutdown."""

    def __init__(self, provider: SdkTracerProvider, instrumentors: Sequence[BaseInstrumentor]):
        self.provider = provider
        self.instrumentors = tuple(instrumentors)
        self.engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        self.closed = False


class _TracingState:
    configuration: _Configuration | None = None


_state = _TracingState()


class _ConfiguredTracer(trace.Tracer):
    """A tracer that follows the active configuration (spans go nowhere when there is none).

    Instrumentation libraries fetch their tracer once, when they are installed; handing them
    these keeps their spans flowing to whichever provider is current, and lets
    ``opentelemetry.trace.get_tracer`` work anywhere although the global provider can be
    set only once per process (tests configure tracing many times).

    With ``children_only``, spans are recorded only inside an existing trace: database and
    Redis calls made for a request or a message belong to its trace, while background ones
    (health probes every few seconds, the relay's polling) would each be a lone root trace.
    """

    def __init__(
        self,
        name: str,
        version: str | None,
        schema_url: str | None,
        attributes: Attributes,
        *,
        children_only: bool = False,
    ) -> None:
        self._identity = (name, version, schema_url, attributes)
        self._children_only = children_only
        self._for: _Configuration | None = None
        self._delegate: trace.Tracer = _NO_OP_TRACER

    def _current(self, context: Context | None) -> trace.Tracer:
        if self._children_only and not trace.get_current_span(context).get_span_context().is_valid:
            return _NO_OP_TRACER
        configuration = _state.configuration
        if configuration is not self._for:
            self._delegate = (
                _NO_OP_TRACER
                if configuration is None
                else configuration.provider.get_tracer(*self._identity)
            )
            self._for = configuration
        return self._delegate

    @override
    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: trace._Links = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        return self._current(context).start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    @override
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: trace._Links = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> AbstractContextManager[trace.Span]:
        return self._current(context).start_as_current_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
            end_on_exit,
        )


class _ConfiguredTracerProvider(trace.TracerProvider):
    def __init__(self, *, children_only: bool = False) -> None:
        self._children_only = children_only

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        return _ConfiguredTracer(
            instrumenting_module_name,
            instrumenting_library_version,
            schema_url,
            attributes,
            children_only=self._children_only,
        )


_NO_OP_TRACER = trace.NoOpTracer()
_provider = _ConfiguredTracerProvider()
# For client libraries whose calls also happen outside any request (see _ConfiguredTracer).
_child_span_provider = _ConfiguredTracerProvider(children_only=True)
_tracer = _provider.get_tracer(__name__)


class TracingHandle:
    """Returned by :func:`configure_tracing`; :meth:`shutdown` (or :meth:`aclose`) at exit."""

    def __init__(self, configuration: _Configuration | None) -> None:
        self._configuration = configuration

    @property
    def enabled(self) -> bool:
        return self._configuration is not None and not self._configuration.closed

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export the finished spans now; ``False`` if that timed out."""
        if self._configuration is None:
            return True
        return self._configuration.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush the spans still queued, stop exporting and undo the instrumentation.

        Blocks while the exporter sends (bounded by its timeout): from async code use
        :meth:`aclose`. Safe to call twice, and on a handle already replaced by a later
        :func:`configure_tracing`.
        """
        provider = _detach(self._configuration)
        if provider is not None:
            provider.shutdown()

    async def aclose(self) -> None:
        """:meth:`shutdown` for async code, e.g. as a gRPC server shutdown hook: the
        exporter's final flush runs in a worker thread, not on the event loop."""
        provider = _detach(self._configuration)
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)


OtlpProtocol = Literal["grpc", "http/protobuf"]
_OTLP_PROTOCOLS: tuple[OtlpProtocol, ...] = ("grpc", "http/protobuf")


@dataclass(frozen=True)
class OtlpExport:
    """Where spans go: the exporter reads ``OTEL_EXPORTER_OTLP_*`` itself when ``endpoint``
    is ``None`` (the spec's rules, e.g. ``/v1/traces`` appended for HTTP); Cake's fallback
    endpoint is passed explicitly."""

    protocol: OtlpProtocol
    endpoint: str | None
    source: str


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def otlp_export(
    cake_endpoint: str | None, environ: Mapping[str, str] | None = None
) -> OtlpExport | None:
    """The OTLP export the environment asks for, ``None`` for none (tracing off).

    The standard variables win over ``cake_endpoint`` (``CAKE_<SVC>_OTLP_ENDPOINT``, always
    OTLP/gRPC); ``OTEL_SDK_DISABLED=true`` turns tracing off whatever else is set.
    """
    env = os.environ if environ is None else environ
    if (_env(env, "OTEL_SDK_DISABLED") or "").lower() == "true":
        return None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if _env(env, name) is not None:
            protocol = (
                _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or _env(env, "OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            )
            if protocol not in _OTLP_PROTOCOLS:
                raise ValueError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported; "
                    f"use one of {', '.join(_OTLP_PROTOCOLS)}"
                )
            return OtlpExport(protocol, None, name)
    if cake_endpoint is not None:
        return OtlpExport("grpc", cake_endpoint, "CAKE_<SVC>_OTLP_ENDPOINT")
    return None


def _resource(service_name: str, environ: Mapping[str, str]) -> Resource:
    """Cake's defaults (``service.name``, ``service.namespace``) under what
    ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` say (the SDK's own order would let
    the code's attributes win over the operator's)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    configured: dict[str, Any] = {}
    for pair in (_env(environ, "OTEL_RESOURCE_ATTRIBUTES") or "").split(","):
        key, separator, value = pair.partition("=")
        if separator and key.strip():
            # The spec's values are percent-encoded (W3C Baggage octets).
            configured[key.strip()] = unquote(value.strip())
    if _env(environ, "OTEL_SERVICE_NAME") is not None:
        configured[SERVICE_NAME] = _env(environ, "OTEL_SERVICE_NAME")
    return Resource.create({SERVICE_NAME: service_name, "service.namespace": "cake", **configured})


def _sampler(sample_ratio: float, environ: Mapping[str, str]) -> Sampler:
    """``OTEL_TRACES_SAMPLER`` (and its ``_ARG``) as the SDK reads them when set; otherwise
    parent-based with ``sample_ratio`` of new traces."""
    from opentelemetry.sdk.trace import sampling

    name = _env(environ, "OTEL_TRACES_SAMPLER")
    if name is None:
        return sampling.ParentBased(root=sampling.TraceIdRatioBased(sample_ratio))
    argument = _env(environ, "OTEL_TRACES_SAMPLER_ARG")
    ratio = 1.0
    if argument is not None:
        try:
            ratio = float(argument)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG {argument!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("OTEL_TRACES_SAMPLER_ARG must be between 0 and 1")
    samplers: dict[str, Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(root=sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(root=sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(root=sampling.TraceIdRatioBased(ratio)),
    }
    if name.lower() not in samplers:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER {name!r} is not supported; use one of {', '.join(samplers)}"
        )
    return samplers[name.lower()]


def _otlp_exporter(export: OtlpExport) -> SpanExporter:
    if export.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter(endpoint=export.endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=export.endpoint)


def configure_tracing(
    service_name: str,
    otlp_endpoint: str | None,
    *,
    exporter: SpanExporter | None = None,
    sample_ratio: float = 1.0,
    environ: Mapping[str, str] | None = None,
) -> TracingHandle:
    """Turn tracing on for this process, or leave it off when there is nowhere to send spans.

    The OTLP export is :func:`otlp_export`'s choice: the standard ``OTEL_EXPORTER_OTLP_*``
    variables, else ``otlp_endpoint`` (e.g. ``http://otel-collector:4317``; ``https://`` for
    TLS); it gets spans in batches from a background thread. ``exporter`` receives each span
    as it ends (tests pass an ``InMemorySpanExporter``). With neither, nothing is installed
    and tracing costs nothing. ``sample_ratio`` samples that share of new traces unless
    ``OTEL_TRACES_SAMPLER`` names a sampler; a trace started upstream keeps the caller's
    decision, so one trace is never half recorded. ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` win over ``service_name``. ``environ`` (tests) stands in
    for ``os.environ``.

    Calling it again replaces the previous configuration (which is shut down first).
    """
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError("sample_ratio must be between 0 and 1")
    env = os.environ if environ is None else environ
    export = otlp_export(otlp_endpoint, env)
    TracingHandle(_state.configuration).shutdown()
    if export is None and exporter is None:
        _log.debug("tracing off: no OTLP endpoint configured")
        return TracingHandle(None)

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = _resource(service_name, env)
    provider = TracerProvider(resource=resource, sampler=_sampler(sample_ratio, env))
    if export is not None:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(export)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))

    _install_global_provider()
    configuration = _Configuration(provider, _instrument_libraries())
    _state.configuration = configuration
    _log.info(
        "tracing configured",
        service=resource.attributes.get("service.name"),
        otlp_endpoint=None if export is None else export.endpoint or _env(env, export.source),
        otlp_protocol=None if export is None else export.protocol,
        configured_by=None if export is None else export.source,
        sampler=provider.sampler.get_description(),
    )
    return TracingHandle(configuration)


def tracing_enabled() -> bool:
    """Whether :func:`configure_tracing` turned tracing on (and it was not shut down)."""
    return _state.configuration is not None


def get_tracer(name: str) -> trace.Tracer:
    """A tracer for ``name`` (a module's ``__name__``) that follows :func:`configure_tracing`."""
    return _provider.get_tracer(name)


def _install_global_provider() -> None:
    current = trace.get_tracer_provider()
    if current is _provider:
        return
    if not isinstance(current, trace.ProxyTracerProvider):
        # Someone (e.g. an auto-instrumentation agent) owns the global provider; Cake's own
        # spans still flow through this module's helpers.
        _log.warning("a global tracer provider is already set; leaving it in place")
        return
    trace.set_tracer_provider(_provider)


def _instrument_libraries() -> list[BaseInstrumentor]:
    from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
    from opentelemetry.instrumentation.grpc.filters import negate, service_prefix
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    grpc_client = GrpcAioInstrumentorClient(  # type: ignore[no-untyped-call]
        filter_=negate(service_prefix("grpc.health.v1."))
    )
    kafka = AIOKafkaInstrumentor()
    redis = RedisInstrumentor()
    grpc_client.instrument(tracer_provider=_provider)
    kafka.instrument(tracer_provider=_provider, async_produce_hook=_keep_innermost_trace_headers)
    redis.instrument(tracer_provider=_child_span_provider)
    return [grpc_client, kafka, redis]


def _detach(configuration: _Configuration | None) -> SdkTracerProvider | None:
    """Undo ``configuration``'s instrumentation (on the caller's thread, which is the event
    loop's for async services); its provider, still to be shut down, or ``None`` if that
    was already done."""
    if configuration is None or configuration.closed:
        return None
    configuration.closed = True
    if _state.configuration is configuration:
        _state.configuration = None
    for instrumentor in configuration.instrumentors:
        instrumentor.uninstrument()
    if configuration.engines:
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

        EngineTracer.remove_all_event_listeners()  # type: ignore[no-untyped-call]
    return configuration.provider


async def _keep_innermost_trace_headers(
    _span: trace.Span, _args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """aiokafka produce hook: the instrumentation APPENDS its ``send`` span's trace context
    to the headers, after any the caller set (the relay sets its own): keep only the last
    of each, so consumers see exactly one ``traceparent`` (the innermost span)."""
    headers = kwargs.get("headers")
    if isinstance(headers, list):
        kwargs["headers"] = _without_earlier_duplicates(headers, TRACE_CONTEXT_KEYS)


def _without_earlier_duplicates(
    headers: Sequence[tuple[str, bytes]], keys: Sequence[str]
) -> list[tuple[str, bytes]]:
    last_index = {key: index for index, (key, _) in enumerate(headers) if key in keys}
    return [
        (key, value)
        for index, (key, value) in enumerate(headers)
        if key not in keys or last_index[key] == index
    ]


def grpc_server_interceptor() -> grpc.aio.ServerInterceptor | None:
    """The OpenTelemetry ``grpc.aio`` server interceptor while tracing is on, else ``None``.

    It must run first: it extracts the caller's ``traceparent`` and opens the SERVER span
    that every inner interceptor, the handler and its database calls run in.
    """
    if _state.configuration is None:
        return None
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_prefix

    untraced = any_of(*(service_prefix(prefix) for prefix in _UNTRACED_GRPC_SERVICES))
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=negate(untraced)
    )
    return interceptor


def instrument_engine(engine: AsyncEngine | Engine) -> None:
    """Trace the statements of ``engine`` as CLIENT spans (no-op while tracing is off).

    Call it after :func:`configure_tracing`, once per engine (repeat calls are ignored).
    Bound parameters are not recorded, only the SQL text. Statements run outside any trace
    (health probes, the relay's polling) are not recorded.
    """
    configuration = _state.configuration
    if configuration is None:
        return
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if sync_engine in configuration.engines:
        return
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.metrics import NoOpMeter

    # Connection-pool usage is a metric, and Cake's metrics are Prometheus: drop it.
    pool_usage = NoOpMeter(__name__).create_up_down_counter("db.client.connections.usage")
    EngineTracer(  # type: ignore[no-untyped-call]
        _child_span_provider.get_tracer("opentelemetry.instrumentation.sqlalchemy"),
        sync_engine,
        pool_usage,
    )
    configuration.engines.add(sync_engine)


def current_trace_headers() -> dict[str, str]:
    """The current span's W3C ``traceparent`` (and ``tracestate``), empty without one."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, ``None`` when there is none.

    A span that was not sampled still has one (flags ``00``), so downstream services make
    the same decision; with tracing off there is no span and so no traceparent.
    """
    return current_trace_headers().get(TRACEPARENT)


def context_from_trace_headers(carrier: Mapping[str, str]) -> Context:
    """A context whose parent is the remote span in ``carrier`` (``traceparent`` and
    optional ``tracestate``); an empty context (spans become roots) if it is missing or
    malformed."""
    return _W3C.extract(carrier, context=Context())


def context_from_traceparent(traceparent: str | None) -> Context:
    """:func:`context_from_trace_headers` for a lone ``traceparent`` (e.g. an outbox row's)."""
    return context_from_trace_headers({TRACEPARENT: traceparent} if traceparent else {})


def start_span_in_context(
    name: str,
    parent: Context,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes = None,
) -> AbstractContextManager[trace.Span]:
    """Start a span as a child of ``parent`` and make it current for the ``with`` block.

    While tracing is off the parent itself becomes current, so :func:`current_traceparent`
    inside the block still passes an upstream trace on instead of dropping it.
    """
    return _tracer.start_as_current_span(name, context=parent, kind=kind, attributes=attributes)


def start_span_from_traceparent(
    name: str,
    traceparent: str | None,
    kind: SpanKind = SpanKind.INTERNAL,
    *,
    attributes: Attributes = None,
) -> AbstractContextManager[trace.Span]:
    """A span continuing the trace of ``traceparent`` (a root span when it is ``None``).

    The relay wraps each published outbox row in one, from the row's ``trace_parent``.
    """
    return start_span_in_context(
        name, context_from_traceparent(traceparent), kind=kind, attributes=attributes
    )


def span_trace_id(span: trace.Span) -> str:
    """The span's trace id as the 32 hex digits of a ``traceparent`` (for logs and tests)."""
    return trace.format_trace_id(span.get_span_context().trace_id)


__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "TRACE_CONTEXT_KEYS",
    "OtlpExport",
    "SpanKind",
    "TracingHandle",
    "configure_tracing",
    "context_from_trace_headers",
    "context_from_traceparent",
    "current_trace_headers",
    "current_traceparent",
    "get_tracer",
    "grpc_server_interceptor",
    "instrument_engine",
    "otlp_export",
    "span_trace_id",
    "start_span_from_traceparent",
    "start_span_in_context",
    "tracing_enabled",
]
