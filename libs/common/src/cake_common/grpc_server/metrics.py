"""Per-method gRPC server metrics (calls started, calls by status code, latency) for
Prometheus, under the names and labels go-grpc-prometheus and py-grpc-prometheus use
(``grpc_server_started_total``, ``grpc_server_handled_total``, ``grpc_server_handling_seconds``
with ``grpc_type``, ``grpc_service``, ``grpc_method`` and ``grpc_code``), so community gRPC
dashboards and alerts work on Cake's services as they are.

Written here rather than taken from py-grpc-prometheus: that package wraps the synchronous
``grpc.ServerInterceptor`` API, and Cake's servers are ``grpc.aio``, whose interceptors cannot
see a call's outcome (see :mod:`cake_common.grpc_server.call_scope`).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from functools import partial
from types import TracebackType
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from cake_common.grpc_server.call_scope import CallScope, ScopedServerInterceptor, ServicerContext

# Login is ~60 ms of bcrypt; reads are sub-millisecond to a few ms.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GrpcServerMetrics:
    """The collectors, registered once per registry (several servers may share one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started",
            "RPCs started on the server, by method",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by method and status code",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server, by method",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )


def grpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    """The RPC kind as the conventional ``grpc_type`` label names it."""
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, GrpcServerMetrics] = (
    weakref.WeakKeyDictionary()
)


def grpc_server_metrics(registry: CollectorRegistry = REGISTRY) -> GrpcServerMetrics:
    """The gRPC server collectors of ``registry``, created on first use."""
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = _metrics_by_registry[registry] = GrpcServerMetrics(registry)
    return metrics


class MetricsInterceptor(ScopedServerInterceptor):
    """Counts every call by final status code and observes its latency.

    Placed right after the request-id interceptor, so it sees the code that error mapping
    and auth chose. Only methods the server implements are labelled: unknown method names
    sent by clients cannot blow up label cardinality.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__()
        self._metrics = grpc_server_metrics(registry)

    def scope_for(self, method: str) -> CallScope | None:
        return self._scope(method, "unary")

    def scope_for_handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> CallScope | None:
        return self._scope(method, grpc_type(handler))

    def _scope(self, method: str, kind: str) -> CallScope:
        service, _, name = method.lstrip("/").partition("/")
        handled = self._metrics.handled
        calls = self._metrics.started.labels(kind, service, name)
        latency = self._metrics.handling_seconds.labels(kind, service, name)
        by_code = {code: handled.labels(kind, service, name, code.name) for code in grpc.StatusCode}
        return partial(_MetricsScope, calls, latency, by_code)


class _MetricsScope:
    """One call's :class:`MetricsInterceptor` scope (a class: see ``call_scope``'s
    docstring)."""

    __slots__ = ("_by_code", "_calls", "_context", "_latency", "_started")

    def __init__(
        self,
        calls: Counter,
        latency: Histogram,
        by_code: dict[grpc.StatusCode, Counter],
        _request: Any,
        context: ServicerContext,
    ) -> None:
        self._calls = calls
        self._latency = latency
        self._by_code = by_code
        self._context = context

    async def __aenter__(self) -> None:
        self._calls.inc()
        self._started = time.perf_counter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            code = self._context.code() or grpc.StatusCode.OK
        elif issubclass(exc_type, grpc.aio.AbortError):
            code = self._context.code() or grpc.StatusCode.UNKNOWN
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
        self._by_code[code].inc()
        self._latency.observe(time.perf_counter() - self._started)
