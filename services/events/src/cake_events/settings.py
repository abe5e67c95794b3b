"""Events service configuration, read from ``CAKE_EVENTS_*`` environment variables."""

from __future__ import annotations

from cake.events.v1 import registry
from cake_common.settings import ServiceSettings
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from cake_events.domain.relay import DEFAULT_TOPIC_ROUTES


class OutboxSource(BaseModel):
    """One service whose outbox the relay reads: configuration, so a new producer (or one
    fewer) needs no change to this service's code."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,39}$",
        description="The producing service: labels its relay, metrics, dead letters, figures",
    )
    outbox_url: SecretStr = Field(
        description="URL of the relay role on the producer's database (outbox only)"
    )
    grpc_target: str | None = Field(
        default=None,
        description="The producer's gRPC address: GET /health reports it and its database",
    )
    topics: tuple[str, ...] = Field(
        default=(),
        description="The registry's topics its events go to (named in the admin's figures)",
    )

    @field_validator("topics")
    @classmethod
    def _registry_topics(cls, topics: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(topics) - set(registry.TOPICS))
        if unknown:
            raise ValueError(f"topics not in the event registry: {', '.join(unknown)}")
        return topics


class HealthService(BaseModel):
    """A service without an outbox that ``GET /health`` reports all the same (the sources
    are reported through their ``grpc_target``): its process and its own database."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_-]{0,39}$",
        description="The service: its checks are `<name>` and `<name>_database`",
    )
    grpc_target: str = Field(description="Its gRPC address (standard gRPC health)")
    critical: bool = Field(
        default=True,
        description="Down: the report is unhealthy (503); else it is only degraded",
    )


class EventsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_EVENTS_")

    service_name: str = "events"
    grpc_port: int = 17053

    sources: list[OutboxSource] = Field(
        default_factory=list,
        description=(
            "The services whose outboxes the relay reads, a JSON list (CAKE_EVENTS_SOURCES) of"
            ' {"name", "outbox_url", "grpc_target", "topics"}; empty: nothing to relay'
        ),
    )

    health_services: list[HealthService] = Field(
        default_factory=list,
        description=(
            "Services without an outbox that GET /health reports too, a JSON list"
            ' (CAKE_EVENTS_HEALTH_SERVICES) of {"name", "grpc_target", "critical"}'
        ),
    )
    health_probe_timeout_seconds: float = Field(default=1.0, gt=0)
    health_cache_seconds: float = Field(
        default=1.0, ge=0, description="GET /health answers from a report at most this old"
    )
    relay_lag_degraded_seconds: float = Field(
        default=60, gt=0, description="Oldest unpublished outbox row older than this: degraded"
    )

    # -- outbox relay ------------------------------------------------------------------------
    relay_enabled: bool = Field(
        default=True, description="Run the outbox relay inside `serve` (next to the gRPC API)"
    )
    topic_routes: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TOPIC_ROUTES),
        description=(
            "Kafka topic per event type, JSON object (CAKE_EVENTS_TOPIC_ROUTES); default: the"
            " event registry's topics. Dead letters go to the registry's dead-letter topics"
        ),
    )
    relay_batch_size: int = Field(
        default=4000, ge=1, le=10_000, description="Outbox rows claimed per batch"
    )
    relay_poll_interval_seconds: float = Field(
        default=0.5,
        gt=0,
        description="Fallback poll of the outbox (LISTEN/NOTIFY wakes the relay at once)",
    )
    relay_idle_poll_max_seconds: float = Field(
        default=4.0,
        ge=0,
        description="Longest fallback poll once idle: each quiet poll doubles the wait up to "
        "this, a notification or rows in retry bring it back to the poll interval",
    )
    relay_max_attempts: int = Field(
        default=5, ge=1, description="Failed publications of a row before it is dead-lettered"
    )
    relay_backoff_base_seconds: float = Field(
        default=1.0, gt=0, description="Delay before the first retry; doubles per failure"
    )
    relay_backoff_max_seconds: float = Field(
        default=300, gt=0, description="Upper bound of the retry delay"
    )
    relay_leader_retry_seconds: float = Field(
        default=3.0,
        gt=0,
        description="How often a standby replica tries to become the active relay of a source",
    )
    relay_kafka_timeout_seconds: float = Field(
        default=30,
        gt=0,
        description="How long a message may wait for Kafka before the broker counts as down",
    )
    relay_kafka_max_batch_bytes: int = Field(
        default=262_144, ge=16_384, description="Producer batch size per partition (bytes)"
    )
    relay_kafka_linger_ms: int = Field(
        default=0,
        ge=0,
        description="How long the relay's producer holds a partial batch back for more "
        "messages; 0: the relay hands Kafka a whole claim and then waits for it, so lingering "
        "only delayed each claim's last messages",
    )
    relay_metrics_refresh_seconds: float = Field(
        default=5, gt=0, description="How often the backlog and lag gauges are recomputed"
    )
    published_retention_seconds: float = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="Published outbox rows are deleted once older than this",
    )
    retention_sweep_interval_seconds: float = Field(
        default=60, gt=0, description="How often published rows past retention are deleted"
    )

    @field_validator("topic_routes")
    @classmethod
    def _known_event_types(cls, routes: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(routes) - {event.name for event in registry.PUBLISHED})
        if unknown:
            raise ValueError(
                f"topic_routes names event types the relay does not publish: {', '.join(unknown)}"
            )
        if any(not topic.strip() for topic in routes.values()):
            raise ValueError("topic_routes has an empty topic name")
        return routes

    @field_validator("sources")
    @classmethod
    def _one_relay_per_source(cls, sources: list[OutboxSource]) -> list[OutboxSource]:
        names = [source.name for source in sources]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"sources names a source twice: {', '.join(repeated)}")
        return sources

    @model_validator(mode="after")
    def _one_check_per_service(self) -> EventsSettings:
        names = [source.name for source in self.sources if source.grpc_target is not None]
        names += [service.name for service in self.health_services]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"GET /health would report these services twice: {', '.join(repeated)}"
            )
        return self
