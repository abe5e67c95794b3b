"""Events service configuration, read from ``CAKE_EVENTS_*`` environment variables."""

from __future__ import annotations

from cake_common.settings import ServiceSettings
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict


class EventsSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="CAKE_EVENTS_", extra="ignore", hide_input_in_errors=True
    )

    service_name: str = "events"
    grpc_port: int = 57053

    auth_outbox_url: SecretStr | None = Field(
        default=None, description="URL of the relay role on the auth database (outbox only)"
    )
    promotions_outbox_url: SecretStr | None = Field(
        default=None, description="URL of the relay role on the promotions database (outbox only)"
    )
    auth_grpc_target: str = "127.0.0.1:57051"
    promotions_grpc_target: str = "127.0.0.1:57052"

    health_probe_timeout_seconds: float = Field(default=1.0, gt=0)
    health_cache_seconds: float = Field(
        default=1.0, ge=0, description="GET /health answers from a report at most this old"
    )
    relay_lag_degraded_seconds: float = Field(
        default=60, gt=0, description="Oldest unpublished outbox row older than this: degraded"
    )
