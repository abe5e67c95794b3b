"""The channel from ``connect`` against a real gRPC server: deadlines and retries come from the
service config, tokens from the provider, public methods go without one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_client import StaticToken, connect, service_config_json


class _Auth(auth_pb2_grpc.AuthServiceServicer):
    """Answers GetProfile according to ``script`` and records each call's metadata."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.script: list[Callable[[Any], Any]] = []

    async def GetProfile(self, request: Any, context: Any) -> auth_pb2.GetProfileResponse:
        self.calls.append({key: value for key, value in context.invocation_metadata()})
        if self.script:
            await self.script.pop(0)(context)
        return auth_pb2.GetProfileResponse()

    async def GetJwks(self, request: Any, context: Any) -> auth_pb2.GetJwksResponse:
        self.calls.append({key: value for key, value in context.invocation_metadata()})
        return auth_pb2.GetJwksResponse()


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, _Auth]]:
    auth = _Auth()
    grpc_server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    yield f"127.0.0.1:{port}", auth
    await grpc_server.stop(0)


async def _unavailable(context: Any) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


async def test_reads_are_retried_on_unavailable(server: tuple[str, _Auth]) -> None:
    target, auth = server
    auth.script = [_unavailable, _unavailable]
    async with connect(target, tokens=StaticToken("t")) as cake:
        await cake.auth.GetProfile(auth_pb2.GetProfileRequest())
    assert len(auth.calls) == 3


async def test_retries_stop_at_the_configured_attempts(server: tuple[str, _Auth]) -> None:
    target, auth = server
    auth.script = [_unavailable] * 5
    config = service_config_json(read_attempts=2)
    async with connect(target, tokens=StaticToken("t"), service_config=config) as cake:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cake.auth.GetProfile(auth_pb2.GetProfileRequest())
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert len(auth.calls) == 2


async def test_every_call_gets_the_configured_deadline(server: tuple[str, _Auth]) -> None:
    target, auth = server

    async def hang(context: Any) -> None:
        await asyncio.sleep(30)

    auth.script = [hang]
    config = service_config_json(read_timeout=0.3, read_attempts=1)
    async with connect(target, tokens=StaticToken("t"), service_config=config) as cake:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cake.auth.GetProfile(auth_pb2.GetProfileRequest())
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_tokens_go_where_they_are_needed(server: tuple[str, _Auth]) -> None:
    target, auth = server
    async with connect(target, tokens=StaticToken("abc")) as cake:
        await cake.auth.GetProfile(auth_pb2.GetProfileRequest())
        await cake.auth.GetJwks(auth_pb2.GetJwksRequest())
        await cake.auth.GetProfile(
            auth_pb2.GetProfileRequest(), metadata=(("authorization", "Bearer own"),)
        )
    profile, jwks, own = auth.calls
    assert profile["authorization"] == "Bearer abc"
    assert "authorization" not in jwks
    assert own["authorization"] == "Bearer own"
