"""Redis is optional: with it down every RPC still answers (no 5xx), and it is used again
as soon as it is back, without a restart.

The shared test Redis is not stopped (other tests use it): one server points at a port
nothing listens on, another at a private ``redis-server`` this module starts and kills.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cake.auth.v1 import auth_pb2
from cake_devtools.stack.component import require_binary
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration

DEAD_REDIS = "redis://127.0.0.1:1/0"
PASSWORD = "correct horse battery"
GET = auth_pb2.GetProfileRequest()


async def _health(server: Any, name: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
    return int(response.status)


async def test_every_rpc_works_without_redis(start_auth_server: Any) -> None:
    server = await start_auth_server(redis_url=DEAD_REDIS, login_max_failures=2)
    registered = await server.register()
    user = registered.user

    # The throttle falls back to this process's memory: still counted, still limited.
    for _ in range(2):
        error = await server.failure(
            server.stub.Login(auth_pb2.LoginRequest(account=user.username, password="wrong"))
        )
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
    error = await server.failure(
        server.stub.Login(auth_pb2.LoginRequest(account=user.username, password=PASSWORD))
    )
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await asyncio.sleep(1.1)  # the first delay (1 s) has passed
    logged_in = await server.stub.Login(
        auth_pb2.LoginRequest(account=user.username, password=PASSWORD)
    )
    caller = server.bearer(logged_in.access_token)

    for _ in range(2):  # the cache is bypassed: both reads go to PostgreSQL
        assert (await server.stub.GetProfile(GET, metadata=caller)).user.id == user.id
    updated = await server.stub.UpdateProfile(
        auth_pb2.UpdateProfileRequest(fullname="No Cache"), metadata=caller
    )
    assert updated.user.fullname == "No Cache"
    assert (await server.stub.GetProfile(GET, metadata=caller)).user.fullname == "No Cache"
    # Rotating by refresh token needs only PostgreSQL (the session's authority).
    rotated = await server.stub.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=logged_in.refresh_token)
    )
    assert rotated.refresh_token and rotated.refresh_token != logged_in.refresh_token
    assert len((await server.stub.GetJwks(auth_pb2.GetJwksRequest())).keys) >= 1

    # Cake's form must refuse the old access token everywhere, which needs Redis: 503.
    error = await server.failure(
        server.stub.RefreshToken(auth_pb2.RefreshTokenRequest(), metadata=caller)
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "TOKEN_REVOCATION_UNAVAILABLE",
    )
    # A revocation cannot be stored: say so (retryable 503) rather than pretend. The
    # session is ended in PostgreSQL all the same, so its refresh token is dead.
    error = await server.failure(server.stub.Logout(auth_pb2.LogoutRequest(), metadata=caller))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "TOKEN_REVOCATION_UNAVAILABLE"
    error = await server.failure(
        server.stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=rotated.refresh_token))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")

    # The revocation check cannot answer: user tokens are accepted (bounded by their 15
    # minutes), admin tokens refused (fail closed).
    admin = server.bearer(server.admin_token())
    error = await server.failure(
        server.stub.EndUserSessions(
            auth_pb2.EndUserSessionsRequest(user_id=user.id), metadata=admin
        )
    )
    assert (error.code, error.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "REVOCATION_CHECK_UNAVAILABLE",
    )

    assert server.counter("cake_auth_redis_bypassed_total", operation="revoke_sessions") > 0
    assert server.counter("cake_auth_redis_bypassed_total", operation="profile_cache_get") > 0
    assert server.counter("cake_auth_redis_bypassed_total", operation="login_throttle_reserve") > 0
    assert server.counter("cake_auth_profile_cache_lookups_total", result="bypassed") >= 3

    # Degraded, not down: overall SERVING, the redis component NOT_SERVING.
    assert await _health(server, "") == health_pb2.HealthCheckResponse.SERVING
    assert await _health(server, "redis") == health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateRedis:
    """A throwaway redis-server on its own port that a test may kill and restart."""

    def __init__(self, directory: Path) -> None:
        # The test stack runs redis-server too, so it is there; if not, fail and say why.
        self._binary = require_binary(
            "redis-server", "run tools/bootstrap.sh (apt package redis-server)"
        )
        self._directory = directory
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    yield redis_server
    redis_server.kill()


async def _eventually(check: Any) -> None:
    """Retry ``check`` until it stops raising (the bypass cooldown is one second)."""
    async with asyncio.timeout(10):
        while True:
            try:
                await check()
                return
            except (AssertionError, grpc.aio.AioRpcError):
                await asyncio.sleep(0.2)


async def test_redis_outage_and_recovery_without_restart(
    start_auth_server: Any, private_redis: PrivateRedis
) -> None:
    server = await start_auth_server(redis_url=private_redis.url)
    registered = await server.register()
    caller = server.bearer(registered.access_token)
    await server.stub.GetProfile(GET, metadata=caller)
    await server.stub.GetProfile(GET, metadata=caller)
    # The second from Redis or (over a second after the token's iat) from memory.
    assert (
        server.counter("cake_auth_profile_cache_lookups_total", result="hit")
        + server.counter("cake_auth_profile_cache_lookups_total", result="memory")
        == 1
    )

    private_redis.kill()
    assert (await server.stub.GetProfile(GET, metadata=caller)).user.id == registered.user.id
    error = await server.failure(server.stub.Logout(auth_pb2.LogoutRequest(), metadata=caller))
    assert error.code == grpc.StatusCode.UNAVAILABLE

    private_redis.start()  # empty: the old cache entry is gone with the old process

    async def logout_works() -> None:
        await server.stub.Logout(auth_pb2.LogoutRequest(), metadata=caller)

    await _eventually(logout_works)
    # The denylist is honoured again, so the logged-out token is refused.
    error = await server.failure(server.stub.GetProfile(GET, metadata=caller))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
