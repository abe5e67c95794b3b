"""A base for grpc.aio server interceptors that wrap each call in an async context.

grpc.aio interceptors only see the call *before* the handler runs, in code whose
contextvars are not guaranteed to reach the handler, and cannot observe its outcome. So
instead of acting in ``intercept_service``, each interceptor here returns a copy of the
method handler whose behaviour runs inside a per-call ``async with`` scope: context
variables set there are visible to the servicer, and exceptions from it pass through.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    ServicerContext = grpc.aio.ServicerContext[Any, Any]
    _Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]
else:
    ServicerContext = grpc.aio.ServicerContext

CallScope = Callable[[Any, ServicerContext], AbstractAsyncContextManager[None]]
"""Builds the scope of one call from its request (``None`` when client-streaming) and context."""


def metadata_value(context: ServicerContext, key: str) -> str | None:
    """First value of an (ASCII) invocation metadata key, ``None`` if absent."""
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key and isinstance(value, str):
            return value
    return None


class ScopedServerInterceptor(grpc.aio.ServerInterceptor, ABC):
    """Runs :meth:`scope_for`'s scope around every call of a method, for all four RPC kinds.

    Wrapped handlers are cached per method, so the per-call cost is one dict lookup plus
    the scope itself.
    """

    def __init__(self) -> None:
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    @abstractmethod
    def scope_for(self, method: str) -> CallScope | None:
        """The scope for calls to ``method`` (``/pkg.Service/Method``); ``None`` to pass through."""

    def scope_for_handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> CallScope | None:
        """:meth:`scope_for`, for interceptors that also need the handler (its RPC kind)."""
        return self.scope_for(method)

    def request_deserializer_for(
        self, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> Callable[[bytes], Any] | None:
        """A replacement for the handler's request deserializer (``None``: keep it)."""
        return None

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        scope = self.scope_for_handler(method, handler)
        wrapped = (
            handler
            if scope is None
            else wrap_handler(
                handler, scope, request_deserializer=self.request_deserializer_for(handler)
            )
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    scope: CallScope,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of ``handler`` whose async behaviour runs inside ``scope`` (and whose requests
    are decoded by ``request_deserializer``, if given).

    Synchronous behaviours (run by grpc in a thread pool) are returned unchanged: neither
    context variables nor ``await context.abort`` would work across that thread hop.
    """
    serializers = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        behaviour = _around_unary_response(handler.unary_unary, scope, streaming_request=False)
        return (
            handler
            if behaviour is None
            else grpc.unary_unary_rpc_method_handler(behaviour, **serializers)
        )
    if handler.stream_unary is not None:
        behaviour = _around_unary_response(handler.stream_unary, scope, streaming_request=True)
        return (
            handler
            if behaviour is None
            else grpc.stream_unary_rpc_method_handler(behaviour, **serializers)
        )
    if handler.unary_stream is not None:
        behaviour = _around_stream_response(handler.unary_stream, scope, streaming_request=False)
        return (
            handler
            if behaviour is None
            else grpc.unary_stream_rpc_method_handler(behaviour, **serializers)
        )
    if handler.stream_stream is not None:
        behaviour = _around_stream_response(handler.stream_stream, scope, streaming_request=True)
        return (
            handler
            if behaviour is None
            else grpc.stream_stream_rpc_method_handler(behaviour, **serializers)
        )
    return handler


def _around_unary_response(
    behaviour: Callable[..., Any], scope: CallScope, *, streaming_request: bool
) -> Callable[..., Any] | None:
    if not inspect.iscoroutinefunction(behaviour):
        return None

    async def scoped(request: Any, context: ServicerContext) -> Any:
        async with scope(None if streaming_request else request, context):
            return await behaviour(request, context)

    return scoped


def _around_stream_response(
    behaviour: Callable[..., Any], scope: CallScope, *, streaming_request: bool
) -> Callable[..., Any] | None:
    # grpc.aio picks the calling convention from the function type, so the wrapper must
    # be of the same type: an async generator, or a coroutine using context.write().
    if inspect.isasyncgenfunction(behaviour):

        async def scoped_generator(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            async with scope(None if streaming_request else request, context):
                async for response in behaviour(request, context):
                    yield response

        return scoped_generator
    if inspect.iscoroutinefunction(behaviour):

        async def scoped_writer(request: Any, context: ServicerContext) -> None:
            async with scope(None if streaming_request else request, context):
                await behaviour(request, context)

        return scoped_writer
    return None
