"""cake-client against the real stack, through the gateway's native gRPC routes: a user
session that logs in once and rotates its refresh token, a service account's client
credentials, and the library's runnable example."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from cake.auth.v1 import auth_pb2, oauth_pb2
from cake.promotions.v1 import promotions_pb2
from cake_client import ClientCredentials, PasswordSession, StaticToken, connect
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).parents[2] / "libs" / "client" / "examples" / "my_account.py"


def _gateway_target(stack: Stack) -> str:
    return stack.gateway_url.removeprefix("http://")


async def _register(target: str) -> tuple[auth_pb2.RegisterResponse, str]:
    suffix = uuid.uuid4().hex[:10]
    password = f"client-{suffix}"
    async with connect(target) as cake:
        registered = await cake.auth.Register(
            auth_pb2.RegisterRequest(
                fullname="Client Test",
                username=f"client_{suffix}",
                email=f"client_{suffix}@example.com",
                phone=f"+849{int(suffix, 16) % 10**8:08d}",
                password=password,
                birthday="1990-01-01",
            )
        )
    return registered, password


async def test_a_password_session_logs_in_once_and_rotates(full_stack: Stack) -> None:
    target = _gateway_target(full_stack)
    registered, password = await _register(target)
    # Renewing a minute before expiry with 15-minute tokens would not renew in this test:
    # asking for more than the token's lifetime makes every call rotate the refresh token.
    session = PasswordSession(registered.user.username, password, renew_before_seconds=10**6)
    async with connect(target, tokens=session) as cake:
        for _ in range(3):
            profile = await cake.auth.GetProfile(auth_pb2.GetProfileRequest())
            assert profile.user.id == registered.user.id
        vouchers = await cake.promotions.ListMyVouchers(promotions_pb2.ListMyVouchersRequest())
    # One login; every later call presented the refresh token the previous one returned (a
    # reused one would have ended the session and forced a second login).
    assert (session.logins, session.refreshes) == (1, 3)
    assert list(vouchers.vouchers) == []


async def test_a_logged_out_token_is_refused_to_the_client(full_stack: Stack) -> None:
    target = _gateway_target(full_stack)
    registered, _ = await _register(target)
    async with connect(target, tokens=StaticToken(registered.access_token)) as cake:
        await cake.auth.Logout(auth_pb2.LogoutRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cake.auth.GetProfile(auth_pb2.GetProfileRequest())
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def _run_example(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_example_runs_against_the_stack(full_stack: Stack) -> None:
    target = _gateway_target(full_stack)
    registered, password = await _register(target)
    code, out, err = await _run_example(target, registered.user.email, password)
    assert code == 0, err
    assert out.splitlines() == [
        f"user {registered.user.id} {registered.user.username} <{registered.user.email}>",
        "vouchers: 0",
    ]
    code, _, err = await _run_example(target, registered.user.email, "not-the-password")
    assert (code, err.split(":")[0]) == (1, "UNAUTHENTICATED")


async def test_client_credentials_get_one_token_and_reach_what_their_scope_allows(
    full_stack: Stack,
) -> None:
    target = _gateway_target(full_stack)
    registered, _ = await _register(target)
    name = f"client-{uuid.uuid4().hex[:10]}"
    created = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cake_auth",
        "create-service-account",
        name,
        "--scope",
        "users:read-contacts",
        env={**os.environ, **full_stack.service_environment()["auth"]},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await created.communicate()
    assert created.returncode == 0, err.decode()
    secret = next(
        line.partition("=")[2]
        for line in out.decode().splitlines()
        if line.startswith("client_secret=")
    )
    provider = ClientCredentials(name, secret, scopes=["users:read-contacts"])
    async with connect(target, tokens=provider) as cake:
        for _ in range(3):
            contacts = await cake.auth.GetUserContacts(
                oauth_pb2.GetUserContactsRequest(user_id=registered.user.id)
            )
            assert contacts.email == registered.user.email
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cake.auth.GetProfile(auth_pb2.GetProfileRequest())
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert provider.requests == 1
    assert provider.granted_scopes == {"users:read-contacts"}
