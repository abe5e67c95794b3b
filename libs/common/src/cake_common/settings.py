"""Settings shared by every Cake service, read from the environment by pydantic-settings.

Each service subclasses :class:`ServiceSettings` once and sets its own prefix::

    class AuthSettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="CAKE_AUTH_")
        service_name: str = "auth"
        grpc_port: int = 50051

A service that writes an outbox the events relay reads adds :class:`OutboxSettings`, one
that consumes Kafka events :class:`ConsumerSettings`, so those fields are declared (and
described) once (plain models: the service's settings class keeps ``ServiceSettings``'
configuration); the variables keep the service's prefix (``CAKE_PROMOTIONS_RELAY_ROLE``)::

    class PromotionsSettings(ServiceSettings, OutboxSettings, ConsumerSettings): ...

URLs that may embed credentials (``database_url``, ``redis_url``) are ``SecretStr``: their
``repr``/``str`` is masked, so logging a settings object never leaks a password. Call
``.get_secret_value()`` only where the URL is handed to a client, or use
:meth:`ServiceSettings.database_url_for_display` to log where the service connects.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from cake_common.db import SessionTimeouts

_LOG_LEVELS = frozenset(logging.getLevelNamesMapping())


class ServiceSettings(BaseSettings):
    """Fields every service needs; subclasses add their own and set ``env_prefix``."""

    # hide_input_in_errors: a rejected URL must not be echoed (with its password) at start-up.
    model_config = SettingsConfigDict(env_prefix="CAKE_", extra="ignore", hide_input_in_errors=True)

    service_name: str
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(description="0 lets the OS pick a free port")
    database_url: SecretStr = Field(
        description="SQLAlchemy URL, postgresql+psycopg://user:password@host:port/db"
    )
    database_pool_size: int = Field(default=10, ge=1)
    database_max_overflow: int = Field(
        default=5, ge=0, description="Connections opened beyond the pool when it is busy"
    )
    database_pool_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How long a request waits for a pooled connection before UNAVAILABLE",
    )
    database_statement_timeout_ms: int = Field(
        default=30_000, ge=0, description="PostgreSQL statement_timeout of every session (0: off)"
    )
    database_lock_timeout_ms: int = Field(
        default=5_000, ge=0, description="PostgreSQL lock_timeout of every session (0: off)"
    )
    database_idle_in_transaction_timeout_ms: int = Field(
        default=30_000,
        ge=0,
        description="PostgreSQL idle_in_transaction_session_timeout of every session (0: off)",
    )
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    log_level: str = "INFO"
    log_json: bool = True
    shutdown_grace_seconds: float = Field(default=10, ge=0)
    jwt_issuer: str = "cake-system"
    jwt_audience: str = "cake-users"
    jwks_file: Path | None = None
    grpc_reflection: bool = Field(
        default=True,
        description="Serve gRPC reflection (grpcurl without protos); set false in production",
    )
    jwt_leeway_seconds: float = Field(
        default=30,
        ge=0,
        le=300,
        description="Clock skew allowed on exp/iat/nbf (Envoy's clock_skew_seconds is 30)",
    )
    revocation_key_prefix: str = Field(
        default="cake:revoked:",
        pattern=r"^[A-Za-z0-9:_.-]+$",
        description="Redis namespace of revoked sessions and tokens (the same in every service)",
    )
    metrics_port: int | None = None
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/gRPC collector for traces, e.g. http://otel-collector:4317, used "
        "when the standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is unset; neither: tracing off",
    )
    trace_sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded (0..1) unless OTEL_TRACES_SAMPLER is set",
    )
    startup_retry_seconds: float = Field(
        default=60, ge=0, description="How long to keep retrying dependencies at start"
    )

    # Validators (unlike Field constraints) survive a subclass redeclaring the field with
    # its own default, e.g. `grpc_port: int = 50051`.
    @field_validator("grpc_port", "metrics_port")
    @classmethod
    def _valid_port(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 65535:
            raise ValueError("port must be between 0 and 65535")
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        # Manifests often template the variable to "" to switch tracing off.
        if value is None or not value.strip():
            return None
        return value.strip()

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("database_url")
    @classmethod
    def _psycopg_url(cls, value: SecretStr) -> SecretStr:
        # Checked here so a wrong driver fails at start-up, not on the first query. The
        # parser's own message quotes the URL (and so the password): replace it.
        try:
            drivername = make_url(value.get_secret_value()).drivername
        except ArgumentError:
            raise ValueError("database_url is not a valid SQLAlchemy URL") from None
        if drivername != "postgresql+psycopg":
            raise ValueError(
                f"database_url must use the postgresql+psycopg driver, not {drivername!r}"
            )
        return value

    def database_session_timeouts(self) -> SessionTimeouts:
        return SessionTimeouts(
            statement_ms=self.database_statement_timeout_ms,
            lock_ms=self.database_lock_timeout_ms,
            idle_in_transaction_ms=self.database_idle_in_transaction_timeout_ms,
        )

    def database_url_for_display(self) -> str:
        """The database URL with its password masked, safe to log."""
        return make_url(self.database_url.get_secret_value()).render_as_string(hide_password=True)


class OutboxSettings(BaseModel):
    """The fields of a service with an outbox (``cake_common.outbox``) the events relay reads."""

    relay_role: str | None = Field(
        default="cake_relay",
        description="Database role of the events relay; migrations grant it access to "
        "`outbox` only",
    )


class ConsumerSettings(BaseModel):
    """The fields of a service that consumes Kafka events (``cake_common.consumer``); its
    ``consumer_group`` is its own (a default per service)."""

    consumer_enabled: bool = Field(
        default=True, description="Whether `serve` also runs the Kafka consumer"
    )
    consumer_max_batch: int = Field(
        default=500,
        ge=1,
        description="Events taken from Kafka per poll; one poll batch is handled in one "
        "transaction",
    )
    consumer_retry_max_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait between attempts at a batch while a dependency is down",
    )
