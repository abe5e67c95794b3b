"""Notifications configuration, read from ``CAKE_NOTIFICATIONS_*`` variables."""

from __future__ import annotations

from pathlib import Path

from cake_common.settings import ConsumerSettings, ServiceSettings
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict


class NotificationsSettings(ServiceSettings, ConsumerSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_NOTIFICATIONS_")

    service_name: str = "notifications"
    grpc_port: int = 17055

    smtp_host: str = Field(default="127.0.0.1", description="The SMTP server e-mails are sent to")
    smtp_port: int = Field(default=1025, ge=1, le=65535, description="Its port")
    smtp_sender: str = Field(
        default="Cake <no-reply@cake.local>", description="The From address of every e-mail"
    )
    smtp_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Connect and per-command timeout of an SMTP exchange"
    )
    smtp_username: str | None = Field(default=None, description="SMTP AUTH user (unset: no AUTH)")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP AUTH password")
    smtp_start_tls: bool = Field(default=False, description="Upgrade the connection with STARTTLS")
    smtp_connections: int = Field(
        default=8, ge=1, le=100, description="SMTP connections kept open and reused"
    )

    auth_directory_target: str = Field(
        default="127.0.0.1:50051", description="auth's gRPC address (GetUsersContacts)"
    )
    auth_client_id: str | None = Field(
        default=None,
        description="The service account (scope users:read-contacts) whose tokens this "
        "service requests from auth (OAuth 2.0 client credentials)",
    )
    auth_client_secret_file: Path | None = Field(
        default=None, description="File holding that service account's client secret"
    )
    contacts_cache_seconds: float = Field(
        default=300.0, ge=0, description="How long a user's contacts from auth are reused"
    )

    max_event_age_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description="Events older than this (from when they happened) are recorded and "
        "counted but nobody is notified: a new consumer group replaying a topic's history "
        "must not e-mail users about months-old vouchers",
    )

    consumer_group: str = Field(default="notifications", description="Kafka consumer group")

    dispatch_batch_size: int = Field(
        default=25, ge=1, le=1000, description="Deliveries one dispatch loop claims at once"
    )
    dispatch_workers: int = Field(
        default=4, ge=1, le=64, description="Dispatch loops, each claiming its own batches"
    )
    dispatch_concurrency: int = Field(
        default=20, ge=1, le=500, description="Messages being sent at once per channel"
    )
    dispatch_max_in_hand: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Deliveries a consumer commit hands straight to this replica's sender "
        "(claimed in the commit, sent at once); beyond it they wait for a dispatch loop",
    )
    dispatch_lease_seconds: float = Field(
        default=60.0, gt=0, description="A claimed delivery's lease; sent again after it if lost"
    )
    dispatch_poll_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Longest sleep of an idle dispatch loop. It is woken at once when the "
        "consumer commits deliveries and sleeps until the next retry is due; this fallback "
        "only finds deliveries another replica committed and did not send",
    )
    send_retry_base_seconds: float = Field(
        default=0.5, gt=0, description="First wait before a failed send is tried again"
    )
    send_retry_max_seconds: float = Field(
        default=30.0, gt=0, description="Longest wait between send attempts (no attempt limit)"
    )

    @field_validator("consumer_max_batch")
    @classmethod
    def _batch_bounded(cls, value: int) -> int:
        # Its own bound on top of ConsumerSettings' (one batch's deliveries in one transaction).
        if value > 10_000:
            raise ValueError("consumer_max_batch must be at most 10000")
        return value
