"""Fixtures for the auth service's tests.

``postgres_url`` (a fresh database per module), ``redis_url`` and ``stack`` come from the
repo-root ``conftest.py``. Every server started here gets its own Redis key prefix, so tests
share the stack's Redis without seeing each other's (or a running service's) keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake_auth.adapters.signing_keys import (
    JWKS_FILENAME,
    SIGNING_KEY_FILENAME,
    Es256TokenIssuer,
    SigningKey,
    generate_key_pair,
    load_signing_key,
)
from cake_auth.bootstrap import start_server
from cake_auth.settings import AuthSettings
from cake_common.db import create_async_engine_for
from cake_common.grpc_server import RunningGrpcServer
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

PASSWORD = "correct horse battery"
_serial = count(1)


@pytest.fixture(scope="session", autouse=True)
def _no_exported_auth_settings() -> Iterator[None]:
    """Settings come from each test, not from a shell that exported the stack's environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("CAKE_AUTH_"):
                patch.delenv(name)
        yield


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("auth-keys")
    generate_key_pair(directory)
    return directory


@pytest.fixture(scope="session")
def signing_key(keys_dir: Path) -> SigningKey:
    from cake_auth.adapters.signing_keys import load_signing_key

    return load_signing_key(keys_dir / SIGNING_KEY_FILENAME)


SettingsFactory = Callable[..., AuthSettings]


@pytest.fixture(scope="session")
def make_settings(keys_dir: Path) -> SettingsFactory:
    """AuthSettings for a test server: port 0, bcrypt cost 4, a private Redis namespace."""

    def make(**overrides: Any) -> AuthSettings:
        values: dict[str, Any] = {
            "grpc_port": 0,
            "jwt_private_key_file": keys_dir / SIGNING_KEY_FILENAME,
            "jwks_file": keys_dir / JWKS_FILENAME,
            "bcrypt_cost": 4,
            "relay_role": None,
            "shutdown_grace_seconds": 0,
            "startup_retry_seconds": 10,
            "log_json": False,
            "redis_key_prefix": f"cake:auth:test-{uuid.uuid4().hex[:12]}:",
            # Every test client is 127.0.0.1: a module's wrong passwords would otherwise add up
            # on one per-IP counter and throttle its later, unrelated logins. The per-IP limit
            # has its own test, which sets it low.
            "login_ip_max_failures": 100_000,
            # Tests of concurrent logins (first-login races, guesses) must not be cut short by
            # the hash queue's admission control, which has its own test with a small bound.
            "hash_queue_max_waiting": 10_000,
        }
        values.update(overrides)
        return AuthSettings(**values)

    return make


def unique_registration(**overrides: str) -> auth_pb2.RegisterRequest:
    """A valid registration whose username, e-mail and phone no other test uses."""
    n = next(_serial)
    tag = uuid.uuid4().hex[:8]
    fields = {
        "fullname": f"Test User {n}",
        "email": f"user_{tag}_{n}@example.com",
        "username": f"user_{tag}_{n}",
        # Digits only from the uuid's integer value, so the pattern always matches.
        "phone": f"+84 {uuid.uuid4().int % 10**9:09d}",
        "password": PASSWORD,
        "birthday": "1990-05-17",
    }
    fields.update(overrides)
    return auth_pb2.RegisterRequest(**fields)


@dataclass(frozen=True)
class RichError:
    """What a client can read from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    metadata: dict[str, str]
    violations: dict[str, str]


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    info: error_details_pb2.ErrorInfo | None = None
    violations: dict[str, str] = {}
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                for violation in bad_request.field_violations:
                    violations.setdefault(violation.field, violation.description)
    return RichError(
        code=error.code(),
        message=error.details() or "",
        reason=info.reason if info else None,
        metadata=dict(info.metadata) if info else {},
        violations=violations,
    )


@dataclass
class AuthServer:
    """A running auth server and a client stub on a real grpc.aio channel, with helpers
    (test modules cannot import from conftest under ``--import-mode=importlib``)."""

    running: RunningGrpcServer
    settings: AuthSettings
    channel: grpc.aio.Channel
    stub: Any = field(init=False)
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.stub = auth_pb2_grpc.AuthServiceStub(self.channel)

    async def register(self, **overrides: str) -> auth_pb2.RegisterResponse:
        response: auth_pb2.RegisterResponse = await self.stub.Register(
            unique_registration(**overrides)
        )
        return response

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0

    def admin_token(self, user_id: int = 1) -> str:
        """An admin token signed with the server's own key (a session no row has)."""
        assert self.settings.jwt_private_key_file is not None
        issuer = Es256TokenIssuer(
            load_signing_key(self.settings.jwt_private_key_file),
            issuer=self.settings.jwt_issuer,
            audience=self.settings.jwt_audience,
            ttl_seconds=300,
        )
        return issuer.issue(user_id, "admin").token

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    registration = staticmethod(unique_registration)
    rich_error = staticmethod(rich_error)

    @staticmethod
    def bearer(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def failure(self, call: Any) -> RichError:
        """Await a call that must fail; its rich error."""
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return rich_error(error)
        raise AssertionError("the call succeeded")


ServerFactory = Callable[..., Any]


@pytest.fixture(scope="module")
async def start_auth_server(
    make_settings: SettingsFactory, postgres_url: str, redis_url: str
) -> AsyncIterator[ServerFactory]:
    """Starts auth servers on the module's database; all are stopped after the module."""
    started: list[AuthServer] = []

    async def start(**overrides: Any) -> AuthServer:
        settings = make_settings(
            **{"database_url": postgres_url, "redis_url": redis_url, **overrides}
        )
        registry = CollectorRegistry()
        running = await start_server(settings, metrics_registry=registry)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        server = AuthServer(running, settings, channel, metrics=registry)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.channel.close()
        await server.running.stop()


@pytest.fixture(scope="module")
async def auth(start_auth_server: ServerFactory) -> AuthServer:
    """The module's auth server with default test settings."""
    server: AuthServer = await start_auth_server()
    return server


@pytest.fixture(scope="module")
async def database(auth: AuthServer, postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """The module's database (migrated by the ``auth`` server), to check what was stored."""
    engine = create_async_engine_for(postgres_url, pool_size=2)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()
