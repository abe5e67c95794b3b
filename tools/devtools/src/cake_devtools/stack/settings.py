"""Ports, external servers and timeouts of a stack profile, read from the environment.

Two profiles run side by side: ``dev`` (``make up``, variables ``CAKE_*``) and ``test`` (the
pytest session, variables ``CAKE_TEST_*``). The test profile has its own prefix so a developer's
``CAKE_*`` overrides (or external servers) never point the test session at dev data.
Every default port is off the well-known ones so the stack never collides with servers already
on the machine, and below Linux's ephemeral range (32768-60999): fault tests stop and restart
servers, and a client's outgoing connection must never grab a port while its server is down.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Profile = Literal["dev", "test"]
PROFILES: tuple[Profile, ...] = get_args(Profile)


class StackSettings(BaseSettings):
    """The ``dev`` profile."""

    model_config = SettingsConfigDict(env_prefix="CAKE_", extra="ignore")

    gateway_port: int = Field(default=8080, ge=1, le=65535)
    envoy_admin_port: int = Field(default=19901, ge=1, le=65535)
    pg_port: int = Field(default=15432, ge=1, le=65535)
    redis_port: int = Field(default=16379, ge=1, le=65535)
    kafka_port: int = Field(default=19092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=19093, ge=1, le=65535)
    auth_grpc_port: int = Field(default=17051, ge=1, le=65535)
    promotions_grpc_port: int = Field(default=17052, ge=1, le=65535)
    events_grpc_port: int = Field(default=17053, ge=1, le=65535)
    #: The bank simulator (``cake-payments``), reached by promotions only.
    payments_grpc_port: int = Field(default=17054, ge=1, le=65535)
    notifications_grpc_port: int = Field(default=17055, ge=1, le=65535)
    #: The local SMTP server notifications sends e-mail to (``cake-notifications smtp-sink``).
    smtp_sink_port: int = Field(default=11025, ge=1, le=65535)
    # Prometheus /metrics of each service (CAKE_<SVC>_METRICS_PORT).
    auth_metrics_port: int = Field(default=19111, ge=1, le=65535)
    promotions_metrics_port: int = Field(default=19112, ge=1, le=65535)
    events_metrics_port: int = Field(default=19113, ge=1, le=65535)
    payments_metrics_port: int = Field(default=19114, ge=1, le=65535)
    notifications_metrics_port: int = Field(default=19115, ge=1, le=65535)
    auth_workers: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)),
        ge=1,
        description="auth server processes (CAKE_AUTH_WORKERS); default: one per usable CPU "
        "(the test profile: at least two)",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC trace collector given to every service "
        "(CAKE_<SVC>_OTLP_ENDPOINT), e.g. http://127.0.0.1:4317; unset: tracing off",
    )

    # Set these to use servers that already run (CI service containers, a shared dev box);
    # the stack then only creates the databases, roles and topics there.
    external_postgres_admin_url: str | None = Field(
        default=None, description="superuser libpq URL, postgresql://user:pw@host:port/postgres"
    )
    external_redis_url: str | None = None
    external_kafka_bootstrap: str | None = None

    startup_timeout_seconds: float = Field(
        default=120, gt=0, description="how long `up` waits for one component to be healthy"
    )
    stop_grace_seconds: float = Field(
        default=15, ge=0, description="SIGTERM to SIGKILL delay when stopping a process"
    )
    kafka_heap: str = "512m"
    #: fsync off trades crash safety for speed; only sensible for throw-away test data.
    postgres_fsync: bool = True


class StackSettingsForTests(StackSettings):
    """The ``test`` profile: the dev ports shifted (+10000 for the gateway, +10 elsewhere)."""

    model_config = SettingsConfigDict(env_prefix="CAKE_TEST_", extra="ignore")

    gateway_port: int = Field(default=18080, ge=1, le=65535)
    envoy_admin_port: int = Field(default=19911, ge=1, le=65535)
    pg_port: int = Field(default=15442, ge=1, le=65535)
    redis_port: int = Field(default=16389, ge=1, le=65535)
    kafka_port: int = Field(default=19102, ge=1, le=65535)
    kafka_controller_port: int = Field(default=19103, ge=1, le=65535)
    auth_grpc_port: int = Field(default=17151, ge=1, le=65535)
    promotions_grpc_port: int = Field(default=17152, ge=1, le=65535)
    events_grpc_port: int = Field(default=17153, ge=1, le=65535)
    payments_grpc_port: int = Field(default=17154, ge=1, le=65535)
    notifications_grpc_port: int = Field(default=17155, ge=1, le=65535)
    smtp_sink_port: int = Field(default=11035, ge=1, le=65535)
    auth_metrics_port: int = Field(default=19121, ge=1, le=65535)
    promotions_metrics_port: int = Field(default=19122, ge=1, le=65535)
    events_metrics_port: int = Field(default=19123, ge=1, le=65535)
    payments_metrics_port: int = Field(default=19124, ge=1, le=65535)
    notifications_metrics_port: int = Field(default=19125, ge=1, le=65535)
    auth_workers: int = Field(
        default_factory=lambda: max(2, len(os.sched_getaffinity(0))),
        ge=1,
        description="auth server processes; at least two, so the tests always cover the "
        "supervisor and the gateway's spreading over workers, even on one CPU",
    )
    postgres_fsync: bool = False


def load_settings(profile: str) -> StackSettings:
    """Settings of ``profile`` from the environment (no caching: tests change the env)."""
    if profile == "dev":
        return StackSettings()
    if profile == "test":
        return StackSettingsForTests()
    raise ValueError(f"unknown stack profile {profile!r}; expected one of {', '.join(PROFILES)}")


def port_env_var(profile: str, field_name: str) -> str:
    """The variable that overrides ``field_name`` in ``profile`` (for error messages)."""
    prefix = "CAKE_TEST_" if profile == "test" else "CAKE_"
    return f"{prefix}{field_name.upper()}"
