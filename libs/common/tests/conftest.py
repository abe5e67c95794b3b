"""Fixtures for cake_common's tests: signing keys and a token factory.

PostgreSQL/Kafka fixtures (``postgres_url``, ``kafka_bootstrap``) come from the repo root.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cake_common.jwt import JwtVerifier, StaticJwksProvider, jwk_from_public_key
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "cake-system"
AUDIENCE = "cake-users"
KID = "test-key-1"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def jwk(self) -> dict[str, str]:
        return jwk_from_public_key(self.public_pem, self.kid)


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey(KID, ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="session")
def jwks(signing_key: SigningKey) -> dict[str, Any]:
    return {"keys": [signing_key.jwk]}


@pytest.fixture(scope="session")
def verifier(jwks: dict[str, Any]) -> JwtVerifier:
    return JwtVerifier(StaticJwksProvider(jwks), issuer=ISSUER, audience=AUDIENCE)


@pytest.fixture(scope="session")
def make_token(signing_key: SigningKey) -> TokenFactory:
    """Mint an ES256 token like the auth service does; override any claim or header."""

    def make(
        *,
        sub: str = "42",
        role: str = "user",
        ttl: int = 3600,
        headers: dict[str, Any] | None = None,
        key: Any = None,
        algorithm: str = "ES256",
        drop: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "sub": sub,
            "role": role,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
            "sid": uuid.uuid4().hex,
        }
        payload.update(claims)
        for name in drop:
            payload.pop(name, None)
        return jwt.encode(
            payload,
            key if key is not None else signing_key.private_key,
            algorithm=algorithm,
            headers={"kid": signing_key.kid, **(headers or {})},
        )

    return make
