"""Fixtures of the promotions tests: signing keys and tokens, a migrated database, and the
promotions gRPC server started in-process on a real ``grpc.aio`` port.

PostgreSQL and Kafka come from the repo-root fixtures (``postgres_url``, ``kafka_bootstrap``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cake.promotions.v1 import promotions_pb2_grpc
from cake_common.db import create_async_engine_for
from cake_common.grpc_server import RunningGrpcServer
from cake_common.jwt import jwk_from_public_key
from cake_common.migrations import run_alembic_upgrade
from cake_promotions import bootstrap
from cake_promotions.settings import PromotionsSettings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

ISSUER = "cake-system"
AUDIENCE = "cake-users"


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint of an EC public JWK (the ``kid`` the auth service uses)."""
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenSigner:
    private_key: ec.EllipticCurvePrivateKey
    kid: str
    jwks_file: Path

    def token(self, user_id: int, role: str = "user", ttl_seconds: int = 3600) -> str:
        now = int(time.time())
        claims = {
            "sub": str(user_id),
            "role": role,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + ttl_seconds,
            "jti": str(uuid.uuid4()),
            "sid": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.private_key, algorithm="ES256", headers={"kid": self.kid})

    def metadata(self, user_id: int, role: str = "user") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(user_id, role)}"),)


@pytest.fixture(scope="session")
def signer(tmp_path_factory: pytest.TempPathFactory) -> TokenSigner:
    """An EC P-256 key like ``cake-auth gen-keys`` makes, its JWKS written to a file."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = jwk_thumbprint(jwk_from_public_key(public_pem, "unused"))
    jwks_file = tmp_path_factory.mktemp("keys") / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk_from_public_key(public_pem, kid)]}))
    return TokenSigner(private_key, kid, jwks_file)


@pytest.fixture(scope="module")
def database_url(postgres_url: str) -> str:
    """The module's fresh database, migrated to head."""
    run_alembic_upgrade(postgres_url, bootstrap.MIGRATIONS, None)
    return postgres_url


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine_for(database_url, pool_size=10, max_overflow=10)
    yield engine
    await engine.dispose()


@dataclass
class PromotionsServer:
    running: RunningGrpcServer
    channel: grpc.aio.Channel
    stub: promotions_pb2_grpc.PromotionsServiceStub
    registry: CollectorRegistry


StartServer = Callable[..., Awaitable[PromotionsServer]]


@pytest.fixture(scope="module")
async def start_server(
    database_url: str, redis_url: str, signer: TokenSigner, bank_simulator: Any
) -> AsyncIterator[StartServer]:
    """Start promotions servers exactly as ``serve`` does (gRPC only, on port 0) against the
    module's database and the real bank simulator process; ``settings`` overrides
    configuration. All stop at the end."""
    started: list[PromotionsServer] = []

    async def start(**settings: Any) -> PromotionsServer:
        bank_simulator.start()  # a test before may have crashed it
        settings.setdefault("payments_target", bank_simulator.address)
        defaults: dict[str, Any] = {
            "database_url": database_url,
            "redis_url": redis_url,
            "grpc_port": 0,
            "jwks_file": signer.jwks_file,
            "consumer_enabled": False,
            "shutdown_grace_seconds": 1,
            "relay_role": None,
        }
        configuration = PromotionsSettings(**(defaults | settings))
        registry = CollectorRegistry()
        running = await bootstrap.start_server(configuration, metrics_registry=registry)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        server = PromotionsServer(
            running, channel, promotions_pb2_grpc.PromotionsServiceStub(channel), registry
        )
        started.append(server)
        return server

    yield start
    for server in started:
        await server.channel.close(grace=None)
        await server.running.stop()


@pytest.fixture
def unique() -> Iterator[Callable[[], int]]:
    """Fresh user ids, so tests in one database never share a user."""
    counter = iter(range(1, 1_000_000))
    base = (uuid.uuid4().int % 1_000_000) * 1_000_000

    def next_id() -> int:
        return base + next(counter)

    yield next_id


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the BadRequest detail of a rich error status."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [violation.field for violation in bad_request.field_violations]
    return fields


@pytest.fixture(scope="session")
def violated_fields() -> Callable[[grpc.aio.AioRpcError], list[str]]:
    return bad_request_fields
