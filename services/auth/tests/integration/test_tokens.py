"""Tokens through real gRPC calls: every bad token is UNAUTHENTICATED; refresh, logout, JWKS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import redis.asyncio
from cake.auth.v1 import auth_pb2
from cake_auth.adapters.signing_keys import (
    JWKS_FILENAME,
    SIGNING_KEY_FILENAME,
    SigningKey,
    generate_key_pair,
    read_jwks,
)
from cake_auth.domain.tokens import access_token_claims
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

pytestmark = pytest.mark.integration

GET = auth_pb2.GetProfileRequest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(user_id: int, **overrides: Any) -> dict[str, Any]:
    """A valid user token's claims, as auth's domain builds them, then ``overrides``."""
    claims = access_token_claims(
        user_id=user_id,
        role="user",
        issuer="cake-system",
        audience="cake-users",
        issued_at=datetime.now(UTC).replace(microsecond=0),
        ttl_seconds=600,
        jti=str(uuid.uuid4()),
        session_id=uuid.uuid4().hex,
    )
    claims.update(overrides)
    return claims


def _signed(key: SigningKey, claims: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(
        claims, key.private_key, algorithm="ES256", headers={"kid": key.kid, **headers}
    )


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(signature)}"


def _hs256_with_public_key(key: SigningKey, claims: dict[str, Any]) -> str:
    """The classic confusion attack: the public key (PEM, as published) as an HMAC secret."""
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    secret = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _tampered(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


BadToken = Callable[[SigningKey, int, str], str]

BAD_TOKENS: dict[str, BadToken] = {
    "expired": lambda key, uid, _: _signed(
        key, _claims(uid, iat=int(time.time()) - 700, exp=int(time.time()) - 100)
    ),
    "wrong audience": lambda key, uid, _: _signed(key, _claims(uid, aud="other-audience")),
    "wrong issuer": lambda key, uid, _: _signed(key, _claims(uid, iss="evil-issuer")),
    "alg none": lambda key, uid, _: _unsigned({"alg": "none", "kid": key.kid}, _claims(uid)),
    "alg none, lower-case signature part": lambda key, uid, _: _unsigned(
        {"alg": "None", "typ": "JWT", "kid": key.kid}, _claims(uid), b"x"
    ),
    "HS256 signed with the public key": lambda key, uid, _: _hs256_with_public_key(
        key, _claims(uid)
    ),
    "unknown kid": lambda key, uid, _: _signed(
        SigningKey.from_private_key(ec.generate_private_key(ec.SECP256R1())), _claims(uid)
    ),
    "known kid, other key": lambda key, uid, _: jwt.encode(
        _claims(uid),
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": key.kid},
    ),
    "tampered payload (other user)": lambda key, uid, valid: _tampered(valid, sub=str(uid + 1)),
    "tampered payload (admin role)": lambda key, uid, valid: _tampered(valid, role="admin"),
    "no kid": lambda key, uid, _: jwt.encode(_claims(uid), key.private_key, algorithm="ES256"),
    "missing jti": lambda key, uid, _: _signed(
        key, {k: v for k, v in _claims(uid).items() if k != "jti"}
    ),
    "not a jwt": lambda key, uid, _: "definitely-not-a-token",
    "truncated": lambda key, uid, valid: valid[: len(valid) // 2],
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_are_unauthenticated(
    auth: Any, signing_key: SigningKey, case: str
) -> None:
    registered = await auth.register()
    token = BAD_TOKENS[case](signing_key, registered.user.id, registered.access_token)
    for call in (
        auth.stub.GetProfile(GET, metadata=auth.bearer(token)),
        auth.stub.RefreshToken(auth_pb2.RefreshTokenRequest(), metadata=auth.bearer(token)),
        auth.stub.Logout(auth_pb2.LogoutRequest(), metadata=auth.bearer(token)),
    ):
        error = await auth.failure(call)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED, case


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", ""),),
        (("authorization", "Bearer"),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer  a b c"),),
    ],
)
async def test_missing_or_malformed_authorization(auth: Any, metadata: Any) -> None:
    error = await auth.failure(auth.stub.GetProfile(GET, metadata=metadata))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


async def test_hand_made_valid_token_is_accepted(auth: Any, signing_key: SigningKey) -> None:
    """Control for the cases above: a well-formed token of the same shape works."""
    registered = await auth.register()
    token = _signed(signing_key, _claims(registered.user.id))
    profile = await auth.stub.GetProfile(GET, metadata=auth.bearer(token))
    assert profile.user.id == registered.user.id


async def test_cake_form_refresh_exchanges_the_bearer_token_once(auth: Any) -> None:
    registered = await auth.register()
    assert registered.expires_in == auth.settings.access_token_ttl_seconds
    refreshed = await auth.stub.RefreshToken(
        auth_pb2.RefreshTokenRequest(), metadata=auth.bearer(registered.access_token)
    )
    old = jwt.decode(registered.access_token, options={"verify_signature": False})
    new = jwt.decode(refreshed.access_token, options={"verify_signature": False})
    assert (new["sub"], new["role"], new["sid"]) == (old["sub"], old["role"], old["sid"])
    assert new["jti"] != old["jti"]
    assert new["exp"] - new["iat"] == auth.settings.access_token_ttl_seconds
    assert refreshed.expires_in == auth.settings.access_token_ttl_seconds
    await auth.stub.GetProfile(GET, metadata=auth.bearer(refreshed.access_token))
    # The exchanged token is refused from now on (it cannot be refreshed again either).
    for call in (
        auth.stub.GetProfile(GET, metadata=auth.bearer(registered.access_token)),
        auth.stub.RefreshToken(
            auth_pb2.RefreshTokenRequest(), metadata=auth.bearer(registered.access_token)
        ),
    ):
        error = await auth.failure(call)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")


async def test_refresh_token_rotation_and_reuse_detection(auth: Any) -> None:
    registered = await auth.register()
    first = registered.refresh_token
    second = await auth.stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=first))
    third = await auth.stub.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=second.refresh_token)
    )
    await auth.stub.GetProfile(GET, metadata=auth.bearer(third.access_token))

    # A thief replays the first token: the whole session ends, the owner's tokens too.
    error = await auth.failure(
        auth.stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=first))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    for call in (
        auth.stub.GetProfile(GET, metadata=auth.bearer(third.access_token)),
        auth.stub.GetProfile(GET, metadata=auth.bearer(registered.access_token)),
    ):
        error = await auth.failure(call)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    error = await auth.failure(
        auth.stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=third.refresh_token))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")
    error = await auth.failure(
        auth.stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token="not-a-token"))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_INVALID")


async def test_concurrent_refreshes_of_one_token_rotate_at_most_once(auth: Any) -> None:
    registered = await auth.register()
    results = await asyncio.gather(
        *(
            auth.stub.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=registered.refresh_token)
            )
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    successes = [r for r in results if not isinstance(r, BaseException)]
    assert len(successes) <= 1
    assert len(successes) + sum(isinstance(r, grpc.aio.AioRpcError) for r in results) == 8


async def test_logout_all_and_an_admin_end_every_session(auth: Any) -> None:
    registered = await auth.register()
    login = auth_pb2.LoginRequest(
        account=registered.user.username, password="correct horse battery"
    )
    phone, laptop = await auth.stub.Login(login), await auth.stub.Login(login)
    ended = await auth.stub.LogoutAll(
        auth_pb2.LogoutAllRequest(), metadata=auth.bearer(phone.access_token)
    )
    assert ended.ended_sessions == 3
    for token in (registered.access_token, phone.access_token, laptop.access_token):
        error = await auth.failure(auth.stub.GetProfile(GET, metadata=auth.bearer(token)))
        assert error.reason == "TOKEN_REVOKED"

    tablet = await auth.stub.Login(login)
    request = auth_pb2.EndUserSessionsRequest(user_id=registered.user.id)
    error = await auth.failure(
        auth.stub.EndUserSessions(request, metadata=auth.bearer(tablet.access_token))
    )
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    ended = await auth.stub.EndUserSessions(request, metadata=auth.bearer(auth.admin_token()))
    assert ended.ended_sessions == 1
    error = await auth.failure(auth.stub.GetProfile(GET, metadata=auth.bearer(tablet.access_token)))
    assert error.reason == "TOKEN_REVOKED"
    error = await auth.failure(
        auth.stub.EndUserSessions(
            auth_pb2.EndUserSessionsRequest(user_id=987654321),
            metadata=auth.bearer(auth.admin_token()),
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND


async def test_logout_denylists_the_token_until_it_expires(
    auth: Any, redis_client: redis.asyncio.Redis
) -> None:
    registered = await auth.register()
    other_session = await auth.stub.Login(
        auth_pb2.LoginRequest(account=registered.user.username, password="correct horse battery")
    )
    token = registered.access_token
    await auth.stub.Logout(auth_pb2.LogoutRequest(), metadata=auth.bearer(token))

    for call in (
        auth.stub.GetProfile(GET, metadata=auth.bearer(token)),
        auth.stub.RefreshToken(auth_pb2.RefreshTokenRequest(), metadata=auth.bearer(token)),
        auth.stub.UpdateProfile(
            auth_pb2.UpdateProfileRequest(fullname="x"), metadata=auth.bearer(token)
        ),
        auth.stub.Logout(auth_pb2.LogoutRequest(), metadata=auth.bearer(token)),
    ):
        error = await auth.failure(call)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")

    sid = jwt.decode(token, options={"verify_signature": False})["sid"]
    ttl = await redis_client.ttl(f"{auth.settings.revocation_key_prefix}sid:{sid}")
    longest = auth.settings.access_token_ttl_seconds + auth.settings.jwt_leeway_seconds
    assert longest - 60 < ttl <= longest
    # Only that token: the user's other session goes on.
    await auth.stub.GetProfile(GET, metadata=auth.bearer(other_session.access_token))


async def test_jwks_is_public_and_lists_the_published_keys(auth: Any, keys_dir: Path) -> None:
    response = await auth.stub.GetJwks(auth_pb2.GetJwksRequest())
    published = read_jwks(keys_dir / JWKS_FILENAME)
    assert [
        {field: getattr(key, field) for field in ("kty", "crv", "x", "y", "kid", "use", "alg")}
        for key in response.keys
    ] == published


async def test_rotation_publishes_old_keys_and_accepts_their_tokens(
    start_auth_server: Any, tmp_path: Path
) -> None:
    old = generate_key_pair(tmp_path)
    current = generate_key_pair(tmp_path)
    server = await start_auth_server(
        jwt_private_key_file=tmp_path / SIGNING_KEY_FILENAME,
        jwks_file=tmp_path / JWKS_FILENAME,
    )
    response = await server.stub.GetJwks(auth_pb2.GetJwksRequest())
    assert [key.kid for key in response.keys] == [current.kid, old.kid]

    registered = await server.register()
    assert jwt.get_unverified_header(registered.access_token)["kid"] == current.kid
    signed_by_old_key = _signed(old, _claims(registered.user.id))
    profile = await server.stub.GetProfile(GET, metadata=server.bearer(signed_by_old_key))
    assert profile.user.id == registered.user.id


async def test_server_refuses_to_start_with_an_unpublished_signing_key(
    start_auth_server: Any, tmp_path: Path
) -> None:
    from cake_auth.adapters.signing_keys import SigningKeyError

    generate_key_pair(tmp_path / "published")
    generate_key_pair(tmp_path / "other")
    with pytest.raises(SigningKeyError, match="not published"):
        await start_auth_server(
            jwt_private_key_file=tmp_path / "other" / SIGNING_KEY_FILENAME,
            jwks_file=tmp_path / "published" / JWKS_FILENAME,
        )
