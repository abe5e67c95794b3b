"""Signing keys on disk, the published key set and ES256 token issuing (no servers)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cake_auth.adapters.signing_keys import (
    JWKS_FILENAME,
    SIGNING_KEY_FILENAME,
    Es256TokenIssuer,
    JwksFile,
    SigningKeyError,
    ensure_published,
    generate_key_pair,
    jwk_thumbprint,
    load_signing_key,
    read_jwks,
)
from cake_auth.domain.users import Role
from cake_common.errors import Unauthenticated
from cake_common.jwt import JwtVerifier, StaticJwksProvider

ISSUER = "cake-system"
AUDIENCE = "cake-users"


def test_thumbprint_follows_rfc7638_canonical_form() -> None:
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
        "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM",
        "kid": "ignored",
        "use": "sig",
    }
    # Required members only, lexicographic order, no whitespace (RFC 7638 §3.2).
    canonical = (
        b'{"crv":"P-256","kty":"EC","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",'
        b'"y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}'
    )
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    assert jwk_thumbprint(jwk) == expected


def test_generated_key_files(tmp_path: Path) -> None:
    key = generate_key_pair(tmp_path)
    pem = tmp_path / SIGNING_KEY_FILENAME
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    loaded = load_signing_key(pem)
    assert loaded.kid == key.kid == jwk_thumbprint(key.jwk)
    assert read_jwks(tmp_path / JWKS_FILENAME) == [loaded.jwk]
    assert loaded.jwk.keys() == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    assert (loaded.jwk["kty"], loaded.jwk["crv"], loaded.jwk["alg"]) == ("EC", "P-256", "ES256")


def test_rotation_keeps_older_keys_published_newest_first(tmp_path: Path) -> None:
    first = generate_key_pair(tmp_path)
    second = generate_key_pair(tmp_path)
    assert [key["kid"] for key in read_jwks(tmp_path / JWKS_FILENAME)] == [second.kid, first.kid]
    assert load_signing_key(tmp_path / SIGNING_KEY_FILENAME).kid == second.kid
    ensure_published(second, tmp_path / JWKS_FILENAME)


def test_unpublished_signing_key_is_refused(tmp_path: Path) -> None:
    published = generate_key_pair(tmp_path / "a")
    other = generate_key_pair(tmp_path / "b")
    with pytest.raises(SigningKeyError, match="not published"):
        ensure_published(other, tmp_path / "a" / JWKS_FILENAME)
    # Same kid but another key: a corrupted set must not pass either.
    forged = {**published.jwk, "kid": other.kid}
    (tmp_path / "forged.json").write_text(json.dumps({"keys": [forged]}))
    with pytest.raises(SigningKeyError, match="not the signing key"):
        ensure_published(other, tmp_path / "forged.json")


@pytest.mark.parametrize("content", [b"", b"not pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_unreadable_signing_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError):
        load_signing_key(path)
    with pytest.raises(SigningKeyError):
        load_signing_key(tmp_path / "missing.pem")


def test_published_set_has_signing_key_first_and_only_usable_keys(tmp_path: Path) -> None:
    old = generate_key_pair(tmp_path)
    current = generate_key_pair(tmp_path)
    jwks_path = tmp_path / JWKS_FILENAME
    keys = read_jwks(jwks_path)
    keys.reverse()  # the signing key last on disk
    keys.append({"kty": "RSA", "kid": "rsa-key", "n": "x", "e": "AQAB"})
    keys.append({"kty": "EC", "crv": "P-256", "kid": 7, "x": "a", "y": "b"})
    jwks_path.write_text(json.dumps({"keys": keys}))
    published = JwksFile(jwks_path, current.kid)
    assert [key["kid"] for key in published.public_keys()] == [current.kid, old.kid]


def test_issued_token_verifies_with_the_published_key(tmp_path: Path) -> None:
    key = generate_key_pair(tmp_path)
    now = datetime(2026, 1, 2, 12, 0, 0, 123456, tzinfo=UTC)
    issuer = Es256TokenIssuer(
        key, issuer=ISSUER, audience=AUDIENCE, ttl_seconds=3600, clock=lambda: now
    )
    issued = issuer.issue(42, Role.ADMIN, session_id="session-9")
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "ES256"
    assert header["kid"] == key.kid
    claims = jwt.decode(
        issued.token,
        key.private_key.public_key(),
        algorithms=["ES256"],
        audience=AUDIENCE,
        options={"verify_exp": False},
    )
    assert claims == {
        "sub": "42",
        "role": "admin",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + 3600,
        "jti": issued.jti,
        "sid": "session-9",
    }
    assert issued.lifetime_seconds == 3600
    # Never beyond the session's absolute end.
    capped = issuer.issue(42, Role.ADMIN, session_id="s", not_after=now + timedelta(seconds=90))
    assert capped.lifetime_seconds == 90
    assert issued.expires_at.timestamp() == claims["exp"]


async def test_every_token_has_its_own_jti_and_verifies(tmp_path: Path) -> None:
    key = generate_key_pair(tmp_path)
    issuer = Es256TokenIssuer(key, issuer=ISSUER, audience=AUDIENCE, ttl_seconds=60)
    verifier = JwtVerifier(
        StaticJwksProvider({"keys": [key.jwk]}), issuer=ISSUER, audience=AUDIENCE
    )
    first, second = issuer.issue(7, "user"), issuer.issue(7, "user")
    assert first.jti != second.jti
    principal = await verifier.verify(first.token)
    assert (principal.user_id, principal.role, principal.jti) == (7, "user", first.jti)


async def test_token_of_another_audience_is_rejected(tmp_path: Path) -> None:
    key = generate_key_pair(tmp_path)
    issuer = Es256TokenIssuer(key, issuer=ISSUER, audience="someone-else", ttl_seconds=60)
    verifier = JwtVerifier(
        StaticJwksProvider({"keys": [key.jwk]}), issuer=ISSUER, audience=AUDIENCE
    )
    with pytest.raises(Unauthenticated):
        await verifier.verify(issuer.issue(7, "user").token)
