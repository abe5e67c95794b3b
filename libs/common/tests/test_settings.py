from __future__ import annotations

from pathlib import Path

import pytest
from cake_common.settings import ConsumerSettings, OutboxSettings, ServiceSettings
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict


class ExampleSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_EXAMPLE_")

    service_name: str = "example"
    grpc_port: int = 50099


DB_URL = "postgresql+psycopg://cake:s3cr3t-pw@db.internal:5432/cake_example"


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CAKE_EXAMPLE_GRPC_PORT", "0")
    monkeypatch.setenv("CAKE_EXAMPLE_LOG_LEVEL", "debug")
    monkeypatch.setenv("CAKE_EXAMPLE_LOG_JSON", "false")
    monkeypatch.setenv("CAKE_EXAMPLE_JWKS_FILE", "/etc/cake/jwks.json")
    monkeypatch.setenv("CAKE_EXAMPLE_METRICS_PORT", "9100")
    monkeypatch.setenv("CAKE_EXAMPLE_SHUTDOWN_GRACE_SECONDS", "2.5")
    monkeypatch.setenv("CAKE_AUTH_GRPC_PORT", "1234")  # another service's: ignored

    settings = ExampleSettings()

    assert settings.service_name == "example"
    assert settings.grpc_port == 0
    assert settings.grpc_host == "127.0.0.1"
    assert settings.database_url.get_secret_value() == DB_URL
    assert settings.log_level == "DEBUG"
    assert settings.log_json is False
    assert settings.jwks_file == Path("/etc/cake/jwks.json")
    assert settings.metrics_port == 9100
    assert settings.shutdown_grace_seconds == 2.5
    assert settings.database_pool_size == 10
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.jwt_issuer == "cake-system"
    assert settings.jwt_audience == "cake-users"
    assert settings.startup_retry_seconds == 60


def test_secrets_never_rendered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CAKE_EXAMPLE_REDIS_URL", "redis://:redis-pw@cache:6379/0")
    settings = ExampleSettings()
    for rendered in (repr(settings), str(settings), str(settings.model_dump())):
        assert "s3cr3t-pw" not in rendered
        assert "redis-pw" not in rendered
    assert settings.database_url_for_display() == (
        "postgresql+psycopg://cake:***@db.internal:5432/cake_example"
    )


def test_database_url_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAKE_EXAMPLE_DATABASE_URL", raising=False)
    with pytest.raises(ValidationError, match="database_url"):
        ExampleSettings()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://cake:s3cr3t-pw@db/cake",
        "postgresql+asyncpg://cake:s3cr3t-pw@db/cake",
        "not a url s3cr3t-pw",
    ],
)
def test_rejects_other_drivers_without_echoing_the_url(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", url)
    with pytest.raises(ValidationError) as caught:
        ExampleSettings()
    assert "s3cr3t-pw" not in str(caught.value)


def test_rejects_unknown_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CAKE_EXAMPLE_LOG_LEVEL", "chatty")
    with pytest.raises(ValidationError, match="log level"):
        ExampleSettings()


def test_port_range_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CAKE_EXAMPLE_GRPC_PORT", "70000")
    with pytest.raises(ValidationError):
        ExampleSettings()


class ProducerConsumerSettings(ServiceSettings, OutboxSettings, ConsumerSettings):
    model_config = SettingsConfigDict(env_prefix="CAKE_EXAMPLE_")

    service_name: str = "example"
    grpc_port: int = 50099
    consumer_group: str = "example"


def test_field_groups_read_the_service_prefix_and_keep_its_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CAKE_EXAMPLE_RELAY_ROLE", "other_relay")
    monkeypatch.setenv("CAKE_EXAMPLE_CONSUMER_ENABLED", "false")
    monkeypatch.setenv("CAKE_EXAMPLE_CONSUMER_MAX_BATCH", "20")
    monkeypatch.setenv("CAKE_EXAMPLE_CONSUMER_RETRY_MAX_SECONDS", "2.5")
    monkeypatch.setenv("CAKE_EXAMPLE_NOT_A_SETTING", "x")  # ignored, as by ServiceSettings
    monkeypatch.setenv("CAKE_RELAY_ROLE", "unprefixed")  # not the service's variable

    settings = ProducerConsumerSettings()

    assert settings.relay_role == "other_relay"
    assert settings.consumer_enabled is False
    assert settings.consumer_max_batch == 20
    assert settings.consumer_retry_max_seconds == 2.5
    assert settings.consumer_group == "example"
    assert ProducerConsumerSettings.model_config["hide_input_in_errors"] is True
    monkeypatch.setenv("CAKE_EXAMPLE_CONSUMER_MAX_BATCH", "0")
    with pytest.raises(ValidationError, match="consumer_max_batch"):
        ProducerConsumerSettings()


def test_field_group_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_EXAMPLE_DATABASE_URL", DB_URL)
    settings = ProducerConsumerSettings()
    assert settings.relay_role == "cake_relay"
    assert settings.consumer_enabled is True
    assert settings.consumer_max_batch == 500
    assert settings.consumer_retry_max_seconds == 10.0
