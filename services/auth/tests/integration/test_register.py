"""Register through a real gRPC channel against PostgreSQL: rules, normalisation, conflicts."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import jwt
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc

pytestmark = pytest.mark.integration


async def test_register_returns_a_token_and_the_normalised_user(auth: Any) -> None:
    request = auth.registration(fullname="  Ada Lovelace ", birthday="1990-02-28")
    request.email = request.email.replace("user_", "Mixed.Case_").upper()
    request.phone = request.phone[:6] + "-" + request.phone[6:9] + " " + request.phone[9:]
    response = await auth.stub.Register(request)

    user = response.user
    assert user.id > 0
    assert user.fullname == "Ada Lovelace"
    assert user.email == request.email.lower()
    assert user.username == request.username  # casing kept
    assert user.phone == request.phone.replace(" ", "").replace("-", "")
    assert user.birthday == "1990-02-28"
    assert not user.HasField("latest_login")
    assert user.created_at.seconds > 0
    assert user.updated_at == user.created_at

    claims = jwt.decode(response.access_token, options={"verify_signature": False})
    assert (claims["sub"], claims["role"]) == (str(user.id), "user")
    profile = await auth.stub.GetProfile(
        auth_pb2.GetProfileRequest(), metadata=auth.bearer(response.access_token)
    )
    assert profile.user == user


async def test_duplicates_get_cakes_409s(auth: Any) -> None:
    existing = (await auth.register()).user
    fresh = auth.registration()
    cases = [
        (
            {"username": existing.username.swapcase()},
            "Username already exists",
            "USERNAME_TAKEN",
            "username",
        ),
        ({"email": existing.email.upper()}, "Email already exists", "EMAIL_TAKEN", "email"),
        (
            # Same digits, other separators: one phone number.
            {"phone": existing.phone[:3] + " " + existing.phone[3:7] + "-" + existing.phone[7:]},
            "Phone number already exists",
            "PHONE_TAKEN",
            "phone",
        ),
    ]
    for overrides, message, reason, field in cases:
        request = auth_pb2.RegisterRequest()
        request.CopyFrom(fresh)
        for name, value in overrides.items():
            setattr(request, name, value)
        error = await auth.failure(auth.stub.Register(request))
        assert error.code == grpc.StatusCode.ALREADY_EXISTS
        assert error.message == message
        assert (error.reason, error.metadata) == (reason, {"field": field})
    # None of the refused attempts left a row behind: the fresh details are still free.
    await auth.stub.Register(fresh)


async def test_invalid_fields_each_get_one_violation(auth: Any) -> None:
    request = auth.registration(
        fullname="Ada\x00",
        email="not-an-email",
        password="é" * 40,  # 80 bytes
        birthday="2999-01-01",
    )
    error = await auth.failure(auth.stub.Register(request))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "Validation failed"
    # Proto rules are checked first (email, password bytes); the domain's (NUL, past date)
    # once the message passes them.
    assert set(error.violations) == {"email", "password"}

    request = auth.registration(fullname="Ada\x00", birthday="2999-01-01")
    error = await auth.failure(auth.stub.Register(request))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == {
        "fullname": "must not contain NUL characters",
        "birthday": "must be in the past",
    }


@pytest.mark.parametrize(
    ("birthday", "description"),
    [
        ("2001-02-29", "must be a real date in YYYY-MM-DD format"),
        ("2024-00-10", "must be a real date in YYYY-MM-DD format"),
        ("9999-12-31", "must be in the past"),
    ],
)
async def test_birthday_must_be_a_real_past_date(
    auth: Any, birthday: str, description: str
) -> None:
    error = await auth.failure(auth.stub.Register(auth.registration(birthday=birthday)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.violations == {"birthday": description}


@pytest.mark.parametrize("field", ["username", "email", "phone"])
async def test_concurrent_registrations_of_one_value_let_exactly_one_through(
    auth: Any, field: str
) -> None:
    shared = auth.registration()
    requests = []
    for _ in range(10):
        request = auth.registration()
        setattr(request, field, getattr(shared, field))
        requests.append(request)
    # One channel (HTTP/2 connection) per request: the server sees truly parallel calls.
    channels = [grpc.aio.insecure_channel(auth.address) for _ in requests]
    try:
        results = await asyncio.gather(
            *(
                auth_pb2_grpc.AuthServiceStub(channel).Register(request)
                for channel, request in zip(channels, requests, strict=True)
            ),
            return_exceptions=True,
        )
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    created = [r for r in results if isinstance(r, auth_pb2.RegisterResponse)]
    refused = [auth.rich_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1
    assert len(refused) == 9
    assert {(e.code, e.metadata["field"]) for e in refused} == {
        (grpc.StatusCode.ALREADY_EXISTS, field)
    }
