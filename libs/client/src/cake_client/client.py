"""``connect``: one channel to Cake with deadlines, retries and bearer tokens, and its stubs."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import grpc
from cake.access.v1 import access_pb2
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.events.v1 import admin_pb2, admin_pb2_grpc
from cake.promotions.v1 import promotions_pb2, promotions_pb2_grpc

from cake_client.service_config import service_config_json
from cake_client.tokens import TokenProvider


def _tokenless_methods() -> frozenset[str]:
    """The methods the contracts declare public or token-optional (``cake.access.v1.access``):
    the body carries the credentials (login, refresh, the OAuth token request), or nothing
    is needed."""
    names = set()
    for module in (auth_pb2, promotions_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                access = method.GetOptions().Extensions[access_pb2.access]
                if access.public or access.token_optional:
                    names.add(f"/{service.full_name}/{method.name}")
    return frozenset(names)


#: Methods that take no bearer token.
PUBLIC_METHODS = _tokenless_methods()


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


if TYPE_CHECKING:
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor


class BearerTokenInterceptor(_UnaryUnaryInterceptor):
    """Adds ``authorization: Bearer <token>`` from the provider to every non-public call that
    does not carry its own ``authorization`` metadata."""

    def __init__(self, tokens: TokenProvider) -> None:
        self._tokens = tokens
        self._auth: auth_pb2_grpc.AuthServiceAsyncStub | None = None

    def attach(self, auth: auth_pb2_grpc.AuthServiceAsyncStub) -> None:
        self._auth = auth

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        metadata = list(client_call_details.metadata or ())
        needs_token = _method_name(client_call_details) not in PUBLIC_METHODS and not any(
            key.lower() == "authorization" for key, _ in metadata
        )
        if needs_token:
            if self._auth is None:
                raise RuntimeError("BearerTokenInterceptor used before attach()")
            token = await self._tokens.token(self._auth)
            metadata.append(("authorization", f"Bearer {token}"))
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                grpc.aio.Metadata(*metadata),
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


class CakeClient:
    """Typed stubs over one channel; ``async with`` closes the channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.promotions = promotions_pb2_grpc.PromotionsServiceStub(channel)
        self.events_admin = admin_pb2_grpc.EventAdminServiceStub(channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> CakeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def connect(
    target: str,
    *,
    tokens: TokenProvider | None = None,
    tls: bool = False,
    root_certificates: bytes | None = None,
    service_config: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> CakeClient:
    """A client for ``target`` (``host:port`` of the gateway or a service).

    ``tokens`` signs the calls that need a user; ``tls`` (with ``root_certificates``, else the
    system's) for a gateway behind TLS; ``service_config`` replaces the default deadlines and
    retries (:func:`cake_client.service_config.service_config_json`)."""
    channel_options = [
        ("grpc.service_config", service_config or service_config_json()),
        ("grpc.enable_retries", 1),
        *options,
    ]
    interceptor = BearerTokenInterceptor(tokens) if tokens is not None else None
    # grpc-stubs types this parameter as a placeholder that must be cast.
    interceptors = cast(Any, [interceptor] if interceptor is not None else None)
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        channel = grpc.aio.secure_channel(
            target, credentials, options=channel_options, interceptors=interceptors
        )
    else:
        channel = grpc.aio.insecure_channel(
            target, options=channel_options, interceptors=interceptors
        )
    client = CakeClient(channel)
    if interceptor is not None:
        interceptor.attach(client.auth)
    return client
