"""Fixtures of the notifications integration tests: a real auth server (the user directory),
a real SMTP sink process, and the notifications server started in-process as ``serve`` does,
on the session's PostgreSQL and Kafka (repo-root fixtures)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cake.auth.v1 import auth_pb2, auth_pb2_grpc
from cake.notifications.v1 import notifications_pb2_grpc
from cake_auth.adapters.signing_keys import (
    JWKS_FILENAME,
    SIGNING_KEY_FILENAME,
    Es256TokenIssuer,
    generate_key_pair,
    load_signing_key,
)
from cake_auth.bootstrap import open_service_accounts
from cake_auth.bootstrap import start_server as start_auth
from cake_auth.domain.service_accounts import parse_scopes
from cake_auth.settings import AuthSettings
from cake_common.grpc_server import RunningGrpcServer
from cake_notifications import bootstrap
from cake_notifications.settings import NotificationsSettings
from prometheus_client import CollectorRegistry


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SmtpSink:
    """``cake-notifications smtp-sink`` as a real child process; tests stop and restart it."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cake_notifications",
                    "smtp-sink",
                    "--port",
                    str(self.port),
                    "--directory",
                    str(self.directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as c:
                    if c.recv(3) == b"220":
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"smtp sink did not start; see {self._log}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)

    def messages(self) -> list[EmailMessage]:
        return [
            cast(EmailMessage, message_from_bytes(path.read_bytes(), policy=default_policy))
            for path in sorted(self.directory.glob("*.eml"))
        ]

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages() if m["To"] == address]


@pytest.fixture(scope="module")
def smtp_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    base = tmp_path_factory.mktemp("smtp")
    sink = SmtpSink(base / "mail", base / "sink.log")
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_key_pair(directory)
    return directory


@dataclass
class Auth:
    running: RunningGrpcServer
    channel: grpc.aio.Channel
    stub: auth_pb2_grpc.AuthServiceStub
    issuer: Es256TokenIssuer
    settings: AuthSettings

    async def register(self) -> auth_pb2.User:
        tag = uuid.uuid4().hex[:10]
        response = await self.stub.Register(
            auth_pb2.RegisterRequest(
                fullname=f"Nguyen {tag}",
                email=f"n_{tag}@example.com",
                username=f"n_{tag}",
                phone=f"+84 {uuid.uuid4().int % 10**9:09d}",
                password="Secret123!",
                birthday="1990-05-17",
            )
        )
        return response.user

    def token(self, user_id: int, role: str = "user") -> str:
        return str(self.issuer.issue(user_id, role).token)


@pytest.fixture(scope="module")
async def auth(
    keys_dir: Path, new_module_database: Callable[[str], str], redis_url: str
) -> AsyncIterator[Auth]:
    settings = AuthSettings(
        database_url=new_module_database("auth"),
        redis_url=redis_url,
        grpc_port=0,
        jwt_private_key_file=keys_dir / SIGNING_KEY_FILENAME,
        jwks_file=keys_dir / JWKS_FILENAME,
        bcrypt_cost=4,
        relay_role=None,
        shutdown_grace_seconds=0,
        log_json=False,
        redis_key_prefix=f"cake:auth:test-{uuid.uuid4().hex[:12]}:",
    )
    running = await start_auth(settings, metrics_registry=CollectorRegistry())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    issuer = Es256TokenIssuer(
        load_signing_key(keys_dir / SIGNING_KEY_FILENAME),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_seconds=3600,
    )
    yield Auth(running, channel, auth_pb2_grpc.AuthServiceStub(channel), issuer, settings)
    await channel.close(None)
    await running.stop()


@pytest.fixture(scope="module")
def new_module_database(stack: Any) -> Iterator[Callable[[str], str]]:
    """Fresh databases for one module (auth's and notifications'), dropped after it."""
    import psycopg
    from psycopg import sql

    admin_url = stack.postgres_admin_url
    made: list[str] = []

    def new(label: str) -> str:
        name = f"t_notif_{label}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        base = admin_url.rsplit("/", 1)[0]
        return base.replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name

    yield new
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in made:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@dataclass
class Notifications:
    running: RunningGrpcServer
    channel: grpc.aio.Channel
    stub: notifications_pb2_grpc.NotificationsServiceStub
    registry: CollectorRegistry
    settings: NotificationsSettings

    def counter(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


StartNotifications = Callable[..., Awaitable[Notifications]]


@pytest.fixture(scope="module")
async def start_notifications(
    auth: Auth,
    keys_dir: Path,
    smtp_sink: SmtpSink,
    new_module_database: Callable[[str], str],
    redis_url: str,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[StartNotifications]:
    """Start notifications servers as ``serve`` does; ``topics`` maps event type names to a
    test's topics. Contacts come from the test auth with a real service account's tokens
    (client credentials, scope users:read-contacts)."""
    async with open_service_accounts(auth.settings) as accounts:
        account = await accounts.create(
            f"notif-{uuid.uuid4().hex[:8]}", parse_scopes(["users:read-contacts"])
        )
    secret_file = tmp_path_factory.mktemp("secret") / "client-secret"
    secret_file.write_text(account.client_secret)
    database_url = new_module_database("notifications")
    started: list[Notifications] = []

    async def start(topics: dict[str, str], **overrides: Any) -> Notifications:
        values: dict[str, Any] = {
            "database_url": database_url,
            "redis_url": redis_url,
            "kafka_bootstrap_servers": kafka_bootstrap,
            "grpc_port": 0,
            "jwks_file": keys_dir / JWKS_FILENAME,
            "smtp_port": smtp_sink.port,
            "smtp_timeout_seconds": 2,
            "auth_directory_target": f"127.0.0.1:{auth.running.port}",
            "auth_client_id": account.client_id,
            "auth_client_secret_file": secret_file,
            "consumer_group": f"test-notifications-{uuid.uuid4().hex[:8]}",
            "shutdown_grace_seconds": 1,
            "send_retry_base_seconds": 0.2,
            "send_retry_max_seconds": 2,
            "log_json": False,
        }
        settings = NotificationsSettings(**(values | overrides))
        registry = CollectorRegistry()
        running = await bootstrap.start_server(settings, metrics_registry=registry, topics=topics)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        server = Notifications(
            running,
            channel,
            notifications_pb2_grpc.NotificationsServiceStub(channel),
            registry,
            settings,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        await server.channel.close(None)
        await server.running.stop()


async def eventually(
    condition: Callable[[], Any], what: str, within: float = 30.0, every: float = 0.1
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., Awaitable[Any]]:
    return eventually
