from __future__ import annotations

import base64
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cake_common.errors import Unauthenticated, Unavailable
from cake_common.jwt import (
    FetchingJwksProvider,
    FileJwksProvider,
    JwtVerifier,
    Principal,
    StaticJwksProvider,
    jwk_from_public_key,
    parse_jwks,
)
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_valid_token_gives_principal(verifier: JwtVerifier, make_token: Any) -> None:
    token = make_token(sub="7", role="admin", ttl=60, jti="abc", sid="session-1")
    principal = await verifier.verify(token)
    assert principal == Principal(
        user_id=7,
        role="admin",
        jti="abc",
        expires_at=principal.expires_at,
        session_id="session-1",
        issued_at=principal.issued_at,
    )
    assert principal.is_admin
    assert principal.expires_at.tzinfo is UTC
    assert abs(principal.expires_at.timestamp() - (time.time() + 60)) < 5
    assert principal.issued_at is not None and principal.issued_at.tzinfo is UTC
    assert abs(principal.issued_at.timestamp() - time.time()) < 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ttl": -10}, "Token has expired"),
        ({"aud": "someone-else"}, "Invalid token audience"),
        ({"iss": "evil"}, "Invalid token issuer"),
        ({"drop": ("jti",)}, "Token is missing the jti claim"),
        ({"drop": ("role",)}, "Token is missing the role claim"),
        ({"drop": ("sub",)}, "Token is missing the sub claim"),
        ({"drop": ("iat",)}, "Token is missing the iat claim"),
        ({"iat": int(time.time()) + 3600}, "Token is not yet valid"),
        ({"sub": "not-a-number"}, "Invalid token subject"),
        ({"headers": {"kid": "unknown"}}, "Unknown token signing key"),
    ],
)
async def test_claim_problems_are_unauthenticated(
    verifier: JwtVerifier, make_token: Any, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(make_token(**overrides))
    assert caught.value.message == message


async def test_expired_has_its_own_reason(verifier: JwtVerifier, make_token: Any) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(make_token(ttl=-1))
    assert caught.value.reason == "TOKEN_EXPIRED"


async def test_leeway_accepts_recently_expired(jwks: dict[str, Any], make_token: Any) -> None:
    lenient = JwtVerifier(
        StaticJwksProvider(jwks), issuer="cake-system", audience="cake-users", leeway_seconds=30
    )
    assert (await lenient.verify(make_token(ttl=-5))).user_id == 42


async def test_alg_none_rejected(verifier: JwtVerifier, make_token: Any) -> None:
    payload = make_token().split(".")[1]
    unsigned_header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "test-key-1"}).encode())
    for token in (f"{unsigned_header}.{payload}.", f"{unsigned_header}.{payload}"):
        with pytest.raises(Unauthenticated):
            await verifier.verify(token)


async def test_hs256_signed_with_public_key_rejected(
    verifier: JwtVerifier, signing_key: Any, make_token: Any
) -> None:
    # The classic confusion attack: HMAC "secret" = the server's public key.
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signing_key.kid}).encode())
    payload = make_token().split(".")[1]
    import hashlib
    import hmac

    signature = hmac.new(
        signing_key.public_pem, f"{header}.{payload}".encode(), hashlib.sha256
    ).digest()
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(f"{header}.{payload}.{_b64(signature)}")
    assert caught.value.message == "Unsupported token algorithm"


async def test_rs256_rejected_even_with_matching_key(make_token: Any) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    rsa_jwk["kid"] = "test-key-1"
    verifier = JwtVerifier(
        StaticJwksProvider({"keys": [rsa_jwk]}), issuer="cake-system", audience="cake-users"
    )
    token = make_token(key=rsa_key, algorithm="RS256")
    with pytest.raises(Unauthenticated):
        await verifier.verify(token)


async def test_missing_kid_rejected(verifier: JwtVerifier, signing_key: Any) -> None:
    now = int(time.time())
    token = jwt.encode(
        {
            "sub": "1",
            "role": "user",
            "iss": "cake-system",
            "aud": "cake-users",
            "iat": now,
            "exp": now + 60,
            "jti": "x",
            "sid": "s",
        },
        signing_key.private_key,
        algorithm="ES256",
    )
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token)
    assert caught.value.message == "Token has no key id"


async def test_signed_by_another_key_with_same_kid_rejected(
    verifier: JwtVerifier, make_token: Any
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(make_token(key=other))
    assert caught.value.message == "Invalid token signature"


async def test_tampered_payload_rejected(verifier: JwtVerifier, make_token: Any) -> None:
    header, payload, signature = make_token(role="user").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "admin"
    forged = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(Unauthenticated):
        await verifier.verify(forged)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer x"])
async def test_garbage_rejected(verifier: JwtVerifier, garbage: str) -> None:
    with pytest.raises(Unauthenticated):
        await verifier.verify(garbage)


def test_parse_jwks_keeps_only_es256_signing_keys(signing_key: Any) -> None:
    rsa_jwk = json.loads(
        jwt.algorithms.RSAAlgorithm.to_jwk(
            rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        )
    )
    p384 = jwk_from_public_key(ec.generate_private_key(ec.SECP256R1()).public_key(), "p384")
    p384["crv"] = "P-384"
    no_kid = dict(signing_key.jwk)
    del no_kid["kid"]
    encryption = {**signing_key.jwk, "kid": "enc", "use": "enc"}
    keys = parse_jwks(
        {"keys": [signing_key.jwk, {**rsa_jwk, "kid": "rsa"}, p384, no_kid, encryption]}
    )
    assert list(keys) == [signing_key.kid]
    assert parse_jwks(json.dumps({"keys": [signing_key.jwk]})).keys() == {signing_key.kid}
    with pytest.raises(ValueError, match="keys"):
        parse_jwks({"nokeys": []})


def test_jwk_from_public_key_rejects_other_curves() -> None:
    with pytest.raises(ValueError, match="P-256"):
        jwk_from_public_key(ec.generate_private_key(ec.SECP384R1()).public_key(), "k")


async def test_file_provider_rereads_on_change(
    tmp_path: Path, signing_key: Any, make_token: Any
) -> None:
    path = tmp_path / "jwks.json"
    other = ec.generate_private_key(ec.SECP256R1())
    path.write_text(json.dumps({"keys": [jwk_from_public_key(other.public_key(), "old")]}))
    verifier = JwtVerifier(FileJwksProvider(path), issuer="cake-system", audience="cake-users")
    with pytest.raises(Unauthenticated, match="Unknown token signing key"):
        await verifier.verify(make_token())

    path.write_text(json.dumps({"keys": [signing_key.jwk]}))
    # Same-second rewrites must still be noticed even where mtime is coarse.
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert (await verifier.verify(make_token())).user_id == 42

    path.write_text("{not json")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000_000))
    assert (await verifier.verify(make_token())).user_id == 42, "keeps the last good keys"


async def test_file_provider_missing_file_is_unavailable(tmp_path: Path) -> None:
    provider = FileJwksProvider(tmp_path / "absent.json")
    with pytest.raises(Unavailable):
        await provider.get_key("k")


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_fetching_provider_refreshes_and_rate_limits(signing_key: Any) -> None:
    clock = _FakeClock()
    calls: list[float] = []
    document: dict[str, Any] = {"keys": []}

    async def fetch() -> dict[str, Any]:
        calls.append(clock.now)
        return document

    provider = FetchingJwksProvider(
        fetch, refresh_interval_seconds=300, min_refresh_interval_seconds=10, clock=clock
    )
    assert await provider.get_key(signing_key.kid) is None
    assert len(calls) == 1
    # Unknown kid again within the minimum interval: no new fetch.
    assert await provider.get_key(signing_key.kid) is None
    assert len(calls) == 1

    # Key rotated in at the source: picked up on the next unknown-kid lookup after 10 s.
    document = {"keys": [signing_key.jwk]}
    clock.now += 11
    assert await provider.get_key(signing_key.kid) is not None
    assert len(calls) == 2
    # Known kid: served from cache until the refresh interval elapses.
    clock.now += 100
    assert await provider.get_key(signing_key.kid) is not None
    assert len(calls) == 2
    clock.now += 300
    await provider.get_key(signing_key.kid)
    assert len(calls) == 3


async def test_fetching_provider_keeps_keys_when_source_fails(signing_key: Any) -> None:
    clock = _FakeClock()
    healthy = True

    async def fetch() -> dict[str, Any]:
        if not healthy:
            raise ConnectionError("auth service down")
        return {"keys": [signing_key.jwk]}

    provider = FetchingJwksProvider(fetch, refresh_interval_seconds=60, clock=clock)
    assert await provider.get_key(signing_key.kid) is not None
    healthy = False
    clock.now += 120
    assert await provider.get_key(signing_key.kid) is not None


async def test_fetching_provider_never_loaded_is_unavailable() -> None:
    async def fetch() -> dict[str, Any]:
        raise ConnectionError("down")

    with pytest.raises(Unavailable):
        await FetchingJwksProvider(fetch).get_key("k")


def test_principal_expiry_is_aware() -> None:
    principal = Principal(1, "user", "j", datetime.now(UTC))
    assert not principal.is_admin


async def test_issued_at_within_the_leeway_is_accepted(make_token: Any, signing_key: Any) -> None:
    """Envoy allows 30 s of clock skew; a service behind it must not refuse what it let in."""
    verifier = JwtVerifier(
        StaticJwksProvider({"keys": [signing_key.jwk]}),
        issuer="cake-system",
        audience="cake-users",
        leeway_seconds=30,
    )
    ahead = int(time.time()) + 20
    principal = await verifier.verify(make_token(iat=ahead, nbf=ahead))
    assert principal.user_id == 42
    with pytest.raises(Unauthenticated, match="not yet valid"):
        await verifier.verify(make_token(iat=int(time.time()) + 120))


async def test_a_verified_token_is_remembered_until_it_expires(
    jwks: dict[str, Any], make_token: Any
) -> None:
    now = time.time()
    verifier = JwtVerifier(
        StaticJwksProvider(jwks),
        issuer="cake-system",
        audience="cake-users",
        clock=lambda: now,
    )
    token = make_token(ttl=60)
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first, "the second check is answered from memory"
    exp = first.expires_at.timestamp()
    now = exp - 0.001
    assert await verifier.verify(token) is first, "still remembered just before it expires"
    now = exp
    # Past its expiry the memory does not answer: the token is verified in full again
    # (still valid by the real time here, so a new principal comes back).
    assert await verifier.verify(token) is not first


async def test_a_remembered_token_is_refused_once_its_key_is_withdrawn(
    tmp_path: Path, signing_key: Any, make_token: Any
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [signing_key.jwk]}))
    verifier = JwtVerifier(FileJwksProvider(path), issuer="cake-system", audience="cake-users")
    token = make_token()
    assert (await verifier.verify(token)).user_id == 42
    other = ec.generate_private_key(ec.SECP256R1())
    path.write_text(json.dumps({"keys": [jwk_from_public_key(other.public_key(), "new")]}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    with pytest.raises(Unauthenticated, match="Unknown token signing key"):
        await verifier.verify(token)


async def test_the_memory_of_verified_tokens_is_bounded(
    jwks: dict[str, Any], make_token: Any
) -> None:
    verifier = JwtVerifier(
        StaticJwksProvider(jwks), issuer="cake-system", audience="cake-users", cache_size=3
    )
    tokens = [make_token(sub=str(n)) for n in range(1, 6)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier._verified) == 3
    assert list(verifier._verified) == tokens[2:]
    # A tampered copy of a remembered token is a different string: verified in full.
    header, payload, signature = tokens[-1].split(".")
    with pytest.raises(Unauthenticated):
        await verifier.verify(f"{header}.{payload}.{signature[:-4]}AAAA")
