"""The Cake services and the bank simulator, started with
``uv run --frozen cake-<name> serve``.

Their configuration is environment variables only (pydantic-settings, prefix ``CAKE_<NAME>_``);
:func:`build_service_environment` is the one place that derives them from the stack, so the
stack and the test session start services identically.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cake.events.v1 import registry

from cake_devtools.stack.component import ProcessComponent, StackContext
from cake_devtools.stack.errors import StackError
from cake_devtools.stack.service_tokens import (
    CONTACTS_SCOPE,
    NOTIFICATIONS_CLIENT_ID,
    create_service_account,
)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    gateway_probe: str | None = None
    """A public GET path of this service that answers 200 through the gateway, if it has
    one: the stack waits for it after the gateway's health checks pass, because healthy
    flags alone were seen not to be proof (right after a restart of auth the gateway
    answered "no healthy upstream" for up to about a second while both hosts showed
    healthy; likely Envoy's outlier detection after its own JWKS fetches failed while auth
    was down, not proven)."""

    @property
    def package(self) -> str:
        return f"cake_{self.name}"

    @property
    def script(self) -> str:
        return f"cake-{self.name}"

    @property
    def env_prefix(self) -> str:
        return f"CAKE_{self.name.upper()}_"

    @property
    def port_field(self) -> str:
        return f"{self.name}_grpc_port"


SERVICES = (
    ServiceSpec("auth", gateway_probe="/.well-known/jwks.json"),
    ServiceSpec("promotions"),
    ServiceSpec("notifications"),
    ServiceSpec("events"),
)
"""The services behind the gateway."""
BANK = ServiceSpec("payments")
"""The bank simulator: a process of the stack that only promotions calls (no gateway route)."""
#: Databases whose outbox the relay (in the events service) reads, by source service.
OUTBOX_SOURCES: Mapping[str, tuple[str, ...]] = {
    "auth": (registry.USER_FIRST_LOGIN.topic,),
    "promotions": tuple(
        dict.fromkeys(
            event.topic
            for event in (
                registry.PROMOTION_ENROLLMENT,
                registry.VOUCHER_ISSUED,
                registry.VOUCHER_USED,
                registry.PAYMENT_PROCESSED,
            )
        )
    ),
}
"""The services whose outboxes the events relay reads (its ``CAKE_EVENTS_SOURCES``), with
the registry topics their events go to."""
#: The services without an outbox that GET /health reports all the same (the events
#: service's ``CAKE_EVENTS_HEALTH_SERVICES``), each with whether it is critical. Notifications
#: is not: its work is asynchronous (Kafka keeps the events, e-mails go out once it is back),
#: so while it is down the system is degraded, not unhealthy.
HEALTH_SERVICES: Mapping[str, bool] = {"notifications": False}
RELAY_ROLE = "cake_relay"


@dataclass(frozen=True)
class Endpoints:
    """Where the infrastructure of a profile is reachable."""

    postgres_host: str
    postgres_port: int
    redis_url: str
    kafka_bootstrap: str
    grpc_ports: Mapping[str, int]
    jwt_signing_key: Path
    jwks_file: Path
    #: Prometheus /metrics port per service name.
    metrics_ports: Mapping[str, int]
    #: OTLP/gRPC trace collector for every service; ``None`` leaves tracing off.
    otlp_endpoint: str | None = None
    #: The SMTP server notifications sends e-mail to (the stack's SMTP sink).
    smtp_port: int = 1025
    #: The client secret of notifications' service account (see ``service_tokens``).
    notifications_secret_file: Path | None = None
    #: The gateway's URL (auth's discovery document names its endpoints under it).
    public_url: str | None = None
    #: auth's worker processes (CAKE_AUTH_WORKERS) and where their sockets live.
    auth_workers: int = 1
    socket_dir: Path | None = None


def auth_worker_sockets(socket_dir: Path | None, workers: int) -> tuple[Path, ...]:
    """The sockets auth's workers listen on (``<dir>/auth-<i>.sock``, the naming of
    ``cake_common.workers.worker_socket_path``); none when auth runs one process."""
    if workers <= 1 or socket_dir is None:
        return ()
    return tuple(socket_dir / f"auth-{index}.sock" for index in range(workers))


def database_url(*, user: str, password: str, host: str, port: int, database: str) -> str:
    return (
        f"postgresql+psycopg://{quote(user, safe='')}:{quote(password, safe='')}"
        f"@{host}:{port}/{quote(database, safe='')}"
    )


def build_service_environment(
    endpoints: Endpoints, passwords: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Environment variables per service name (``auth``, ``promotions``, ``events``, and
    ``payments`` when ``endpoints`` has a port for the bank simulator)."""

    def db_url(role: str, database: str) -> str:
        return database_url(
            user=role,
            password=passwords[role],
            host=endpoints.postgres_host,
            port=endpoints.postgres_port,
            database=database,
        )

    environments: dict[str, dict[str, str]] = {}
    for spec in SERVICES:
        prefix = spec.env_prefix
        env = {
            f"{prefix}GRPC_HOST": "127.0.0.1",
            f"{prefix}GRPC_PORT": str(endpoints.grpc_ports[spec.name]),
            f"{prefix}DATABASE_URL": db_url(spec.package, spec.package),
            f"{prefix}REDIS_URL": endpoints.redis_url,
            f"{prefix}KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
            f"{prefix}LOG_JSON": "true",
            # Every service verifies tokens itself against the published keys.
            f"{prefix}JWKS_FILE": str(endpoints.jwks_file),
            f"{prefix}METRICS_PORT": str(endpoints.metrics_ports[spec.name]),
        }
        if endpoints.otlp_endpoint is not None:
            env[f"{prefix}OTLP_ENDPOINT"] = endpoints.otlp_endpoint
        if spec.name == "auth":
            env[f"{prefix}JWT_PRIVATE_KEY_FILE"] = str(endpoints.jwt_signing_key)
            if endpoints.public_url is not None:
                env[f"{prefix}PUBLIC_URL"] = endpoints.public_url
            # Always set: `cake-auth` also reads .run/dev/auth.env, whose value must not
            # leak into another profile's auth.
            env[f"{prefix}WORKERS"] = "1"
            if auth_worker_sockets(endpoints.socket_dir, endpoints.auth_workers):
                env[f"{prefix}WORKERS"] = str(endpoints.auth_workers)
                env[f"{prefix}WORKER_SOCKET_DIR"] = str(endpoints.socket_dir)
        if spec.name == "events":
            env[f"{prefix}SOURCES"] = json.dumps(
                [
                    {
                        "name": source,
                        "outbox_url": db_url(RELAY_ROLE, f"cake_{source}"),
                        "grpc_target": f"127.0.0.1:{endpoints.grpc_ports[source]}",
                        "topics": list(topics),
                    }
                    for source, topics in OUTBOX_SOURCES.items()
                ]
            )
            env[f"{prefix}HEALTH_SERVICES"] = json.dumps(
                [
                    {
                        "name": name,
                        "grpc_target": f"127.0.0.1:{endpoints.grpc_ports[name]}",
                        "critical": critical,
                    }
                    for name, critical in HEALTH_SERVICES.items()
                    if name in endpoints.grpc_ports
                ]
            )
        if spec.name == "notifications":
            env[f"{prefix}SMTP_HOST"] = "127.0.0.1"
            env[f"{prefix}SMTP_PORT"] = str(endpoints.smtp_port)
            env[f"{prefix}AUTH_DIRECTORY_TARGET"] = f"127.0.0.1:{endpoints.grpc_ports['auth']}"
            if endpoints.notifications_secret_file is not None:
                env[f"{prefix}AUTH_CLIENT_ID"] = NOTIFICATIONS_CLIENT_ID
                env[f"{prefix}AUTH_CLIENT_SECRET_FILE"] = str(endpoints.notifications_secret_file)
        if spec.name == "promotions" and BANK.name in endpoints.grpc_ports:
            env[f"{prefix}PAYMENTS_TARGET"] = f"127.0.0.1:{endpoints.grpc_ports[BANK.name]}"
        environments[spec.name] = env
    if BANK.name in endpoints.grpc_ports:
        prefix = BANK.env_prefix
        environments[BANK.name] = {
            f"{prefix}GRPC_HOST": "127.0.0.1",
            f"{prefix}GRPC_PORT": str(endpoints.grpc_ports[BANK.name]),
            f"{prefix}DATABASE_URL": db_url(BANK.package, BANK.package),
            f"{prefix}LOG_JSON": "true",
            f"{prefix}METRICS_PORT": str(endpoints.metrics_ports[BANK.name]),
        }
    return environments


def ensure_dev_keys(repo: Path, signing_key: Path, jwks_file: Path) -> None:
    """Create the development JWT key pair with ``cake-auth gen-keys`` unless it exists.

    The auth service signs with the private key; every service and Envoy verify with the
    JWKS next to it. Real deployments mount their own keys (k8s Secret) instead.
    """
    if signing_key.is_file() and jwks_file.is_file():
        return
    uv = shutil.which("uv")
    if uv is None:
        raise StackError("uv not found on PATH; run tools/bootstrap.sh")
    command = [uv, "run", "--frozen", "--directory", str(repo), "cake-auth", "gen-keys"]
    command += ["--dir", str(signing_key.parent)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(f"cake-auth gen-keys failed:\n{result.stderr.strip()}")


def write_env_file(path: Path, environment: Mapping[str, str]) -> None:
    """The service's variables as a dotenv file (mode 0600: it holds database passwords),
    so operator commands reach the same servers: ``cake-auth create-admin`` reads
    ``.run/dev/auth.env`` when run from the repository root."""
    lines = [f"{key}={value}\n" for key, value in sorted(environment.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as env_file:
        env_file.writelines(lines)


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    """The standard gRPC health check (overall server, service "") answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        # typeshed's HealthStub declares no RPC methods (types-grpcio-health-checking).
        stub: Any = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def service_module_missing(spec: ServiceSpec) -> str | None:
    """Why ``cake-<name> serve`` cannot run yet (its entrypoints/cli.py is not written), or None.

    Looks for the file without importing anything from the service.
    """
    package = importlib.util.find_spec(spec.package)
    if package is None or not package.submodule_search_locations:
        return f"package {spec.package} is not installed"
    for location in package.submodule_search_locations:
        if (Path(location) / "entrypoints" / "cli.py").is_file():
            return None
    return f"{spec.package}.entrypoints.cli does not exist yet (service not written)"


class ServiceComponent(ProcessComponent):
    def __init__(self, ctx: StackContext, spec: ServiceSpec, endpoints: Endpoints) -> None:
        super().__init__(ctx)
        self.name = spec.name
        self.port_field = spec.port_field
        self.spec = spec
        self.endpoints = endpoints

    def unavailable_reason(self) -> str | None:
        return service_module_missing(self.spec)

    def command(self) -> Sequence[str]:
        uv = shutil.which("uv")
        if uv is None:
            raise StackError("uv not found on PATH; run tools/bootstrap.sh")
        # --directory: the workspace root, wherever cake-stack was started from. uv forwards
        # SIGTERM to the service, so stopping the uv process shuts the service down cleanly.
        repo = str(self.ctx.layout.repo)
        return [uv, "run", "--frozen", "--directory", repo, self.spec.script, "serve"]

    def prepare(self) -> None:
        ensure_dev_keys(
            self.ctx.layout.repo, self.endpoints.jwt_signing_key, self.endpoints.jwks_file
        )
        if self.spec.name == "notifications" and self.endpoints.notifications_secret_file:
            # Auth runs by now (it starts first): a real service account, a fresh secret.
            uv = shutil.which("uv")
            if uv is None:
                raise StackError("uv not found on PATH; run tools/bootstrap.sh")
            create_service_account(
                [
                    *(uv, "run", "--frozen", "--directory", str(self.ctx.layout.repo)),
                    *("cake-auth", "create-service-account", NOTIFICATIONS_CLIENT_ID),
                    *("--scope", CONTACTS_SCOPE, "--rotate-secret"),
                ],
                {
                    **os.environ,
                    **build_service_environment(self.endpoints, self.ctx.passwords)["auth"],
                },
                self.endpoints.notifications_secret_file,
            )
        write_env_file(
            self.ctx.layout.env_file(self.spec.name),
            build_service_environment(self.endpoints, self.ctx.passwords)[self.spec.name],
        )

    def environment(self) -> Mapping[str, str]:
        env = dict(os.environ)
        env.update(build_service_environment(self.endpoints, self.ctx.passwords)[self.spec.name])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def probe(self) -> bool:
        # A service of several workers is ready when every one of them serves.
        sockets = auth_worker_sockets(self.endpoints.socket_dir, self.endpoints.auth_workers)
        worker_addresses = [f"unix:{s}" for s in sockets] if self.spec.name == "auth" else []
        return all(grpc_serving(a) for a in (self.address, *worker_addresses))

    def wait_ready(self, deadline: float) -> None:
        self.wait_until(self.probe, what="gRPC health SERVING", deadline=deadline, alive=self.alive)
