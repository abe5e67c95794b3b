"""PasswordSession's and ClientCredentials' renewals, against fake AuthService stubs (pure
client logic)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cake.auth.v1 import auth_pb2, oauth_pb2
from cake_client import ClientCredentials, PasswordSession


class _Refused(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="no")


class _FakeAuth:
    def __init__(self) -> None:
        self.logins = 0
        self.refreshes: list[str] = []
        self.refuse_refresh: grpc.StatusCode | None = None

    async def Login(self, request: auth_pb2.LoginRequest) -> auth_pb2.LoginResponse:
        await asyncio.sleep(0)
        self.logins += 1
        return auth_pb2.LoginResponse(
            access_token=f"access-login-{self.logins}",
            refresh_token=f"refresh-login-{self.logins}",
            expires_in=100,
        )

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest
    ) -> auth_pb2.RefreshTokenResponse:
        await asyncio.sleep(0)
        self.refreshes.append(request.refresh_token)
        if self.refuse_refresh is not None:
            raise _Refused(self.refuse_refresh)
        n = len(self.refreshes)
        return auth_pb2.RefreshTokenResponse(
            access_token=f"access-refresh-{n}", refresh_token=f"refresh-{n}", expires_in=100
        )


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _session(clock: _Clock) -> PasswordSession:
    return PasswordSession("alice", "pw", renew_before_seconds=10, clock=clock)


async def test_logs_in_once_and_reuses_the_token_while_fresh() -> None:
    auth, clock = _FakeAuth(), _Clock()
    session = _session(clock)
    assert await session.token(auth) == "access-login-1"
    clock.now += 89
    assert await session.token(auth) == "access-login-1"
    assert (auth.logins, auth.refreshes) == (1, [])


async def test_rotates_the_refresh_token_before_expiry() -> None:
    auth, clock = _FakeAuth(), _Clock()
    session = _session(clock)
    await session.token(auth)
    clock.now += 91
    assert await session.token(auth) == "access-refresh-1"
    clock.now += 91
    assert await session.token(auth) == "access-refresh-2"
    # Each refresh presents the token the previous one returned (never one twice).
    assert auth.refreshes == ["refresh-login-1", "refresh-1"]


async def test_concurrent_calls_at_expiry_make_one_refresh() -> None:
    auth, clock = _FakeAuth(), _Clock()
    session = _session(clock)
    await session.token(auth)
    clock.now += 95
    tokens = await asyncio.gather(*(session.token(auth) for _ in range(20)))
    assert set(tokens) == {"access-refresh-1"}
    assert auth.refreshes == ["refresh-login-1"]


async def test_an_ended_session_logs_in_again() -> None:
    auth, clock = _FakeAuth(), _Clock()
    session = _session(clock)
    await session.token(auth)
    clock.now += 95
    auth.refuse_refresh = grpc.StatusCode.UNAUTHENTICATED
    assert await session.token(auth) == "access-login-2"


async def test_other_refresh_errors_reach_the_caller_and_forget_renews() -> None:
    auth, clock = _FakeAuth(), _Clock()
    session = _session(clock)
    await session.token(auth)
    clock.now += 95
    auth.refuse_refresh = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError):
        await session.token(auth)
    assert auth.logins == 1
    auth.refuse_refresh = None
    session.forget()
    assert await session.token(auth) == "access-refresh-2"


def test_empty_credentials_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        PasswordSession("", "pw")


class _FakeTokenEndpoint:
    def __init__(self) -> None:
        self.requests: list[oauth_pb2.TokenRequest] = []

    async def Token(self, request: oauth_pb2.TokenRequest) -> oauth_pb2.TokenResponse:
        await asyncio.sleep(0)
        self.requests.append(request)
        return oauth_pb2.TokenResponse(
            access_token=f"service-{len(self.requests)}",
            token_type="Bearer",
            expires_in=300,
            scope=request.scope or "users:read-contacts",
        )


async def test_client_credentials_cache_the_token_and_renew_before_expiry() -> None:
    endpoint, clock = _FakeTokenEndpoint(), _Clock()
    provider = ClientCredentials(
        "notifications", "s3cret", scopes=["users:read-contacts"], clock=clock
    )
    assert await provider.token(endpoint) == "service-1"  # type: ignore[arg-type]
    clock.now += 269  # 31 s left: still fresh
    assert await provider.token(endpoint) == "service-1"  # type: ignore[arg-type]
    clock.now += 2  # 29 s left: renewed before it expires
    assert await provider.token(endpoint) == "service-2"  # type: ignore[arg-type]
    assert provider.requests == 2
    first = endpoint.requests[0]
    assert (first.grant_type, first.client_id, first.client_secret, first.scope) == (
        "client_credentials",
        "notifications",
        "s3cret",
        "users:read-contacts",
    )
    assert provider.granted_scopes == {"users:read-contacts"}
    provider.forget()
    assert await provider.token(endpoint) == "service-3"  # type: ignore[arg-type]


async def test_concurrent_calls_at_expiry_make_one_token_request() -> None:
    endpoint, clock = _FakeTokenEndpoint(), _Clock()
    provider = ClientCredentials("notifications", "s3cret", clock=clock)
    tokens = await asyncio.gather(*(provider.token(endpoint) for _ in range(20)))  # type: ignore[arg-type]
    assert set(tokens) == {"service-1"}
    assert len(endpoint.requests) == 1


def test_empty_client_credentials_are_refused() -> None:
    with pytest.raises(ValueError, match="client_id"):
        ClientCredentials("", "x")
